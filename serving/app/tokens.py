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
from pathlib import Path

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
        path = self.base_dir / "tokenizer.json"
        if path.is_file():  # transformers reads it with the same library: one it cannot parse fails either way
            from tokenizers import Tokenizer

            tok = Tokenizer.from_str(path.read_text(encoding="utf-8"))
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
        enc = self._fast.encode(text, add_special_tokens=True)
        out = {"input_ids": enc.ids}
        if offsets:
            out["offset_mapping"] = enc.offsets
            out["tokens"] = enc.tokens
        return out

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
