"""Token tags -> entities: B-/I- tags merged into spans with character offsets.

`tag_entities` follows the aggregation strategies of transformers' token-classification pipeline
(`aggregation_strategy`), on the tokens that are not special (empty offsets):
- "none": every token whose best label is not "O", with that label, its score and its index in the input ids;
- "simple": each token's best label, then spans merged (below);
- "first", "average", "max": tokens grouped into words first, each word labelled by its first token's
  probabilities, their mean, or the token with the highest probability; then words merged into spans. A token
  continues the previous one's word when it is spelt longer than the text it covers (a WordPiece "##" piece;
  for tokenizers without a continuing-subword prefix: when no space separates it from the previous character);
  an unknown token ([UNK]) always starts a word.

Merging (`merge_entities`):
- "O" (and special tokens) close the open entity;
- "B-X" always opens a new X entity;
- "I-X" (or a bare "X") continues an open X entity, else opens one;
- score = mean of the tokens' (words') scores; word = the input text between the offsets (the pipeline decodes
  the tokens instead: lower-cased for an uncased model).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

STRATEGIES = ("none", "simple", "first", "average", "max")


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


@dataclass(frozen=True)
class Piece:
    """A token that is not special: its index in the input ids, its label probabilities, its characters."""

    index: int
    probs: Sequence[float]
    start: int
    end: int
    subword: bool  # continues the previous token's word


def pieces(probs: Sequence[Sequence[float]], offsets: Sequence[tuple[int, int]], tokens: Sequence[str],
           ids: Sequence[int], text: str, subword_prefix: str | None, unk_id: int | None) -> list[Piece]:
    """The input's tokens that are not special, and which continue a word (see the module's docstring)."""
    if not (len(probs) == len(offsets) == len(tokens) == len(ids)):
        raise ValueError(f"probs ({len(probs)}), offsets ({len(offsets)}), tokens ({len(tokens)}) and ids "
                         f"({len(ids)}) differ in length")
    out = []
    for i, (p, (s, e)) in enumerate(zip(probs, offsets)):
        if e <= s:  # special token ([CLS], [SEP]) or empty piece
            continue
        if unk_id is not None and ids[i] == unk_id:
            subword = False
        elif subword_prefix:
            subword = len(tokens[i]) != e - s
        else:
            subword = s > 0 and " " not in text[s - 1:s + 1]
        out.append(Piece(i, p, s, e, subword))
    return out


def _best(probs: Sequence[float]) -> int:
    return max(range(len(probs)), key=probs.__getitem__)  # the first of equal ones, as numpy's argmax


def tag_entities(pieces_: Sequence[Piece], labels: Sequence[str], text: str, strategy: str = "simple") -> list[dict]:
    """Entities of one input under an aggregation strategy (STRATEGIES); `labels` names the probabilities."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown aggregation strategy {strategy!r}: one of {', '.join(STRATEGIES)}")
    if strategy in ("none", "simple"):
        units = [(labels[b], float(p.probs[b]), p.start, p.end, p.index)
                 for p in pieces_ for b in (_best(p.probs),)]
        if strategy == "none":
            return [{"entity": tag, "score": score, "index": index, "start": s, "end": e, "word": text[s:e]}
                    for tag, score, s, e, index in units if split_tag(tag)[0] != "O"]
    else:
        words: list[list[Piece]] = []
        for p in pieces_:
            if words and p.subword:
                words[-1].append(p)
            else:
                words.append([p])
        units = []
        for word in words:
            if strategy == "first":
                probs = word[0].probs
            elif strategy == "max":
                probs = max(word, key=lambda p: max(p.probs)).probs
            else:
                probs = [sum(col) / len(word) for col in zip(*(p.probs for p in word))]
            b = _best(probs)
            units.append((labels[b], float(probs[b]), word[0].start, word[-1].end, word[0].index))
    return merge_entities([u[0] for u in units], [u[1] for u in units], [(u[2], u[3]) for u in units], text)
