"""Long inputs on the text routes: refused with 413, or cut to the limit when the request asks.

The limit of /v1/embeddings is the base's sentence-transformers `max_seq_length` (serving/sentence.py; 256 for
all-MiniLM-L6-v2), else the model's; /v1/classify and /v1/tag take the model's (512 positions for BERT). A row
of a prompt- or prefix-tuning adapter has that many fewer tokens: its virtual tokens take positions too, which
only the model replica knows, so the replica checks each row again and cuts it further where the request asked.

A request asks with one of:

- `"truncate": true` (TEI's name): cut at the limit as the base's tokenizer cuts (sentence-transformers calls it
  with `truncation=True, max_length=max_seq_length`): the special tokens at the ends ([CLS] ... [SEP]) stay and
  the text's own tokens are cut from the tokenizer's `truncation_side` (right: the first ones are kept), or from
  `"truncation_direction"` ("left" | "right", as TEI) when given. Token ids sent to /v1/embeddings are cut the
  same way where they begin and end with the tokenizer's special tokens, else plainly.
- `"truncate_prompt_tokens": k` (vLLM's name and meaning: "use only the last k tokens of the prompt"): texts are
  encoded as a tokenizer with truncation_side "left" and max_length k encodes them (special tokens kept, the
  text's last tokens), token ids keep their last k; -1 is the route's limit. k over the route's limit, 0, or
  other negative values are refused (422), as vLLM refuses a k over its max_model_len.

Without either, an input over the limit is a 413 `too_many_tokens` whose message names `truncate`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, model_validator

from ..truncation import Ends, cut, kept_positions

HINT = 'send "truncate": true to cut it to the limit'
SENTENCE_LIMIT = " (the base's sentence-transformers max_seq_length)"


class TooLong(Exception):
    """An input over the limit, and no truncation asked (413 too_many_tokens)."""


class BadTruncation(Exception):
    """A truncation that cannot be done (422 invalid_field)."""


class TruncateFields(BaseModel):
    """The truncation fields every text route takes."""

    truncate: bool = False
    truncation_direction: Literal["left", "right", "Left", "Right"] | None = None
    truncate_prompt_tokens: int | None = None

    @model_validator(mode="after")
    def _one_way(self):
        k = self.truncate_prompt_tokens
        if k is not None and (k == 0 or k < -1):
            raise ValueError(f"truncate_prompt_tokens must be -1 (the limit) or a positive count, got {k}")
        if k is not None and (self.truncate or self.truncation_direction is not None):
            raise ValueError("give truncate (with truncation_direction) or truncate_prompt_tokens, not both")
        return self


@dataclass(frozen=True)
class Truncation:
    limit: int  # the request's inputs are cut to this many tokens
    side: str  # "right" | "left": which of the input's own tokens go
    plain_ids: bool  # token ids keep their last `limit` (vLLM), without looking for special tokens
    asked: str  # the field that asked, for messages


def embedding_limit(info: dict) -> tuple[int, str]:
    """/v1/embeddings' limit from the model replica's info(), and where it comes from (for messages)."""
    limit = min(info.get("embedding_max_tokens") or info["max_tokens"], info["max_tokens"])
    return limit, SENTENCE_LIMIT if limit < info["max_tokens"] else ""


def truncation(body: TruncateFields, limit: int, tokenizer_side: str, why: str = "") -> Truncation | None:
    """What `body` asks on a route whose limit is `limit` (`why` says where that limit comes from)."""
    if body.truncate:
        side = (body.truncation_direction or tokenizer_side).lower()
        return Truncation(limit, side, plain_ids=False, asked="truncate")
    k = body.truncate_prompt_tokens
    if k is None:
        return None
    if k > limit:
        raise BadTruncation(f"truncate_prompt_tokens={k} is over the limit of {limit} tokens{why}")
    return Truncation(limit if k == -1 else k, "left", plain_ids=True, asked=f"truncate_prompt_tokens={k}")


def fit(enc: dict, index: int, limit: int, trunc: Truncation | None, ends: Ends, text: bool, why: str = "") -> dict:
    """`enc` ({"input_ids", and "offset_mapping" and "tokens" when encoded with offsets}) within the limit: as it
    is when it fits, cut as `trunc` asks, or TooLong. The answer carries "truncate": how the model replica may
    cut the row further for an adapter's virtual tokens (the ends to keep and the side), None where it may not."""
    ids = enc["input_ids"]
    head, tail = (0, 0) if trunc is None or (trunc.plain_ids and not text) else ends.kept(ids)
    spec = None if trunc is None else {"head": head, "tail": tail, "side": trunc.side}
    if trunc is None:
        if len(ids) > limit:
            raise TooLong(f"input {index} has {len(ids)} tokens, over the limit of {limit}{why}; {HINT}")
        return dict(enc, truncate=None)
    if len(ids) > trunc.limit and trunc.limit < head + tail:
        raise BadTruncation(f"{trunc.asked} leaves no room for input {index}: its {head + tail} special tokens "
                            "are kept")
    return dict(keep(enc, trunc.limit, spec), truncate=spec)


def keep(enc: dict, limit: int, spec: dict) -> dict:
    """`enc` with its lists cut to `limit` tokens as `spec` ({"head", "tail", "side"}) says: the ids, and their
    offsets and token strings alike (a tag's character offsets stay those of the kept tokens in the text)."""
    n = len(enc["input_ids"])
    if n <= limit:
        return enc
    positions = kept_positions(n, limit, spec["head"], spec["tail"], spec["side"])
    out = dict(enc)
    for key in ("input_ids", "offset_mapping", "tokens"):
        if key in enc:
            out[key] = [enc[key][p] for p in positions]
    return out


def fit_row(ids: list[int], limit: int, spec: dict | None, why: str) -> list[int] | str:
    """The model replica's check of one row against its limit (the route's, less the adapter's virtual
    tokens): the ids, cut where the request asked (`spec` from `fit`), or the message of a too_many_tokens."""
    if len(ids) <= limit:
        return ids
    kept = cut(ids, limit, spec["head"], spec["tail"], spec["side"]) if spec else None
    if kept is None:
        hint = HINT if spec is None else f"its {spec['head'] + spec['tail']} special tokens are kept"
        return f"input has {len(ids)} tokens, over the limit of {limit}{why}; {hint}"
    return kept
