"""Removed version numbers of a local AdapterStore: never handed out again, kept in one hidden file per name.

A replica may still hold a removed `name@N` loaded, and an experiment may pin it: the number must never come to
mean other files. The next version of a name is 1 + the highest number it used, so only that highest number
needs a record, and only while no published version is higher:

    <root>/.removed/<name>@<N>     an empty file: N was used by `name` and removed

Stores written before this kept one `<root>/<name>/<N>.removed` per removed version; `tidy` moves the one
still needed here and deletes the rest. Safe beside concurrent adds and removes: a version being removed gets
its tombstone before its folder goes, a number is dropped only below one still in use, and the name's folder
is removed with rmdir, which refuses a folder an add is publishing into.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

TOMBS_DIR = ".removed"
_NUMBER_RE = re.compile(r"[1-9][0-9]{0,17}")
_LEGACY_RE = re.compile(r"([1-9][0-9]{0,17})\.removed")


def listdir(path: Path) -> list[str]:
    try:
        return os.listdir(path)
    except (FileNotFoundError, NotADirectoryError):
        return []


def _files(root: Path, name: str) -> dict[str, int]:
    """`name`'s tombstone files -> the number each keeps used."""
    prefix = name + "@"
    return {e: int(e[len(prefix):]) for e in listdir(root / TOMBS_DIR)
            if e.startswith(prefix) and _NUMBER_RE.fullmatch(e[len(prefix):])}


def numbers(root: Path, name: str) -> set[int]:
    return set(_files(root, name).values())


def bury(root: Path, name: str, version: int) -> None:
    """Record `name@version` as used, durably, before its folder is removed."""
    tombs = root / TOMBS_DIR
    tombs.mkdir(exist_ok=True)
    (tombs / f"{name}@{version}").touch()
    fd = os.open(tombs, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tidy(root: Path, name: str, top: int) -> None:
    """Keep at most `name`'s tombstone of `top` (its highest used number); remove its folder once empty."""
    name_dir = root / name
    for entry in listdir(name_dir):
        m = _LEGACY_RE.fullmatch(entry)
        if m:
            if int(m.group(1)) == top:
                bury(root, name, top)
            _unlink(name_dir / entry)
    for entry, number in _files(root, name).items():
        if number < top:
            _unlink(root / TOMBS_DIR / entry)
    try:
        os.rmdir(name_dir)
    except OSError:  # not empty: versions remain, or an add is publishing one
        pass


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:  # a concurrent tidy took it
        pass
