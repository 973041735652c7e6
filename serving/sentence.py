"""What a base model's embedding is, as its sentence-transformers config defines it.

A sentence-transformers model folder (the bundled all-MiniLM-L6-v2 is one) lists its pipeline in `modules.json`:
the transformer, then a `Pooling` module (its `config.json` names the pooling mode), often a `Normalize` module
(unit-length vectors), sometimes more (`Dense`, `LayerNorm`). The engine pools each row's real tokens as the
pipeline's Pooling says (`Engine` results' `embedding`, `heads.pool`: mean, cls, max, mean_sqrt_len,
weightedmean, lasttoken); /v1/embeddings serves what the pipeline defines on top of it:

- Normalize where the pipeline has it (all-MiniLM-L6-v2: mean pooling, then unit-length vectors, as
  `SentenceTransformer.encode` gives them);
- a folder without `modules.json` (a plain transformers model): mean pooling, normalised, as OpenAI's embeddings;
- a pipeline polyhead cannot compute (several pooling modes at once, a `Dense` layer, an unreadable config):
  `unsupported` says why, and the route refuses with it rather than answer a different vector.

Its Transformer module's `sentence_bert_config.json` sets `max_seq_length` (256 for all-MiniLM-L6-v2, whose
BERT takes 512 positions): sentence-transformers cuts longer inputs to it, so an embedding of a longer input is
not the base's embedding. `max_tokens` carries it; /v1/embeddings refuses longer inputs (413) or cuts them as
the library does when asked (`truncate`, serving/truncation.py). Without the file (or the key) the limit is the
model's own.

One difference: "cls" pools the input's first token. sentence-transformers pools position 0, which for a
prompt-tuning adapter's row is its first virtual token.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

POOLING_MODES = {  # sentence-transformers' Pooling config keys -> heads.pool's modes
    "pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean", "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len", "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
MAX_CONFIG_BYTES = 1 << 20  # a modules.json or pooling config.json larger than this is not a config
TRANSFORMER_CONFIGS = (  # the Transformer module's config, by the names sentence-transformers looks for, in order
    "sentence_bert_config.json", "sentence_roberta_config.json", "sentence_distilbert_config.json",
    "sentence_camembert_config.json", "sentence_albert_config.json", "sentence_xlm-roberta_config.json",
    "sentence_xlnet_config.json",
)


@dataclass(frozen=True)
class SentencePipeline:
    normalize: bool = True  # unit-length vectors by default (a request's "normalize" may say otherwise)
    pooling: str = "mean"  # heads.pool's mode
    unsupported: str | None = None  # why /v1/embeddings cannot give this base's embedding, if it cannot
    source: str = "default"  # "sentence-transformers" when read from modules.json
    max_tokens: int | None = None  # its max_seq_length: the longest input it embeds (None: the model's limit)


def read_sentence_pipeline(base_dir: str | Path) -> SentencePipeline:
    """The embedding pipeline of the model folder `base_dir` (see the module's docstring)."""
    base = Path(base_dir)
    if not (base / "modules.json").is_file():
        return SentencePipeline()
    try:
        modules = _read_json(base / "modules.json")
        if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
            raise ValueError("modules.json is not a list of modules")
        kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in sorted(modules, key=_index)]
        pooling = [m for m in modules if str(m.get("type", "")).endswith(".Pooling")]
        others = [k for k in kinds if k not in ("Transformer", "Pooling", "Normalize")]
        if others:
            return _unsupported(f"its sentence-transformers pipeline has {', '.join(others)} modules")
        if len(pooling) != 1 or kinds.index("Pooling") != 1 or kinds[0] != "Transformer":
            return _unsupported(f"its sentence-transformers pipeline is {' -> '.join(kinds) or 'empty'}, "
                                "not Transformer -> Pooling [-> Normalize]")
        path = _inside(base, str(pooling[0].get("path", "")))
        config = _read_json(path / "config.json")
        if not isinstance(config, dict):
            raise ValueError("the Pooling config is not an object")
        transformer = next(m for m in modules if str(m.get("type", "")).rsplit(".", 1)[-1] == "Transformer")
        max_tokens = _max_seq_length(_inside(base, str(transformer.get("path", ""))))
    except (OSError, ValueError) as exc:  # json.JSONDecodeError is a ValueError
        return _unsupported(f"its sentence-transformers config cannot be read: {exc}")
    modes = [mode for mode in POOLING_MODES if config.get(mode) is True]
    unknown = sorted(k for k, v in config.items() if k.startswith("pooling_mode_") and k not in POOLING_MODES and v)
    if unknown or len(modes) != 1:
        named = ", ".join(m.removeprefix("pooling_mode_") for m in modes + unknown) or "none"
        return _unsupported(f"its sentence-transformers pooling is {named}; polyhead pools by one of "
                            f"{', '.join(POOLING_MODES.values())}")
    normalize = "Normalize" in kinds
    if normalize and kinds[-1] != "Normalize":
        return _unsupported("its sentence-transformers pipeline normalises before its last module")
    return SentencePipeline(normalize=normalize, pooling=POOLING_MODES[modes[0]], source="sentence-transformers",
                            max_tokens=max_tokens)


def _max_seq_length(folder: Path) -> int | None:
    """The Transformer module's max_seq_length, None where its config has none (or there is no config)."""
    path = next((folder / name for name in TRANSFORMER_CONFIGS if (folder / name).is_file()), None)
    if path is None:
        return None
    config = _read_json(path)
    if not isinstance(config, dict):
        raise ValueError(f"{path.name} is not an object")
    value = config.get("max_seq_length")
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ValueError(f"{path.name}: max_seq_length {value!r} is not a positive integer")
    return value


def _unsupported(why: str) -> SentencePipeline:
    return SentencePipeline(unsupported=f"this base model's embedding cannot be served: {why}",
                            source="sentence-transformers")


def _index(module: dict) -> int:
    idx = module.get("idx", 0)
    return idx if isinstance(idx, int) else 0


def _inside(base: Path, relative: str) -> Path:
    """base/relative, refused when it leaves base (a config names folders inside the model's own)."""
    path = (base / relative).resolve()
    if path != base.resolve() and base.resolve() not in path.parents:
        raise ValueError(f"module path {relative!r} is outside the model folder")
    return path


def _read_json(path: Path):
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ValueError(f"{path.name} is over {MAX_CONFIG_BYTES} bytes")
    return json.loads(path.read_text(encoding="utf-8"))


def unit_length(vector: list[float]) -> list[float]:
    """`vector` scaled to length 1 (sentence-transformers' Normalize); a zero vector stays zero."""
    norm = math.sqrt(math.fsum(x * x for x in vector))
    return [x / norm for x in vector] if norm > 1e-12 else list(vector)
