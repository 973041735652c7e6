"""Token tags -> entities: B-/I- tags merged into spans with character offsets.

Rules (as the "simple" aggregation of transformers' NER pipeline):
- "O" (and special tokens, whose offsets are empty) close the open entity;
- "B-X" always opens a new X entity;
- "I-X" (or a bare "X") continues an open X entity, else opens one;
- score = mean of the tokens' scores; word = the input text between the offsets.
"""
from __future__ import annotations

from typing import Sequence


def split_tag(tag: str) -> tuple[str, str | None]:
    """("B"|"I"|"O", group): "B-PER" -> ("B", "PER"), "I-PER" -> ("I", "PER"), "O" -> ("O", None), "PER" -> ("I", "PER")."""
    if tag == "O" or tag == "":
        return "O", None
    if len(tag) > 2 and tag[1] in "-_" and tag[0] in "BIbi":
        return tag[0].upper(), tag[2:]
    return "I", tag


def merge_entities(tags: Sequence[str], scores: Sequence[float], offsets: Sequence[tuple[int, int]],
                   text: str) -> list[dict]:
    """Entities {"entity", "score", "start", "end", "word"} from per-token tags, scores and character offsets."""
    if not (len(tags) == len(scores) == len(offsets)):
        raise ValueError(f"tags ({len(tags)}), scores ({len(scores)}) and offsets ({len(offsets)}) differ in length")
    entities: list[dict] = []
    group, start, end, span_scores = None, 0, 0, []

    def close():
        if group is not None:
            entities.append({"entity": group, "score": sum(span_scores) / len(span_scores),
                             "start": start, "end": end, "word": text[start:end]})

    for tag, score, (s, e) in zip(tags, scores, offsets):
        if e <= s:  # special token ([CLS], [SEP]) or empty piece
            close()
            group = None
            continue
        prefix, g = split_tag(tag)
        if prefix == "O":
            close()
            group = None
        elif prefix == "I" and g == group:
            end, span_scores = e, span_scores + [float(score)]
        else:
            close()
            group, start, end, span_scores = g, s, e, [float(score)]
    close()
    return entities
