"""serving/app/stopping.py without Ray: a make's SIGINT reaches the server, stragglers are ended."""
from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from serving.app import stopping

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
@pytest.mark.skipif(not Path("/proc/self/status").exists() or shutil.which("make") is None, reason="Linux, make")
def test_a_server_under_make_sees_make_handle_a_fatal_signal(tmp_path, sig):
    """make keeps SIGINT (and SIGHUP) to itself and waits for its job: the job must notice on its own."""
    (tmp_path / "child.py").write_text(textwrap.dedent(f"""
        import signal, sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from serving.app.stopping import ParentMake
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(s, signal.SIG_IGN)  # only make's state may end this loop
        parent = ParentMake()
        print("under make" if parent.is_make else "not under make", flush=True)
        deadline = time.monotonic() + 60
        while not parent.stopping() and time.monotonic() < deadline:
            time.sleep(0.05)
        print("stopping" if parent.stopping() else "never saw it", flush=True)
    """))
    (tmp_path / "Makefile").write_text(f"run:\n\t{sys.executable} child.py\n")
    proc = subprocess.Popen(["env", "--default-signal=INT", "make", "-s"], cwd=tmp_path, stdout=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "under make"
        proc.send_signal(sig)
        assert proc.stdout.readline().strip() == "stopping"
        assert proc.wait(timeout=30) == -sig  # make ends by the signal once its job is done
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_not_under_make_only_its_own_signals_stop_it():
    parent = stopping.ParentMake()  # pytest's parent is a shell or a runner, not make
    assert not parent.is_make or Path(f"/proc/{parent.pid}/comm").read_text().strip() in stopping.MAKES
    if not parent.is_make:
        assert parent.stopping() is False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads Linux /proc")
def test_reap_ends_an_orphan_that_ignores_sigterm():
    """Ray's agents outlived the driver: whatever was under the server and still runs after the grace is killed."""
    code = ("import os, signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "subprocess.Popen([sys.executable, '-c', 'import signal, time; "
            "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)']); time.sleep(120)")
    middle = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 30
        while True:  # the middle one and its child, once the child runs (pytest may have other children)
            procs = {pid: started for pid, started in stopping.descendants().items() if pid == middle.pid or
                     pid in stopping.descendants(middle.pid)}
            if len(procs) == 2:
                break
            assert time.monotonic() < deadline, procs
            time.sleep(0.05)
        middle.kill()
        middle.wait()  # the grandchild is an orphan now, ignoring SIGTERM
        left = stopping.reap(procs, grace_s=0.5)
        assert left and middle.pid not in left  # the grandchild was still running, the middle one was not
        deadline = time.monotonic() + 10
        while any(stopping._running(pid, started) for pid, started in procs.items()):
            assert time.monotonic() < deadline, "an orphan survived reap()"
            time.sleep(0.05)
    finally:
        if middle.poll() is None:
            middle.kill()
            middle.wait()


def test_polyhead_serve_starts_ray_again_after_its_node_start_up_timeout(monkeypatch):
    """Ray's driver gives its raylet a fixed 30 s to register; on a busy machine `polyhead serve` died with a
    traceback. It now tries again, and after the last try says so in one line (RayStartError)."""
    import pytest

    import serving.app as app

    calls = []

    def flaky(num_cpus, **kwargs):
        calls.append(num_cpus)
        if len(calls) < 3:
            raise Exception("The current node timed out during startup. This could happen because ...")

    monkeypatch.setattr(app, "start_local_ray", flaky)
    app._start_ray(2)
    assert calls == [2, 2, 2]

    def never(num_cpus, **kwargs):
        calls.append(num_cpus)
        raise Exception("The current node timed out during startup.")

    calls.clear()
    monkeypatch.setattr(app, "start_local_ray", never)
    with pytest.raises(app.RayStartError, match="timed out 3 times"):
        app._start_ray(2)
    assert len(calls) == 3

    def other(num_cpus, **kwargs):
        raise ValueError("not a start-up timeout")

    monkeypatch.setattr(app, "start_local_ray", other)
    with pytest.raises(ValueError):
        app._start_ray(2)
