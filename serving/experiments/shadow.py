"""How a shadow row's answer compares with the primary's, per route: a value in [0, 1] (cosine: [-1, 1]) per input.

classify    label agreement: 1 when the top label is the same (multi-label: the same set above the threshold)
tag         entity-level F1 of the shadow's entities against the primary's: an entity is (group, start, end)
embeddings  cosine similarity of the two vectors
generation  (when it lands) exact match of the texts, and the first differing token position
"""
from __future__ import annotations

import math


def label_agreement(primary: dict, shadow: dict) -> float:
    """`primary`/`shadow`: classify items ({"label", and "labels" for multi-label heads})."""
    if "labels" in primary or "labels" in shadow:
        return float(set(primary.get("labels") or ()) == set(shadow.get("labels") or ()))
    return float(primary["label"] == shadow["label"])


def entity_f1(primary: list[dict], shadow: list[dict]) -> float:
    """`primary`/`shadow`: tag entities ({"entity_group" or "entity", "start", "end"}); 1.0 when both are empty."""
    def spans(entities):
        return {(e.get("entity_group", e.get("entity")), e["start"], e["end"]) for e in entities}

    p, s = spans(primary), spans(shadow)
    if not p and not s:
        return 1.0
    return 2 * len(p & s) / (len(p) + len(s))


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return max(-1.0, min(1.0, dot / norm)) if norm > 0 else float(a == b)
