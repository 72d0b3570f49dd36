"""Token labels to entity spans, exactly as ``pipeline("token-classification",
aggregation_strategy="simple")`` groups them.

Adjacent tokens with the same tag join unless the later one is a ``B-`` tag; a plain
label (no ``B-``/``I-`` prefix) continues like ``I-``; sub-word pieces are ordinary
tokens here. The group's score is the mean of its tokens' best scores, and groups
labelled ``O`` are dropped.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

IGNORED_LABELS = frozenset({"O"})


def _tag(label: str) -> tuple[str, str]:
    if label.startswith("B-"):
        return "B", label[2:]
    if label.startswith("I-"):
        return "I", label[2:]
    return "I", label


def aggregate_simple(
    text: str,
    probs: np.ndarray,
    offsets: Sequence[tuple[int, int]],
    special_tokens_mask: Sequence[int],
    id2label: Mapping[int, str],
) -> list[dict[str, Any]]:
    """Entities of one text: ``probs`` is [tokens, labels], offsets index into ``text``."""
    tokens: list[tuple[str, float, int, int]] = []
    for idx, token_probs in enumerate(probs):
        if special_tokens_mask[idx]:
            continue
        best = int(token_probs.argmax())
        start, end = offsets[idx]
        tokens.append((id2label[best], float(token_probs[best]), int(start), int(end)))

    groups: list[list[tuple[str, float, int, int]]] = []
    for token in tokens:
        if groups:
            bi, tag = _tag(token[0])
            _, last_tag = _tag(groups[-1][-1][0])
            if tag == last_tag and bi != "B":
                groups[-1].append(token)
                continue
        groups.append([token])

    entities = []
    for group in groups:
        label = group[0][0].split("-", 1)[-1]
        if label in IGNORED_LABELS:
            continue
        start, end = group[0][2], group[-1][3]
        entities.append(
            {
                "text": text[start:end],
                "label": label,
                "start": start,
                "end": end,
                "score": float(np.mean([t[1] for t in group])),
            }
        )
    return entities
