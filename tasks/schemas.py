"""Request schemas for every task (CONTRACT §3).

Validation is strict (no silent coercion of ``1`` to ``"1"``) and rejects unknown
arguments, so a producer's typo surfaces as ``InvalidRequest`` naming the field.
Limits that depend on the worker (most items, longest text) come in the validation
context.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from wire.errors import InvalidRequest
from wire.limits import MAX_ITEMS, MAX_TEXT_CHARS


class Limits(BaseModel):
    max_items: int = MAX_ITEMS
    max_text_chars: int = MAX_TEXT_CHARS


def _check_text(value: Any, field: str, limits: Limits) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be a string, got {type(value).__name__}")
    if len(value) > limits.max_text_chars:
        raise ValueError(f"text of {len(value)} characters exceeds the limit of {limits.max_text_chars}")
    return value


def _texts_only(value: Any, info: ValidationInfo) -> list[str]:
    """A non-empty list of strings (never a bare string)."""
    if not isinstance(value, list):
        raise ValueError(f"must be a list of strings, got {type(value).__name__}")
    return _text_list(value, info)


def _limits(info: ValidationInfo) -> Limits:
    return (info.context or {}).get("limits") or Limits()


def _text_list(value: Any, info: ValidationInfo) -> list[str]:
    """A string or a non-empty list of strings, as a list."""
    limits = _limits(info)
    if isinstance(value, str):
        return [_check_text(value, info.field_name or "", limits)]
    if not isinstance(value, list):
        raise ValueError(f"must be a string or a list of strings, got {type(value).__name__}")
    if not value:
        raise ValueError("must not be empty")
    if len(value) > limits.max_items:
        raise ValueError(f"{len(value)} items exceed the limit of {limits.max_items}")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise ValueError(f"item {i} must be a string, got {type(item).__name__}")
        _check_text(item, info.field_name or "", limits)
    return value


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, protected_namespaces=())

    model: str = Field(min_length=1, description="Alias from the worker's model registry.")


class EmbedRequest(Request):
    input: Any
    normalize: bool = True

    _texts = field_validator("input", mode="before")(_text_list)


class RerankRequest(Request):
    query: str
    documents: Any
    top_n: Annotated[int, Field(ge=1)] | None = None
    return_documents: bool = False

    _docs = field_validator("documents", mode="before")(_texts_only)

    @field_validator("query", mode="before")
    @classmethod
    def _query(cls, value: Any, info: ValidationInfo) -> str:
        return _check_text(value, "query", _limits(info))


class NerRequest(Request):
    input: Any

    _texts = field_validator("input", mode="before")(_text_list)


class ClassifyRequest(Request):
    input: Any
    top_k: Annotated[int, Field(ge=1)] | None = 1

    _texts = field_validator("input", mode="before")(_text_list)


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "user", "assistant"]
    content: str


class GenerateRequest(Request):
    prompt: str | None = None
    messages: list[Message] | None = None
    max_tokens: Annotated[int, Field(ge=1, le=1_000_000)] = 256
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    top_k: Annotated[int, Field(ge=1)] | None = None
    stop: str | list[str] | None = None
    seed: Annotated[int, Field(ge=0, lt=2**32)] | None = None
    stream: bool = False

    @field_validator("temperature", "top_p", mode="before")
    @classmethod
    def _number(cls, value: Any) -> Any:
        # JSON has one number type: accept 0 as well as 0.0, but never a bool or a string
        if isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        return value

    @field_validator("stop", mode="after")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> list[str] | None:
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else value
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        if len(stops) > 16:
            raise ValueError("at most 16 stop strings")
        return stops

    @field_validator("messages", mode="after")
    @classmethod
    def _messages(cls, value: list[Message] | None) -> list[Message] | None:
        if value is not None and not value:
            raise ValueError("must not be empty")
        return value

    @model_validator(mode="after")
    def _one_of(self) -> GenerateRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("prompt, messages: give exactly one of them")
        return self


def _describe(error: dict[str, Any]) -> str:
    loc = ".".join(str(p) for p in error["loc"])
    if error["type"] == "extra_forbidden":
        return f"{loc}: unknown argument"
    if error["type"] == "missing":
        return f"{loc}: required"
    message = error["msg"].removeprefix("Value error, ")
    return f"{loc}: {message}" if loc else message


def _not_unicode(value: Any, path: str) -> str | None:
    """The first place in ``value`` holding a string that is not valid Unicode text (a lone
    surrogate, which JSON's ``\\ud800`` escapes can carry and no tokenizer can encode)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            return f"{path}: not valid Unicode text (a lone surrogate U+{ord(value[exc.start]):04X} at character {exc.start})"
        return None
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        if isinstance(key, str) and (found := _not_unicode(key, f"{path} (a key)" if path else "an argument name")):
            return found
        if found := _not_unicode(item, f"{path}.{key}" if path else str(key)):
            return found
    return None


def parse(schema: type[Request], kwargs: dict[str, Any], limits: Limits | None = None) -> Any:
    """Validate ``kwargs`` or raise ``InvalidRequest`` naming every wrong field."""
    if problem := _not_unicode(kwargs, ""):
        raise InvalidRequest(problem)
    try:
        return schema.model_validate(kwargs, context={"limits": limits or Limits()})
    except ValidationError as exc:
        raise InvalidRequest("; ".join(_describe(e) for e in exc.errors(include_url=False))) from None
