"""Stopping `polyhead serve` (serving.app.run) cleanly: which signals stop it, the drain, and no process left.

SIGTERM and SIGINT stop the server, at start-up too. Once it serves, the first one drains: the ingress answers
new inference requests 503 `draining` (Retry-After) and /ready 503, the requests in flight finish (at most
ServeConfig.drain_timeout_s), then Serve and Ray stop, every process Ray started included, and `polyhead serve`
exits 0. A second signal cuts the drain short.

`make serve` is the top process that supervisors and users signal. GNU make forwards SIGTERM to the server,
waits for it, then ends itself by SIGTERM. SIGINT make does not forward (a terminal sends it to the whole
process group): it blocks SIGINT, waits for the server, then ends itself by SIGINT. So the server watches
the make it runs under (`ParentMake`): while make handles a fatal signal (the signal blocked in its
/proc/PID/status SigBlk: GNU make blocks it for the whole of its handler) or once make is gone, the server
stops as if signalled itself. A make started with SIGINT ignored (`make serve &` in a script) ignores SIGINT
and nothing reaches the server: signal it with SIGTERM.

Ray's driver installs its own SIGTERM handler (it prints a stack dump and aborts), so `install_handlers` runs
again once Ray is up. Ray's agents (DashboardAgent, RuntimeEnvAgent) outlived `ray.shutdown()` for a minute
or more when the driver went abruptly: `reap` ends whatever the server started that is still running.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Callable

FATAL = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)  # those GNU make handles, then dies of
MAKES = ("make", "gmake")


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def install_handlers() -> None:
    """SIGTERM and SIGINT raise KeyboardInterrupt in the main thread (SIGINT even where this process started
    with it ignored: a background job of a script inherits that)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _interrupt)


def _status(pid: int) -> dict[str, str]:
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


class ParentMake:
    """The GNU make this process runs under (`make serve`), if any: `stopping()` is true while make handles a
    fatal signal or once make has gone. Linux (/proc); elsewhere, and under any other parent, never true."""

    def __init__(self):
        self.pid = os.getppid()
        self.is_make = _status(self.pid).get("Name", "").strip() in MAKES

    def stopping(self) -> bool:
        if not self.is_make:
            return False
        if os.getppid() != self.pid:
            return True  # make is gone (killed): nobody supervises the server any more
        status = _status(self.pid)
        try:
            held = int(status["SigBlk"], 16) | int(status["ShdPnd"], 16) | int(status["SigPnd"], 16)
        except (KeyError, ValueError):
            return False
        return any(held & (1 << (sig - 1)) for sig in FATAL)


def wait_for_stop(parent: ParentMake, period_s: float = 0.5) -> None:
    """Return when the parent make stops; a signal to this process raises KeyboardInterrupt out of here.
    Short sleeps: a signal that another thread received still runs its handler here soon."""
    while not parent.stopping():
        time.sleep(period_s)


class Deferred:
    """From its creation on, SIGTERM and SIGINT only count (nothing is raised): the stop in progress runs to its
    end (Serve and Ray half stopped would leave processes behind); a signal cuts the drain short."""

    def __init__(self):
        self.count = 0
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._count)

    def _count(self, signum, frame) -> None:
        self.count += 1

    @staticmethod
    def restore() -> None:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def drain(stop_accepting: Callable[[], int], timeout_s: float, signals: Deferred, log: Callable[[str], None]) -> None:
    """Ask the ingress to refuse new requests, then wait (polling it) while requests are in flight, at most
    timeout_s or until another signal. `stop_accepting()` returns the ingress's requests in flight; it may
    raise (the ingress is gone): then there is nothing to wait for."""
    deadline, seen = time.monotonic() + timeout_s, signals.count
    try:
        left = stop_accepting()
        if left:
            log(f"polyhead: draining: {left} request(s) in flight, waiting up to {timeout_s:g} s")
        while left and time.monotonic() < deadline and signals.count == seen:
            time.sleep(0.1)
            left = stop_accepting()
    except Exception as exc:  # noqa: BLE001 - a stop goes on whatever the ingress answers
        log(f"polyhead: draining skipped: the ingress did not answer ({type(exc).__name__})")
        return
    if left and signals.count != seen:
        log(f"polyhead: draining cut short by another signal: {left} request(s) still in flight")
    elif left:
        log(f"polyhead: drain timeout ({timeout_s:g} s): {left} request(s) still in flight")


def _start_time(pid: int) -> int | None:
    """The process's start time (clock ticks after boot): a pid with another start time is another process."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _running(pid: int, started: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z" and _start_time(pid) == started


def descendants(root: int | None = None) -> dict[int, int]:
    """pid -> start time of every process under `root` (default: this process), not root itself."""
    root = os.getpid() if root is None else root
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(entry))
    out, todo = {}, list(kids.get(root, []))
    while todo:
        pid = todo.pop()
        started = _start_time(pid)
        if started is not None:
            out[pid] = started
        todo.extend(kids.get(pid, []))
    return out


def reap(procs: dict[int, int], grace_s: float = 5.0) -> list[int]:
    """Wait up to grace_s for `procs` (descendants()) to end, then SIGKILL those still running; returns them."""
    deadline = time.monotonic() + grace_s
    while True:
        left = [pid for pid, started in procs.items() if _running(pid, started)]
        if not left or time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return left
