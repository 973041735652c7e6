"""Reading adapter files safely: size-limited JSON and checked safetensors. Never pickle.

`read_safetensors` parses and checks the header itself (length, JSON without repeated keys, dtypes, shapes,
offsets that tile the data exactly) before any tensor is materialized, then checks
values for NaN/Inf.
"""
from __future__ import annotations

import json
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors_bytes

from .errors import AdapterError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
FLOAT32_MAX = torch.finfo(torch.float32).max  # a config's scale must fit the slot tensors that hold it
DTYPES = {"F32": (torch.float32, 4), "F16": (torch.float16, 2), "BF16": (torch.bfloat16, 2)}


class _DuplicateKey(ValueError):
    """A JSON object names one key twice; json.loads would silently keep the last value."""


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    out = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


@dataclass(frozen=True)
class FileLimits:
    max_file_bytes: int = 2 * 1024**3
    max_header_bytes: int = 16 * 1024**2
    max_json_bytes: int = 1024**2
    max_tensors: int = 100_000


def refuse_pickles(folder: Path) -> None:
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise AdapterError(
                f"{path}: pickle-based weight files ({path.suffix}) are refused; "
                "polyhead reads safetensors only (convert it and remove this file)"
            )


_READ_CHUNK = 1024**2


def read_bounded(path: Path, limit: int, what: str) -> bytes:
    """The bytes of the adapter file `path`, read with a cap: at most `limit` bytes, whatever its size claims
    (a /proc file reports 0). Only a regular file inside the adapter's folder (`path.parent`) is read: a
    symlink that leaves it, a FIFO, a device or a socket is refused before a byte is read."""
    folder = path.parent.resolve()
    try:
        target = path.resolve(strict=True)
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop
        raise AdapterError(f"{path}: missing") from None
    if target != folder / path.name and not target.is_relative_to(folder):
        raise AdapterError(f"{path}: a symlink that leaves the adapter folder (to {target}): refused")
    try:
        fd = os.open(target, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    except OSError as exc:
        raise AdapterError(f"{path}: cannot be read: {exc.strerror}") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise AdapterError(f"{path}: not a regular file: refused")
    with os.fdopen(fd, "rb", buffering=0) as f:
        size = info.st_size
        if size > limit:
            raise AdapterError(f"{path}: {size} bytes, over the {limit}-byte limit for {what}")
        data = bytearray()
        while len(data) <= limit:
            chunk = f.read(min(_READ_CHUNK, limit + 1 - len(data)))
            if not chunk:
                break
            data += chunk
    if len(data) > limit:
        raise AdapterError(f"{path}: over the {limit}-byte limit for {what} (it grew, or reports a wrong size)")
    return bytes(data)


def read_json(path: Path, limits: FileLimits) -> dict:
    if not os.path.lexists(path):
        raise AdapterError(f"{path}: missing")
    data = read_bounded(path, limits.max_json_bytes, "a config file")
    try:
        value = json.loads(data.decode("utf-8"), object_pairs_hook=_unique_keys)
    except _DuplicateKey as exc:
        raise AdapterError(f"{path}: repeats the key {exc.args[0]!r} (ambiguous JSON)") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{path}: not valid JSON: {exc}") from exc
    except RecursionError:
        raise AdapterError(f"{path}: JSON nested too deeply to be a config file") from None
    if not isinstance(value, dict):
        raise AdapterError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def read_safetensors(path: Path, limits: FileLimits) -> dict[str, torch.Tensor]:
    """All tensors of a checked safetensors file, as float32 CPU tensors."""
    if not os.path.lexists(path):
        raise AdapterError(f"{path}: missing")
    data = read_bounded(path, limits.max_file_bytes, "an adapter file")
    size = len(data)
    if size < 8:
        raise AdapterError(f"{path}: truncated safetensors file ({size} bytes, no header)")
    header, header_len = _read_header(path, data, limits)
    _check_spans(path, [_check_entry(path, name, entry) for name, entry in header.items()], size - 8 - header_len)
    try:
        tensors = load_safetensors_bytes(data)
    except Exception as exc:  # the library's own parse errors are bad input too
        raise AdapterError(f"{path}: unreadable safetensors file: {exc}") from exc
    out = {}
    for name, tensor in tensors.items():
        tensor = tensor.to(torch.float32)
        if not torch.isfinite(tensor).all():
            raise AdapterError(f"{path}: tensor '{name}' contains NaN or Inf values")
        out[name] = tensor
    return out


def _read_header(path: Path, data: bytes, limits: FileLimits) -> tuple[dict, int]:
    """The header's tensor entries (no __metadata__) and its length in bytes."""
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > limits.max_header_bytes:
        raise AdapterError(f"{path}: safetensors header of {header_len} bytes, over the {limits.max_header_bytes}-byte limit")
    if 8 + header_len > len(data):
        raise AdapterError(f"{path}: truncated safetensors file (header says {header_len} bytes, file has {len(data) - 8})")
    try:
        header = json.loads(data[8 : 8 + header_len].decode("utf-8"), object_pairs_hook=_unique_keys)
    except _DuplicateKey as exc:
        raise AdapterError(f"{path}: safetensors header repeats the key {exc.args[0]!r}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{path}: safetensors header is not valid JSON: {exc}") from exc
    except RecursionError:
        raise AdapterError(f"{path}: safetensors header nested too deeply (not a tensor table)") from None
    if not isinstance(header, dict):
        raise AdapterError(f"{path}: safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    if len(header) > limits.max_tensors:
        raise AdapterError(f"{path}: {len(header)} tensors, over the {limits.max_tensors}-tensor limit")
    return header, header_len


def _check_spans(path: Path, spans: list[tuple[int, int, str]], body: int) -> None:
    """Tensor data must tile the `body`-byte data section exactly: no gaps, overlaps or trailing bytes."""
    cursor = 0
    for start, end, name in sorted(spans):
        if start != cursor:
            raise AdapterError(f"{path}: tensor '{name}' data does not follow the previous tensor (offset {start}, expected {cursor})")
        cursor = end
    if cursor != body:
        raise AdapterError(f"{path}: truncated or padded safetensors file: tensors cover {cursor} bytes, data section has {body}")


def _check_entry(path: Path, name: str, entry) -> tuple[int, int, str]:
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise AdapterError(f"{path}: tensor '{name}' has a malformed header entry")
    dtype = entry["dtype"]
    if dtype not in DTYPES:
        raise AdapterError(f"{path}: tensor '{name}' has dtype {dtype}; allowed: {', '.join(DTYPES)}")
    shape, offsets = entry["shape"], entry["data_offsets"]
    if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise AdapterError(f"{path}: tensor '{name}' has an invalid shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) and o >= 0 for o in offsets)):
        raise AdapterError(f"{path}: tensor '{name}' has invalid data offsets {offsets!r}")
    numel = 1
    for d in shape:
        numel *= d
    start, end = offsets
    if end - start != numel * DTYPES[dtype][1]:
        raise AdapterError(f"{path}: tensor '{name}' shape {shape} ({dtype}) does not match its {end - start} data bytes")
    return start, end, name
