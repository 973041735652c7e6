"""Stopping `make serve`: SIGTERM or SIGINT to the top process (what supervisors, `timeout` and CI signal) drains.

The server runs as users start it, `make serve` with a config on free ports (`make serve CONFIG=...`). Requests
in flight when the signal arrives are answered (200), later ones get 503 `draining` with Retry-After (or find
the port closed), /ready answers 503 while draining, the output holds no traceback, and no process of the server
(make's whole process tree: the server, Ray's GCS, raylet, agents and workers) is left once make has exited.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from serving.app import free_port
from tests.integration.test_ray_loopback import _alive, _command, _serve_config, process_tree

ROOT = Path(__file__).resolve().parents[2]
REFUSED = (httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)  # the server is gone: after the signal

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads processes from Linux /proc"),
              pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")]


def _config(tmp_path: Path, port: int) -> Path:
    """deploy/serve_config.yaml on a free port with one model replica, room for the test's rows (no 429) and a
    drain timeout long enough for a loaded machine."""
    path = _serve_config(tmp_path, port)
    raw = yaml.safe_load(path.read_text())
    raw["applications"][0]["args"].update(num_replicas=1, max_pending_rows=256, max_queue_wait_s=0,  # a fixed limit
                                          drain_timeout_s=120)
    path.write_text(yaml.safe_dump(raw))
    return path


def _make_serve(config: Path, log: Path) -> subprocess.Popen:
    """`make serve CONFIG=...` in its own session. SIGINT at its default disposition (pytest may run with it
    ignored, which make would inherit); -o: never reinstall the environment (an edited pyproject.toml)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    command = ["env", "--default-signal=INT", "make", "--no-print-directory", "-o", ".venv/.installed", "serve",
               f"PY={sys.executable}", f"CONFIG={config}"]
    with log.open("w") as out:
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _wait_ready(proc: subprocess.Popen, port: int, log: Path, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while True:
        assert proc.poll() is None, f"make serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"/ready not 200 within {seconds} s:\n{log.read_text()[-3000:]}"
        time.sleep(0.5)


def _kill_tree(proc: subprocess.Popen, tree: list[int]) -> None:
    """After a failure: end what this test started (make's tree as last seen), and only that."""
    names = {pid: _command(pid) for pid in set(tree) | set(process_tree(proc.pid))}
    for pid, name in names.items():
        if _alive(pid) and _command(pid) == name:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    proc.wait(timeout=30)


def _assert_stopped(proc: subprocess.Popen, sig: int, tree: list[int], log: Path) -> str:
    """make ends by the signal it got (GNU make re-raises it once the server has exited), the server drained and
    stopped without a traceback, and nothing of the tree runs any more."""
    assert proc.wait(timeout=180) == -sig, log.read_text()[-3000:]
    text = log.read_text()
    assert "polyhead: stopped" in text, text[-3000:]
    for bad in ("Traceback", "received at time=", "Error 1", "Aborted"):  # Ray's SIGTERM dump; make's child error
        assert bad not in text, f"{bad!r} in the output:\n{text[-3000:]}"
    deadline = time.monotonic() + 15
    while any(_alive(pid) for pid in tree) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [f"{pid} {_command(pid)}" for pid in tree if _alive(pid)]
    assert not left, "still running after make serve stopped:\n  " + "\n  ".join(left)
    return text


class Load:
    """Closed-loop clients on /v1/classify, each request recorded as (sent, answered, outcome)."""

    def __init__(self, url: str, clients: int, rows: int, words: int):
        self.url, self.done = url, threading.Event()
        self.body = {"model": "sentiment", "input": [" ".join(["a lovely calm day"] * words)] * rows}
        self.results: list[tuple[float, float, object]] = []
        self.threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]
        for t in self.threads:
            t.start()

    def _client(self) -> None:
        with httpx.Client(timeout=120) as client:
            while not self.done.is_set():
                sent = time.monotonic()
                try:
                    outcome = client.post(self.url + "/v1/classify", json=self.body)
                except REFUSED as exc:
                    outcome = exc
                self.results.append((sent, time.monotonic(), outcome))
                if isinstance(outcome, Exception):
                    return  # the server is gone

    def stop(self) -> list[tuple[float, float, object]]:
        self.done.set()
        for t in self.threads:
            t.join(timeout=150)
        return self.results


def _is_draining(r: httpx.Response) -> bool:
    return (r.status_code == 503 and r.json()["error"]["code"] == "draining" and "retry-after" in r.headers
            and set(r.json()["error"]) == {"message", "type", "code"})


def _watch(url: str, log: Path, seen: list, stop: threading.Event) -> None:
    """Once the server says it drains: /ready and new requests, each on a new connection, until the port closes."""
    while "polyhead: draining:" not in log.read_text() and "polyhead: shutting down" not in log.read_text():
        if stop.wait(0.05):
            return
    while not stop.is_set():
        try:
            seen.append(("ready", httpx.get(url + "/ready", timeout=30)))
            seen.append(("new", httpx.post(url + "/v1/classify", json={"model": "sentiment", "input": "hi"},
                                           timeout=30)))
        except REFUSED:
            return
        time.sleep(0.05)


def test_sigterm_to_make_serve_under_load_drains_every_request_in_flight_and_leaves_no_process(tmp_path):
    port, log = free_port(), tmp_path / "make.log"
    proc = _make_serve(_config(tmp_path, port), log)
    url, tree = f"http://127.0.0.1:{port}", []
    try:
        _wait_ready(proc, port, log)
        tree = process_tree(proc.pid)
        assert any("raylet" in _command(pid) for pid in tree), [_command(pid) for pid in tree]
        small = Load(url, clients=4, rows=2, words=20)
        big = Load(url, clients=2, rows=24, words=30)  # seconds each: the drain lasts while they finish
        deadline = time.monotonic() + 120
        while len(small.results) < 8 or not big.results:
            assert time.monotonic() < deadline, (small.results, big.results)
            time.sleep(0.2)
        assert all(o.status_code == 200 for _, _, o in small.results + big.results), small.results + big.results
        tree = process_tree(proc.pid)  # Ray's workers are all up now
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        seen, stop_watch = [], threading.Event()
        watcher = threading.Thread(target=_watch, args=(url, log, seen, stop_watch), daemon=True)
        watcher.start()
        text = _assert_stopped(proc, signal.SIGTERM, tree, log)
        stopped_s = time.monotonic() - signalled
        stop_watch.set()
        watcher.join(timeout=60)
        results = small.stop() + big.stop()
    finally:
        if proc.poll() is None:
            _kill_tree(proc, tree)

    in_flight = [(s, e, o) for s, e, o in results if s < signalled < e]
    assert len(in_flight) >= 2, f"too few requests in flight at the signal to mean anything: {in_flight}"
    for sent, _, outcome in in_flight:  # answered, never dropped: 200, or 503 draining if it was not begun yet
        assert isinstance(outcome, httpx.Response), f"a request in flight at the signal got {outcome!r}"
        assert outcome.status_code == 200 or _is_draining(outcome), (outcome.status_code, outcome.text)
    assert any(o.status_code == 200 for _, _, o in in_flight), "no request in flight was let finish"
    for _, _, outcome in [r for r in results if r[0] > signalled]:  # 200: sent before the ingress heard of it
        assert isinstance(outcome, Exception) or outcome.status_code == 200 or _is_draining(outcome), outcome.text
    assert seen and all(_is_draining(r) for _, r in seen), [(what, r.status_code, r.text) for what, r in seen]
    assert {what for what, _ in seen} == {"ready", "new"}
    assert "polyhead: draining:" in text  # the big requests kept it draining
    print(f"{len(in_flight)} requests in flight at SIGTERM, {len(seen)} answers while draining, make exited "
          f"{stopped_s:.1f} s after the signal")


def test_sigint_to_make_alone_stops_the_server_make_does_not_forward_it(tmp_path):
    """GNU make does not pass SIGINT on (a terminal signals the whole process group); the server sees make
    handling it (serving/app/stopping.py ParentMake) and stops as on SIGTERM."""
    port, log = free_port(), tmp_path / "make.log"
    proc = _make_serve(_config(tmp_path, port), log)
    tree = []
    try:
        _wait_ready(proc, port, log)
        tree = process_tree(proc.pid)
        load = Load(f"http://127.0.0.1:{port}", clients=2, rows=2, words=20)
        while not load.results:
            time.sleep(0.2)
        signalled = time.monotonic()
        proc.send_signal(signal.SIGINT)  # to make alone
        _assert_stopped(proc, signal.SIGINT, tree, log)
        results = load.stop()
    finally:
        if proc.poll() is None:
            _kill_tree(proc, tree)
    for sent, answered, outcome in results:
        if sent < signalled:
            assert isinstance(outcome, httpx.Response) and (outcome.status_code == 200 or _is_draining(outcome)), \
                outcome


def test_serve_with_a_missing_config_prints_one_line_and_exits_1(tmp_path):
    missing = tmp_path / "missing.yaml"
    done = subprocess.run([sys.executable, "-m", "serving.cli", "serve", "--config", str(missing)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done
    assert done.stdout == "" and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(f"polyhead serve: error: {missing}: cannot read config"), done.stderr
