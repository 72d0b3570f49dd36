"""The bulk intake's counters, for ``celery -A worker inspect model_stats``."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class IntakeStats:
    messages: int = 0
    pops: int = 0
    served: int = 0
    refused: int = 0
    revoked: int = 0
    traced: int = 0
    duplicates: int = 0
    store_batches: int = 0
    store_retries: int = 0

    def as_dict(self) -> dict[str, float]:
        out: dict[str, float] = dict(self.__dict__)
        out["messages_per_pop"] = round(self.messages / self.pops, 2) if self.pops else 0.0
        out["results_per_store"] = (
            round((self.served + self.revoked) / self.store_batches, 2) if self.store_batches else 0.0
        )
        return out
