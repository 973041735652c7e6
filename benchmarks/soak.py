"""Does any process of the server grow in memory over a long run with adapter churn?

Starts the server as users do (`python -m serving.cli serve --config C`: C is deploy/serve_config.yaml on a free
port, a temporary store, `source_schemes: []`), waits for /ready, then for --minutes runs --clients closed-loop
client threads and one churn thread:
  clients  /v1/classify on `sentiment`, /v1/tag on `ner`, /v1/embeddings on the base, and classify / tag /
           embeddings on store adapters: a few registered at the start (kept), and the churned ones while they
           live (each registered one is used by the churn thread itself right after its registration, then by
           the clients until it is deleted)
  churn    every --churn-s: POST /v1/adapters of a fresh name (a small random PEFT LoRA folder, SEQ_CLS or
           TOKEN_CLS head, from tests/adapter_factory.make_lora on the bundled base), or, once --live adapters
           are registered, DELETE /v1/adapters/<the oldest>
  sampler  every --sample-s: the resident memory (VmRSS and RssAnon from /proc/PID/status) of every process of
           the server's tree, named by its command (the driver, gcs_server, raylet, the agents,
           ray::ServeController, ray::ProxyActor, ray::ServeReplica:polyhead:ModelServer, ...:Ingress, the
           metrics hub actor, ...); every 30 s the size of GET /metrics (its lines: series per adapter)
At the end the server gets SIGTERM (it drains and exits). Reported: per process the least-squares RSS slope in
MiB/min after --warmup-min (the target: no process above 5 MiB/min), requests by route and status, latency
p50/p95/p99 per route (200 answers), registrations and deletions done, uses of each churned adapter.
Writes soak.json, soak.md and soak.png (RSS over time per process) under --out. Timings are reported, never
asserted.

    .venv/bin/python benchmarks/soak.py                                    # 30 minutes
    .venv/bin/python benchmarks/soak.py --minutes 3 --warmup-min 1 --out /tmp/soak   # smoke run
"""
from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]

RESULTS_DIR = HERE / "results"
TARGET_MIB_PER_MIN = 5.0
START_TRIES = 2
WORDS = ("the quick brown fox jumps over lazy dog river mountain city house green blue red small large happy sad "
         "fast slow light dark water fire earth wind music book table chair window door road tree flower garden "
         "morning evening night summer winter people friend family school work time Alice Bob Paris Berlin").split()


# the server's processes -------------------------------------------------------------------------------

def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = collections.defaultdict(list)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids[ppid].append(int(entry))
    return kids


def process_tree(root: int) -> list[int]:
    kids, out, todo = _children(), [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, []))
    return out


def command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ").strip()
    except OSError:
        return ""


def process_name(pid: int, root: int) -> str:
    """A readable name from the command line (Ray's workers set theirs to `ray::<actor class or task>`)."""
    cmd = command(pid)
    if pid == root:
        return "driver (polyhead serve)"
    if cmd.startswith("ray::"):  # ray::<class>[.<running method>], replicas ray::SERVE_REPLICA::<id>:ServeReplica:...
        title = cmd.split()[0].removeprefix("ray::")
        if "ServeReplica:" in title:
            title = title[title.index("ServeReplica:"):]
        head, dot, method = title.rpartition(".")
        return "ray::" + (head if dot and method.replace("_", "").isalnum() and ":" not in method else title)
    for needle, name in (("default_worker.py", "ray worker (starting)"), ("gcs_server", "gcs_server"),
                         ("/raylet ", "raylet"), ("dashboard/agent.py", "dashboard agent"),
                         ("runtime_env/agent", "runtime_env agent"), ("log_monitor", "log_monitor"),
                         ("monitor.py", "monitor")):
        if needle in cmd + " ":
            return name
    script = next((a for a in cmd.split() if a.endswith(".py")), None)  # python <path>/<script>.py: the script
    return "/".join(script.split("/")[-2:]) if script else cmd[:60] or "?"


def memory_kib(pid: int) -> tuple[int, int] | None:
    """(VmRSS, RssAnon) in KiB, None for a process that is gone or a zombie."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    if "VmRSS" not in fields:
        return None
    return int(fields["VmRSS"].split()[0]), int(fields.get("RssAnon", "0 kB").split()[0])


# load ---------------------------------------------------------------------------------------------

class Tally:
    """Every request's (route kind, status, latency), thread-safe."""

    def __init__(self):
        self.lock = threading.Lock()
        self.records: list[tuple[float, str, int, float]] = []  # (t since start, kind, status, seconds)

    def add(self, t: float, kind: str, status: int, seconds: float) -> None:
        with self.lock:
            self.records.append((t, kind, status, seconds))


class Soak:
    def __init__(self, url: str, base_name: str, pool: list[tuple[Path, str]], args, start: float):
        import httpx

        self.url, self.base_name, self.pool, self.args, self.start = url, base_name, pool, args, start
        self.tally = Tally()
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.stable: list[tuple[str, str]] = []  # (name, head) registered at the start, kept
        self.live: collections.OrderedDict[str, str] = collections.OrderedDict()  # churned name -> head, oldest first
        self.uses: dict[str, int] = {}  # churned name -> 200 answers while it lived
        self.uses_at_delete: list[int] = []
        self.churn = collections.Counter()  # registered / deleted / register_<status> / delete_<status>
        self.churn_latency: dict[str, list[float]] = {"register": [], "delete": []}
        self.metrics_size: list[dict] = []
        self.httpx = httpx
        self.counter = 0

    # one request ------------------------------------------------------------------------------------
    def text(self, rng: random.Random) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 40)))

    def call(self, client, kind: str, route: str, model: str, rng: random.Random) -> int:
        inputs = self.text(rng) if rng.random() < 0.7 else [self.text(rng) for _ in range(rng.randint(2, 4))]
        sent = time.monotonic()
        try:
            status = client.post(route, json={"model": model, "input": inputs}).status_code
        except self.httpx.HTTPError:
            status = 0  # no answer (connection error, timeout)
        self.tally.add(sent - self.start, kind, status, time.monotonic() - sent)
        return status

    def pick(self, rng: random.Random) -> tuple[str, str, str, str | None]:
        """(kind, route, model, churned name or None)."""
        x = rng.random()
        if x < 0.22:
            return "classify sentiment", "/v1/classify", "sentiment", None
        if x < 0.40:
            return "tag ner", "/v1/tag", "ner", None
        if x < 0.52:
            return "embeddings base", "/v1/embeddings", self.base_name, None
        with self.lock:
            live = list(self.live.items())
        if x < 0.72 or not live:
            name, head = rng.choice(self.stable)
            churned = None
        else:
            name, head = rng.choice(live)
            churned = name
        where = "churned" if churned else "store"
        if rng.random() < 0.3:
            return f"embeddings {where}", "/v1/embeddings", name, churned
        return (f"classify {where}", "/v1/classify", name, churned) if head == "SEQ_CLS" else \
            (f"tag {where}", "/v1/tag", name, churned)

    def client(self, seed: int) -> None:
        rng = random.Random(seed)
        with self.httpx.Client(base_url=self.url, timeout=120) as c:
            while not self.stop.is_set():
                kind, route, model, churned = self.pick(rng)
                if self.call(c, kind, route, model, rng) == 200 and churned:
                    with self.lock:
                        if churned in self.uses:
                            self.uses[churned] += 1
                if self.args.think_s:
                    self.stop.wait(self.args.think_s)

    # registrations ------------------------------------------------------------------------------------
    def register(self, c, name: str, rng: random.Random) -> str | None:
        folder, head = rng.choice(self.pool)
        sent = time.monotonic()
        try:
            status = c.post("/v1/adapters", json={"name": name, "source": str(folder)}).status_code
        except self.httpx.HTTPError:
            status = 0
        self.churn_latency["register"].append(time.monotonic() - sent)
        self.churn[f"register_{status}"] += 1
        if status != 201:
            return None
        self.churn["registered"] += 1
        return head

    def churner(self) -> None:
        rng = random.Random(7)
        with self.httpx.Client(base_url=self.url, timeout=120) as c:
            while not self.stop.wait(self.args.churn_s):
                with self.lock:
                    full = len(self.live) >= self.args.live
                    oldest = next(iter(self.live)) if full else None
                if full:
                    with self.lock:  # no new uses counted from here: it is about to go
                        head = self.live.pop(oldest)
                        self.uses_at_delete.append(self.uses.pop(oldest, 0))
                    sent = time.monotonic()
                    try:
                        status = c.delete(f"/v1/adapters/{oldest}").status_code
                    except self.httpx.HTTPError:
                        status = 0
                    self.churn_latency["delete"].append(time.monotonic() - sent)
                    self.churn[f"delete_{status}"] += 1
                    self.churn["deleted"] += status == 200
                    continue
                self.counter += 1
                name = f"soak-{self.counter:05d}"
                head = self.register(c, name, rng)
                if head is None:
                    continue
                used = 0  # a few uses of its own, whatever the clients do
                for route in ("/v1/embeddings", "/v1/classify" if head == "SEQ_CLS" else "/v1/tag"):
                    used += self.call(c, f"{route.rsplit('/', 1)[1]} new", route, name, rng) == 200
                with self.lock:
                    self.live[name] = head
                    self.uses[name] = used

    # /metrics size --------------------------------------------------------------------------------------
    def metrics_probe(self) -> None:
        with self.httpx.Client(base_url=self.url, timeout=60) as c:
            while not self.stop.wait(30):
                try:
                    body = c.get("/metrics").text
                except self.httpx.HTTPError:
                    continue
                lines = [ln for ln in body.splitlines() if ln and not ln.startswith("#")]
                self.metrics_size.append({"t_min": (time.monotonic() - self.start) / 60, "bytes": len(body),
                                          "series": len(lines),
                                          "series_with_soak_adapters": sum('"soak-' in ln for ln in lines)})


class Sampler:
    """RSS of every process in the server's tree, every `every` seconds."""

    def __init__(self, root: int, start: float, every: float):
        self.root, self.start, self.every = root, start, every
        self.series: dict[int, dict] = {}  # pid -> {"name", "t_min": [], "rss_mib": [], "anon_mib": []}
        self.stop = threading.Event()
        self.tree: list[int] = [root]

    def sample(self) -> None:
        t = (time.monotonic() - self.start) / 60
        self.tree = process_tree(self.root)
        for pid in self.tree:
            mem = memory_kib(pid)
            if mem is None:
                continue
            s = self.series.setdefault(pid, {"name": process_name(pid, self.root), "t_min": [], "rss_mib": [],
                                             "anon_mib": []})
            name = process_name(pid, self.root)
            if name != "ray worker (starting)" and not name.startswith("ray::IDLE"):
                s["name"] = name  # a worker gets its title once it runs an actor
            s["t_min"].append(round(t, 4))
            s["rss_mib"].append(round(mem[0] / 1024, 2))
            s["anon_mib"].append(round(mem[1] / 1024, 2))

    def run(self) -> None:
        while not self.stop.is_set():
            self.sample()
            self.stop.wait(self.every)


def slope(ts: list[float], ys: list[float]) -> tuple[float | None, float | None]:
    """Least-squares slope (per minute) and R^2."""
    import numpy as np

    if len(ts) < 3 or max(ts) - min(ts) < 0.5:
        return None, None
    t, y = np.asarray(ts), np.asarray(ys)
    a, b = np.polyfit(t, y, 1)
    resid = y - (a * t + b)
    ss = float(((y - y.mean()) ** 2).sum())
    return float(a), (1 - float((resid ** 2).sum()) / ss) if ss > 0 else None


def percentiles(values: list[float]) -> dict:
    import numpy as np

    if not values:
        return {"n": 0}
    v = np.asarray(values) * 1000
    return {"n": len(values), "p50_ms": float(np.percentile(v, 50)), "p95_ms": float(np.percentile(v, 95)),
            "p99_ms": float(np.percentile(v, 99)), "max_ms": float(v.max())}


def summarize(sampler: Sampler, soak: Soak, args, names_order: list[int]) -> dict:
    procs = []
    counts = collections.Counter(s["name"] for s in sampler.series.values())
    seen = collections.Counter()
    for pid in names_order:
        s = sampler.series[pid]
        seen[s["name"]] += 1
        label = s["name"] + (f" #{seen[s['name']]}" if counts[s["name"]] > 1 else "")
        after = [(t, r, a) for t, r, a in zip(s["t_min"], s["rss_mib"], s["anon_mib"]) if t >= args.warmup_min]
        k, r2 = slope([x[0] for x in after], [x[1] for x in after]) if after else (None, None)
        ka, _ = slope([x[0] for x in after], [x[2] for x in after]) if after else (None, None)
        procs.append({"pid": pid, "name": label, "samples": len(s["t_min"]),
                      "first_min": s["t_min"][0], "last_min": s["t_min"][-1],
                      "rss_start_mib": s["rss_mib"][0], "rss_at_warmup_mib": after[0][1] if after else None,
                      "rss_end_mib": s["rss_mib"][-1], "rss_max_mib": max(s["rss_mib"]),
                      "slope_mib_per_min": k, "r2": r2, "anon_slope_mib_per_min": ka,
                      "over_target": k is not None and k > TARGET_MIB_PER_MIN})
    records = soak.tally.records
    by_status = collections.defaultdict(collections.Counter)
    lat = collections.defaultdict(list)
    for _, kind, status, secs in records:
        by_status[kind][status] += 1
        if status == 200:
            lat[kind].append(secs)
    routes = {kind: {"status": {str(k): v for k, v in sorted(by_status[kind].items())}, **percentiles(lat[kind])}
              for kind in sorted(by_status)}
    total = collections.Counter()
    for c in by_status.values():
        total.update(c)
    uses = sorted(soak.uses_at_delete)
    return {"processes": procs, "routes": routes,
            "status_total": {str(k): v for k, v in sorted(total.items())},
            "all_200": percentiles([s for _, _, st, s in records if st == 200]),
            "requests": len(records),
            "churn": dict(soak.churn), "churn_latency": {k: percentiles(v) for k, v in soak.churn_latency.items()},
            "uses_of_deleted": {"n": len(uses), "min": uses[0] if uses else None,
                                "median": uses[len(uses) // 2] if uses else None},
            "metrics_size": soak.metrics_size}


# report -------------------------------------------------------------------------------------------------

def fmt(x, nd=1) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def tables(report: dict) -> str:
    s = report["summary"]
    warm = report["settings"]["warmup_min"]
    lines = [f"RSS per process (slope: least squares after minute {warm:g}; target <= {TARGET_MIB_PER_MIN:g} MiB/min)",
             "", "| process | pid | RSS start MiB | at warm-up | end | max | slope MiB/min | R^2 | anon slope | met |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for p in sorted(s["processes"], key=lambda p: -(p["rss_end_mib"] or 0)):
        met = "-" if p["slope_mib_per_min"] is None else ("no" if p["over_target"] else "yes")
        lines.append(f"| {p['name']} | {p['pid']} | {fmt(p['rss_start_mib'])} | {fmt(p['rss_at_warmup_mib'])} | "
                     f"{fmt(p['rss_end_mib'])} | {fmt(p['rss_max_mib'])} | {fmt(p['slope_mib_per_min'], 2)} | "
                     f"{fmt(p['r2'], 2)} | {fmt(p['anon_slope_mib_per_min'], 2)} | {met} |")
    lines += ["", f"requests: {s['requests']}, by status {s['status_total']}; all 200s p50 "
              f"{fmt(s['all_200'].get('p50_ms'))} p95 {fmt(s['all_200'].get('p95_ms'))} p99 "
              f"{fmt(s['all_200'].get('p99_ms'))} ms", "",
              "| requests | by status | 200s | p50 ms | p95 ms | p99 ms | max ms |", "|---|---|---|---|---|---|---|"]
    for kind, r in s["routes"].items():
        lines.append(f"| {kind} | {r['status']} | {r['n']} | {fmt(r.get('p50_ms'))} | {fmt(r.get('p95_ms'))} | "
                     f"{fmt(r.get('p99_ms'))} | {fmt(r.get('max_ms'))} |")
    ch, cl = s["churn"], s["churn_latency"]
    lines += ["", f"churn: {ch.get('registered', 0)} registered, {ch.get('deleted', 0)} deleted ({ch}); "
              f"register p50 {fmt(cl['register'].get('p50_ms'))} p99 {fmt(cl['register'].get('p99_ms'))} ms, "
              f"delete p50 {fmt(cl['delete'].get('p50_ms'))} p99 {fmt(cl['delete'].get('p99_ms'))} ms; "
              f"200 answers per churned adapter before its deletion: min {s['uses_of_deleted']['min']}, "
              f"median {s['uses_of_deleted']['median']} ({s['uses_of_deleted']['n']} deleted)"]
    if s["metrics_size"]:
        a, b = s["metrics_size"][0], s["metrics_size"][-1]
        lines.append(f"/metrics: {a['series']} series ({a['bytes']} B) at minute {a['t_min']:.1f}, {b['series']} "
                     f"({b['bytes']} B) at minute {b['t_min']:.1f}; series naming churned adapters at the end: "
                     f"{b['series_with_soak_adapters']}")
    return "\n".join(lines)


def write_report(report: dict, series: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(dict(report, series=series), indent=1))
    st = report["settings"]
    head = (f"# soak\n\n{report['date']}, {report['machine']['platform']}, {report['machine']['cpus']} CPUs. "
            f"{st['minutes']:g} minutes, {st['clients']} clients (think {st['think_s']:g} s), churn every "
            f"{st['churn_s']:g} s (at most {st['live']} churned adapters live), RSS sampled every "
            f"{st['sample_s']:g} s. Server: `python -m serving.cli serve --config` deploy/serve_config.yaml on a "
            f"free port with a temporary store; stopped with SIGTERM: {report['stop']}.\n\n"
            + (f"{report['note']}\n\n" if report.get("note") else ""))
    (out / "soak.md").write_text(head + "```\n" + tables(report) + "\n```\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(11, 6))
    shown = [p for p in report["summary"]["processes"] if max(series[str(p["pid"])]["rss_mib"]) >= 40]
    colors = plt.cm.tab20.colors
    for i, p in enumerate(sorted(shown, key=lambda p: -p["rss_end_mib"])):
        s = series[str(p["pid"])]
        ax.plot(s["t_min"], s["rss_mib"], color=colors[i % len(colors)], linestyle=("-", "--")[i // len(colors) % 2],
                label=f"{p['name']} ({fmt(p['slope_mib_per_min'], 2)} MiB/min)")
    ax.axvline(st["warmup_min"], color="grey", linestyle=":", label="end of warm-up")
    ax.set_xlabel("minutes")
    ax.set_ylabel("RSS (MiB)")
    ax.set_title("polyhead serve under load with adapter churn: RSS per process (>= 40 MiB)")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(out / "soak.png", dpi=110)
    plt.close(fig)


# main -----------------------------------------------------------------------------------------------

def server_config(tmp: Path, port: int, args) -> Path:
    import yaml

    deploy = ROOT / "deploy"
    raw = yaml.safe_load((deploy / "serve_config.yaml").read_text())
    raw["http_options"]["port"] = port
    a = raw["applications"][0]["args"]
    a.update(port=port, store_root=str(tmp / "store"), source_schemes=[], admin_api_key=None, api_keys=None)
    a["adapters"] = {name: str((deploy / path).resolve()) for name, path in (a.get("adapters") or {}).items()}
    for override in args.set or []:
        key, _, value = override.partition("=")
        a[key] = yaml.safe_load(value)
    path = tmp / "serve_config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def wait_ready(proc: subprocess.Popen, url: str, log: Path, seconds: float) -> float:
    import httpx

    start = time.monotonic()
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/ready", timeout=5).status_code == 200:
                return time.monotonic() - start
        except httpx.HTTPError:
            pass
        if time.monotonic() - start > seconds:
            raise RuntimeError(f"/ready not 200 within {seconds} s:\n{log.read_text()[-3000:]}")
        time.sleep(1)


def stop_server(proc: subprocess.Popen, tree: list[int], grace: float = 180) -> str:
    """SIGTERM (the server drains and exits); after `grace` s, SIGKILL to what is left of its tree (only the
    processes seen in it, with the same command line)."""
    names = {pid: command(pid) for pid in tree}
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(timeout=grace)
        how = f"exited with {rc} after SIGTERM"
    except subprocess.TimeoutExpired:
        how = f"still running {grace:g} s after SIGTERM: killed"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(command(p) == c and c for p, c in names.items()):
        time.sleep(0.5)
    left = [pid for pid, c in names.items() if c and command(pid) == c]
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    proc.poll() is None and proc.kill()
    return how + (f"; {len(left)} process(es) of its tree killed after it" if left else "")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--warmup-min", type=float, default=5, help="slopes are fitted after this minute")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--think-s", type=float, default=0.05, help="each client's pause between its requests")
    ap.add_argument("--churn-s", type=float, default=2.0)
    ap.add_argument("--live", type=int, default=6, help="churned adapters live at once; then the oldest is deleted")
    ap.add_argument("--stable", type=int, default=4, help="store adapters registered at the start and kept")
    ap.add_argument("--pool", type=int, default=24, help="distinct random adapter folders registrations draw from")
    ap.add_argument("--sample-s", type=float, default=5)
    ap.add_argument("--set", action="append", help="KEY=VALUE: a ServeConfig field of the server (YAML value)")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR)
    ap.add_argument("--keep-log", type=Path, default=None, help="copy the server's output here at the end")
    ap.add_argument("--note", default=None, help="a sentence for soak.md and soak.json (what else happened)")
    ap.add_argument("--from-json", type=Path, default=None, help="only write soak.md and soak.png again from this "
                    "soak.json (no run)")
    args = ap.parse_args(argv)
    if args.from_json:
        report = json.loads(args.from_json.read_text())
        series = report.pop("series")
        if args.note:
            report["note"] = args.note
        print(tables(report))
        write_report(report, series, args.out)
        return

    import httpx
    import torch

    from adapters_store import BaseSchema
    from serving.app import free_port, load_config
    from tests.adapter_factory import make_lora

    tmp = Path(tempfile.mkdtemp(prefix="polyhead-soak-"))
    proc = None
    try:
        port = free_port()
        config = server_config(tmp, port, args)
        cfg = load_config(config)
        base = cfg.resolved_base_dir()
        schema = BaseSchema.from_config_dir(base)
        torch.manual_seed(0)
        pool = []
        for i in range(args.pool):
            head = ("SEQ_CLS", "TOKEN_CLS")[i % 2]
            pool.append((make_lora(tmp / "pool" / f"a{i:02d}", schema, seed=1000 + i, r=4 + 4 * (i % 3), alpha=16,
                                   targets=("query", "value"), head=head, num_labels=2 + i % 4), head))
        url = f"http://127.0.0.1:{port}"
        log = tmp / "serve.log"
        env = {k: v for k, v in os.environ.items()
               if k not in ("RAY_ADDRESS", "POLYHEAD_ADMIN_API_KEY", "POLYHEAD_API_KEY")}
        env["POLYHEAD_STORE"] = str(tmp / "store")
        for attempt in range(START_TRIES):  # on a loaded machine Ray's start can time out ("node timed out")
            with log.open("w") as out:
                proc = subprocess.Popen([sys.executable, "-m", "serving.cli", "serve", "--config", str(config)],
                                        cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            start = time.monotonic()
            sampler = Sampler(proc.pid, start, args.sample_s)
            sampling = threading.Thread(target=sampler.run, daemon=True)
            sampling.start()
            try:
                ready_s = wait_ready(proc, url, log, 600)
                break
            except RuntimeError as exc:
                sampler.stop.set()
                print(f"server start {attempt + 1} failed: {str(exc)[-800:]}", flush=True)
                stop_server(proc, process_tree(proc.pid), grace=60)
                if attempt == START_TRIES - 1:
                    raise
        print(f"server ready after {ready_s:.0f} s on {url} (pid {proc.pid})", flush=True)

        soak = Soak(url, cfg.resolved_model_name(), pool, args, start)
        rng = random.Random(1)
        with httpx.Client(base_url=url, timeout=120) as c:
            for i in range(args.stable):
                head = soak.register(c, f"soak-stable-{i}", rng)
                if head is None:
                    raise RuntimeError(f"registering soak-stable-{i} failed: {soak.churn}")
                soak.stable.append((f"soak-stable-{i}", head))
        threads = [threading.Thread(target=soak.client, args=(i,), daemon=True) for i in range(args.clients)]
        threads += [threading.Thread(target=soak.churner, daemon=True),
                    threading.Thread(target=soak.metrics_probe, daemon=True)]
        for t in threads:
            t.start()
        end = start + ready_s + args.minutes * 60
        while time.monotonic() < end:
            time.sleep(min(60.0, max(0.1, end - time.monotonic())))
            if proc.poll() is not None:
                print(f"server exited early with {proc.returncode}", flush=True)
                break
            recs = soak.tally.records
            st = collections.Counter(r[2] for r in recs)
            big = sorted(((s["rss_mib"][-1], s["name"]) for s in sampler.series.values() if s["rss_mib"]), reverse=True)
            print(f"{(time.monotonic() - start) / 60:5.1f} min: {len(recs)} requests {dict(st)}, churn "
                  f"{dict(soak.churn)}; RSS " + ", ".join(f"{n} {r:.0f}" for r, n in big[:5]), flush=True)
        soak.stop.set()
        for t in threads:
            t.join(timeout=150)
        tree = process_tree(proc.pid)
        sampler.sample()
        sampler.stop.set()
        sampling.join(timeout=30)
        how = stop_server(proc, tree)
        print(f"server {how}", flush=True)

        # the warm-up starts at the first request, not at the process start: shift times to the end of /ready
        order = sorted(sampler.series, key=lambda p: sampler.series[p]["t_min"][0] * 1e7 + p)
        for s in sampler.series.values():
            s["t_min"] = [round(t - ready_s / 60, 4) for t in s["t_min"]]
        for m in soak.metrics_size:
            m["t_min"] -= ready_s / 60
        report = {"benchmark": "soak", "date": dt.datetime.now().isoformat(timespec="seconds"),
                  "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                              "python": platform.python_version(), "torch": torch.__version__},
                  "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                  "server": {"ready_s": ready_s, "config": {k: v for k, v in cfg.model_dump().items()
                                                           if k in ("num_replicas", "max_slots", "dtype",
                                                                    "store_ttl_s", "metrics_push_s", "log_level")}},
                  "stop": how, "target_mib_per_min": TARGET_MIB_PER_MIN, "note": args.note}
        report["summary"] = summarize(sampler, soak, args, order)
        text = tables(report)
        print("\n" + text, flush=True)
        write_report(report, {str(p): s for p, s in sampler.series.items()}, args.out)
        print(f"\nwrote {args.out}/soak.json, soak.md, soak.png", flush=True)
        if args.keep_log:
            shutil.copy(log, args.keep_log)
    finally:
        if proc is not None and proc.poll() is None:
            print("stopping the server: " + stop_server(proc, process_tree(proc.pid)), flush=True)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
