"""The README's console examples, and how an example's printed output is compared with a real run.

An example is a ```console block's `$ command` (continued by a trailing backslash, or up to the end of
a heredoc it opens) and the lines after it up to the next `$`. Expected and actual output compare
token by token: numbers within a tolerance (the README rounds them; bfloat16 answers drift in the
last digits from one CPU to another), `...` in the expected text stands for any text (a timestamp,
a hash, the rest of a long vector), everything else exactly, whitespace runs as one space.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

NUMBER = r"(?:(?<!\w)-)?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?"  # "tag-1933": a hyphen after a word is no minus
_TOKEN = re.compile(rf"(\.\.\.)|({NUMBER})|(\s+)|(.)", re.S)
_HEREDOC = re.compile(r"<<-?\s*'?\"?(\w+)'?\"?")


@dataclass(frozen=True)
class Example:
    command: str
    expected: str
    line: int  # 1-based line of the command in the README


def examples(markdown: str) -> list[Example]:
    out: list[Example] = []
    in_block = False
    command: list[str] | None = None
    expected: list[str] = []
    start = 0
    heredoc: str | None = None
    continued = False

    def flush():
        nonlocal command, expected
        if command is not None:
            out.append(Example("\n".join(command), "\n".join(expected).strip("\n"), start))
        command, expected = None, []

    for number, line in enumerate(markdown.splitlines(), 1):
        if not in_block:
            in_block = line.strip() == "```console"
            continue
        if line.strip() == "```" and heredoc is None:
            flush()
            in_block = False
            continue
        if heredoc is not None or continued:
            command.append(line)
            if heredoc is not None and line.strip() == heredoc:
                heredoc = None
            continued = heredoc is None and line.endswith("\\")
            continue
        if line.startswith("$ "):
            flush()
            command, start = [line[2:]], number
            found = _HEREDOC.search(line)
            heredoc = found.group(1) if found else None
            continued = heredoc is None and line.endswith("\\")
            continue
        if command is not None:
            expected.append(line)
    return out


def _tokens(text: str) -> list[tuple[str, str]]:
    """(kind, text): kind "any" (`...`), "num", "text" (one character); whitespace runs become one " "."""
    out: list[tuple[str, str]] = []
    for m in _TOKEN.finditer(text.strip()):
        if m.group(1):
            out.append(("any", "..."))
        elif m.group(2):
            out.append(("num", m.group(2)))
        elif m.group(3):
            out.append(("text", " "))
        else:
            out.append(("text", m.group(4)))
    return out


def mismatch(expected: str, actual: str, tolerance: float = 0.02) -> str | None:
    """None when `actual` is what `expected` shows; else where they part (a message)."""
    want, got = _tokens(expected), _tokens(actual)
    memo: dict[tuple[int, int], bool] = {}
    far = [0, 0]  # the furthest point reached, for the message

    def match(i: int, j: int) -> bool:
        key = (i, j)
        if key in memo:
            return memo[key]
        if i > far[0]:
            far[:] = [i, j]
        if i == len(want):
            ok = j == len(got)
        elif want[i][0] == "any":
            ok = any(match(i + 1, k) for k in range(j, len(got) + 1))
        elif j == len(got):
            ok = False
        elif want[i][0] == "num":
            ok = got[j][0] == "num" and _close(want[i][1], got[j][1], tolerance) and match(i + 1, j + 1)
        else:
            ok = got[j] == want[i] and match(i + 1, j + 1)
        memo[key] = ok
        return ok

    import sys

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 4 * (len(want) + len(got)) + 1000))
    try:
        if match(0, 0):
            return None
    finally:
        sys.setrecursionlimit(limit)
    i, j = far
    shown = "".join(t for _, t in want[i:i + 40])
    seen = "".join(t for _, t in got[j:j + 40])
    return f"expected ...{shown!r}... but got ...{seen!r}..."


def _close(want: str, got: str, tolerance: float) -> bool:
    if "." not in want and "e" not in want.lower():  # an integer in the README: exactly that integer
        return "." not in got and int(want) == int(float(got))
    return abs(float(want) - float(got)) <= tolerance
