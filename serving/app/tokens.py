"""The ingress's tokenizer: the base model's `tokenizer.json` through the `tokenizers` library, without torch.

transformers' AutoTokenizer imports torch, about 250 MB of every ingress replica's memory that nothing else there
needs. The ingress therefore reads `tokenizer.json` itself, with the truncation and padding that the file may
carry turned off (sentence-transformers exports such as the bundled MiniLM set both to 128 tokens: inputs would
be cut silently instead of refused with 413), as transformers does per call.

transformers can also change a tokenizer after loading it (tokenizer_config.json's add_bos_token/add_eos_token,
lower-casing, added tokens), so the file alone is not trusted: the model replica, which tokenizes with
transformers, answers the encodings of PROBES in its info(), and the ingress compares them with its own before
it encodes any request (`TextEncoder.check`). On any difference, or without a tokenizer.json, the ingress uses
transformers' tokenizer as the model does.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from ..truncation import Ends

PROBES = (
    "Hello, world!",
    "the cat sat on the mat",
    "Ada Lovelace lived in London.",
    "  leading and trailing   spaces  ",
    "Ünïcödé àccents, ß and ﬁ ligatures",
    "中文字符 and 日本語のテキスト",
    "emoji 🙂👍🏽 and symbols ©®™ ±×÷",
    "UPPER lower MiXeD 123 4.56 7,890",
    "tabs\tand\nnew\r\nlines",
    "antidisestablishmentarianism supercalifragilisticexpialidocious",
)


def transformers_encode(tokenizer, text: str, offsets: bool = False):
    """How the model (and the ingress without tokenizer.json) encodes a text with a transformers tokenizer."""
    return tokenizer(text, add_special_tokens=True, truncation=False, return_offsets_mapping=offsets)


def probe_encodings(tokenizer) -> list[dict]:
    """PROBES encoded by a transformers tokenizer, as the model replica answers them: ids and offsets."""
    out = []
    for text in PROBES:
        enc = transformers_encode(tokenizer, text, offsets=True)
        out.append({"ids": list(enc["input_ids"]), "offsets": [list(o) for o in enc["offset_mapping"]]})
    return out


class TextEncoder:
    """encode(text, offsets) -> {"input_ids": [...], "offset_mapping": [(start, end), ...] and "tokens": [the
    tokens' strings] (when offsets are asked)}."""

    def __init__(self, base_dir: str | Path):
        self.base_dir = Path(base_dir)
        self._fast = None  # tokenizers.Tokenizer, or None: transformers
        self._transformers = None
        self.checked = False
        self.fallback_reason: str | None = None  # why the ingress tokenizes with transformers, if it does
        self._ends: tuple[str, Ends] | None = None  # (backend, its template), found once per backend
        self._boundary: re.Pattern | None = None  # where tokenizer.json's texts may be cut (cut_boundary)
        path = self.base_dir / "tokenizer.json"
        if path.is_file():  # transformers reads it with the same library: one it cannot parse fails either way
            from tokenizers import Tokenizer

            spec = path.read_text(encoding="utf-8")
            tok = Tokenizer.from_str(spec)
            self._boundary = cut_boundary(json.loads(spec))
            tok.no_truncation()
            tok.no_padding()
            self._fast = tok
        else:
            self.fallback_reason = "the base model has no tokenizer.json"
            self._use_transformers()

    @property
    def backend(self) -> str:
        return "tokenizers" if self._fast is not None else "transformers"

    def _use_transformers(self) -> None:
        from transformers import AutoTokenizer

        try:
            self._transformers = AutoTokenizer.from_pretrained(str(self.base_dir), local_files_only=True)
        finally:
            self._fast = None  # after the load (encode keeps working meanwhile), and even if it failed: never
            # the tokenizer found to differ from the model's (encode then fails instead of answering wrong)

    def encode(self, text: str, offsets: bool = False) -> dict:
        if self._fast is None:
            if self._transformers is None:
                raise RuntimeError(f"no tokenizer: transformers could not load {self.base_dir}'s "
                                   f"({self.fallback_reason})")
            enc = transformers_encode(self._transformers, text, offsets)
            if not offsets:
                return enc
            return {"input_ids": enc["input_ids"], "offset_mapping": enc["offset_mapping"],
                    "tokens": self._transformers.convert_ids_to_tokens(enc["input_ids"])}
        enc = self._fast.encode_batch([text], add_special_tokens=True)[0]  # encode holds the GIL, encode_batch not
        out = {"input_ids": enc.ids}
        if offsets:
            out["offset_mapping"] = enc.offsets
            out["tokens"] = enc.tokens
        return out

    def ends(self) -> Ends:
        """The special ids this tokenizer puts around a text's own tokens ([CLS] and [SEP] for BERT), which a
        truncation keeps (serving/truncation.py)."""
        if self._ends is None or self._ends[0] != self.backend:
            if self._fast is not None:
                both, plain = (self._fast.encode("a", add_special_tokens=s).ids for s in (True, False))
            elif self._transformers is not None:
                both, plain = (self._transformers("a", add_special_tokens=s)["input_ids"] for s in (True, False))
            else:
                return Ends()
            self._ends = (self.backend, Ends.of(both, plain))
        return self._ends[1]

    @property
    def boundary(self) -> re.Pattern | None:
        """The characters a text may be cut before (serving/app/texts.py), None where it may not be cut."""
        return self._boundary if self._fast is not None else None

    @property
    def subword_prefix(self) -> str | None:
        """The prefix of a token that continues a word ("##" for WordPiece); None where the tokenizer has none."""
        model = getattr(self._fast, "model", None)
        if model is None and self._transformers is not None:
            model = getattr(getattr(self._transformers, "_tokenizer", None), "model", None)
        return getattr(model, "continuing_subword_prefix", None) or None

    @property
    def unk_id(self) -> int | None:
        if self._fast is not None:
            unk = getattr(self._fast.model, "unk_token", None)
            return self._fast.token_to_id(unk) if unk else None
        return getattr(self._transformers, "unk_token_id", None)

    def check(self, expected: list[dict] | None) -> str | None:
        """Compare the PROBES' encodings with the model's (its info()["probes"]); on a difference switch to
        transformers. Returns a description of the first difference, or None. Once per encoder."""
        was_checked, self.checked = self.checked, True
        if was_checked or self._fast is None:
            return None
        if expected is None or len(expected) != len(PROBES):
            why = "the model replica sent no probe encodings"
        else:
            why = None
            for text, want in zip(PROBES, expected):
                got = self.encode(text, offsets=True)
                if list(got["input_ids"]) != want["ids"] or [list(o) for o in got["offset_mapping"]] != want["offsets"]:
                    why = f"tokenizer.json encodes {json.dumps(text)} differently from the model's tokenizer"
                    break
        if why is not None:
            self.fallback_reason = why
            self._use_transformers()
        return why


# BERT's "Chinese characters" (the CJK ideographs its normalizer surrounds with spaces), where the Python and
# Rust tokenizers agree (Rust's third-from-last range begins at 0x2B920, Python's at 0x2B820)
CJK = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
       (0x2B920, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))
WORD_LOCAL = {"normalizer": {None, "BertNormalizer"}, "pre_tokenizer": {"BertPreTokenizer", "WhitespaceSplit",
              "Whitespace"}, "model": {"WordPiece"}, "post_processor": {None, "TemplateProcessing", "BertProcessing"}}


def cut_boundary(spec: dict) -> re.Pattern | None:
    """The characters before which a text may be cut, its tokens then being the two parts' (serving/app/texts.py):
    ASCII whitespace, and BERT's CJK ideographs where its normalizer isolates them, for a WordPiece tokenizer
    whose every step works word by word (a BERT normalizer: per character; a whitespace or BERT pre-tokenizer)
    and none of whose added tokens (matched in the raw text first) holds such a character or takes the spaces
    around it (lstrip, rstrip, single_word). None for any other tokenizer: its texts are tokenized whole."""
    for step, kinds in WORD_LOCAL.items():
        if (spec.get(step) or {}).get("type") not in kinds:
            return None
    chars = " \t\n\r"
    if (spec.get("normalizer") or {}).get("handle_chinese_chars"):
        chars += "".join(f"{chr(a)}-{chr(b)}" for a, b in CJK)
    boundary = re.compile(f"[{chars}]")
    for token in spec.get("added_tokens") or ():
        if boundary.search(token["content"]) or any(token.get(k) for k in ("lstrip", "rstrip", "single_word")):
            return None
    return boundary
