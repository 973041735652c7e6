"""The README's examples stay true: each ```console command runs, in order, against `make serve`'s app
(deploy/serve_config.yaml on a free port, a fresh adapter store), and prints what the README shows
(tests/readme_examples.py: numbers within the README's rounding, `...` for text that changes)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from serving.app import free_port
from tests.integration.test_ray_loopback import _serve_config, _start_serving, _stop, _wait_ready
from tests.readme_examples import examples, mismatch

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _localized(command: str, port: int, tmp: Path) -> str:
    """The README's command as this test runs it: its server's port, this environment's Python, and a
    scratch folder for /tmp paths."""
    bin_dir = str(Path(sys.executable).parent) + "/"
    return (command.replace("127.0.0.1:8000", f"127.0.0.1:{port}").replace(".venv/bin/", bin_dir)
            .replace("/tmp/", f"{tmp}/"))


def test_readme_examples_print_what_the_readme_shows(tmp_path, monkeypatch):
    found = examples((ROOT / "README.md").read_text())
    assert len(found) >= 9, "the README lost its examples"
    store, scratch = tmp_path / "store", tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setenv("POLYHEAD_STORE", str(store))  # the server's and the CLI's store: a fresh one
    port = free_port()
    proc = _start_serving(_serve_config(tmp_path, port), tmp_path, "serve.log")
    try:
        _wait_ready(proc, port, tmp_path / "serve.log", 240)
        # the CLI's server (`polyhead experiments`' default URL is the README's 127.0.0.1:8000)
        env = dict(os.environ, POLYHEAD_STORE=str(store), POLYHEAD_URL=f"http://127.0.0.1:{port}")
        for example in found:
            command = _localized(example.command, port, scratch)
            run = subprocess.run(["bash", "-c", command], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, timeout=600)  # as a terminal shows both
            printed = run.stdout
            expected = _localized(example.expected, port, scratch)
            problem = mismatch(expected, printed)
            assert problem is None, (f"README line {example.line}: `{example.command[:80]}` printed\n{printed[:3000]}"
                                     f"\n{problem}")
    finally:
        _stop(proc)
