"""Request bodies: checked here so a malformed request gets a 422 before anything is queued.

The worker validates again (CONTRACT §6) and has the last word on what it can serve, for
example an unknown alias or a prompt longer than the model's context.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str


class GenerateBody(BaseModel):
    """``generate``'s arguments (CONTRACT §3); a field left out takes the worker's default."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, description="An alias from the worker's model registry.")
    queue: str | None = Field(None, min_length=1, description="The queue to send to; default: the alias.")
    prompt: str | None = None
    messages: list[Message] | None = Field(None, min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**32)
    cancel_on_disconnect: bool = Field(
        False,
        description="Cancel if the client leaves mid-stream; otherwise the generation runs on and can be resumed.",
    )

    @model_validator(mode="after")
    def _one_input(self) -> GenerateBody:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        return self

    def task_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of the ``generate`` task."""
        return self.model_dump(exclude_none=True, exclude={"model", "queue", "cancel_on_disconnect"})


class EmbedBody(BaseModel):
    """``embed``'s arguments (CONTRACT §3)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    queue: str | None = Field(None, min_length=1)
    input: str | list[str]
    normalize: bool = True
