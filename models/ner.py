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
    # best label and its probability for every token at once, then plain Python per token
    best = probs.argmax(axis=-1)
    scores = probs[np.arange(len(best)), best].tolist()
    tags = {i: _tag(label) for i, label in id2label.items()}
    groups: list[list[tuple[int, float, int, int]]] = []  # (label id, score, start, end)
    for idx, (label_id, score) in enumerate(zip(best.tolist(), scores)):
        if special_tokens_mask[idx]:
            continue
        start, end = offsets[idx]
        token = (label_id, score, int(start), int(end))
        if groups:
            bi, tag = tags[label_id]
            if tag == tags[groups[-1][-1][0]][1] and bi != "B":
                groups[-1].append(token)
                continue
        groups.append([token])

    entities = []
    for group in groups:
        label = id2label[group[0][0]].split("-", 1)[-1]
        if label in IGNORED_LABELS:
            continue
        start, end = group[0][2], group[-1][3]
        group_scores = [t[1] for t in group]
        # np.mean adds fewer than 8 numbers one by one, as sum() does; beyond that, pairwise
        mean = sum(group_scores) / len(group_scores) if len(group_scores) < 8 else float(np.mean(group_scores))
        entities.append({"text": text[start:end], "label": label, "start": start, "end": end, "score": mean})
    return entities
