"""Machine helpers for benchmarks/generate_throughput.py: wait for a quiet machine, watch other processes' CPU
share while an item runs, machine facts, read bandwidth, peak RSS."""
from __future__ import annotations

import datetime as dt
import gc
import os
import platform
import time
import warnings

import torch

def quiet() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore")


class CpuWatch:
    """CPU share of *other* processes over an interval: machine busy time from /proc/stat minus ours."""

    def __init__(self):
        self.start = self._sample()

    @staticmethod
    def _sample():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        t = os.times()
        return sum(v) - v[3] - v[4], t.user + t.system + t.children_user + t.children_system, time.perf_counter()

    def others(self) -> float:
        busy0, mine0, t0 = self.start
        busy1, mine1, t1 = self._sample()
        busy_s = (busy1 - busy0) / os.sysconf("SC_CLK_TCK")
        return max(0.0, (busy_s - (mine1 - mine0)) / ((t1 - t0) * (os.cpu_count() or 1)))


def wait_for_quiet(max_wait: float, share: float = 0.25) -> float:
    """Wait (at most max_wait s) until other processes take under `share` of the CPU over 2 s; seconds waited."""
    t0 = time.perf_counter()
    while True:
        watch = CpuWatch()
        time.sleep(2.0)
        if watch.others() < share or time.perf_counter() - t0 >= max_wait:
            return time.perf_counter() - t0


def quietest(fn, wait: float, rerun_share: float = 0.25):
    """fn() after waiting for quiet; once more when other processes took over `rerun_share` of the CPU while it
    ran. Returns (the quieter try's result, its others' share, every try's share)."""
    tries = []
    for _ in range(2):
        wait_for_quiet(wait)
        gc.collect()
        watch = CpuWatch()
        out = fn()
        tries.append((watch.others(), out))
        if tries[-1][0] <= rerun_share:
            break
        print(f"    other processes took {tries[-1][0]:.0%} of the CPU meanwhile: once more", flush=True)
    share, out = min(tries, key=lambda t: t[0])
    return out, share, [t[0] for t in tries]


def machine() -> dict:
    import peft
    import transformers

    from serving.engine import auto_dtype

    flags = set()
    model = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags") and not flags:
                flags = set(line.split(":")[1].split())
            if line.startswith("model name") and not model:
                model = line.split(":")[1].strip()
    with open("/proc/meminfo") as f:
        mem = int(f.readline().split()[1]) * 1024
    return {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "cpu": model,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "memory_bytes": mem,
            "isa": sorted(flags & {"avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"}),
            "auto_dtype_cpu": auto_dtype("cpu"), "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "loadavg_at_start": os.getloadavg()}


def read_bandwidth() -> float:
    """Bytes/s of x.sum() over a 1 GiB float32 tensor, best of 5."""
    x = torch.ones(2**28)
    best = min(timed(x.sum)[0] for _ in range(5))
    return x.nbytes / best


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def peak_rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
