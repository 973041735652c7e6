"""What does an A/B experiment cost in throughput, against naming its adapters directly, and what does a 10 % shadow
add (on a LoRA adapter, and on a head-only adapter whose body the engine runs once for both rows)?

One local Ray Serve app (serve_load's polyhead config: one model replica per core, one torch thread each, max batch
32, dtype auto), its adapters registered with POST /v1/adapters into a temporary store: `lora` versions 1-3 (PEFT
LoRA r=16 on every encoder linear, 2-label SEQ_CLS head) and `head` versions 1-3 (head-only: PEFT folders whose
only weights are the classifier, modules_to_save; no LoRA deltas). Every request is a one-row POST /v1/classify of
a 32-token text with a sticky unit key in `user` (512 users, each its own text). Configurations:

  a    direct: `model` names lora@1 or lora@2, the arm the experiment gives that user (assign.py's bucket() and
       Allocation with the experiments' salt), so a and b run the same rows
  b    experiment: `model` = ab-lora (arms lora@1 / lora@2, 50/50)
  c    experiment + shadow: `model` = ab-lora-shadow (the same arms, 10 % shadow on lora@3)
  ah   direct on the head-only arms (head@1 / head@2, split as above): d's baseline
  d    experiment on head-only arms + shadow: `model` = ab-head-shadow (head@1 / head@2, 10 % shadow on head@3)

Each round loads every configuration for --duration s per concurrency level (closed loop, an asyncio HTTP/1.1
keep-alive client in its own process, the same request sequence for every configuration), in slices of --slice s:
a b c ah d, then d ah c b a, ..., each slice starting once every answer of the one before is in (a configuration's
requests are never worked on in another's slice; answers after a slice's end are not counted). Ratios are taken
within a round and summarized by their median: on this shared 2-core machine other work comes in bursts of
seconds, and whole 8-s blocks per configuration gave single-round ratios from 0.35 to 2.3.
Targets (the A/B issue): b/a >= 0.97, c/a >= 0.88, d/ah >= 0.97 (d/a is reported too: head-only rows skip the
LoRA work, so it says little about the experiment). Shadow rows run, dropped (the ingress had
shadow_max_pending_rows = max_batch_size rows at the model), late or failed come from
GET /v1/experiments/{name}/report, before and after each round and level. Beside req/s, the server's CPU time per
answer (its processes' utime + stime from /proc over each slice, by role: ingress, model replicas, ledger actor,
the rest), whose ratio baseline/config is what the configuration costs where the server's CPU is the limit.
Timings are reported, never asserted.

    .venv/bin/python benchmarks/ab_overhead.py [--levels 16,32] [--duration 8] [--rounds 3]
    .venv/bin/python benchmarks/ab_overhead.py --levels 16 --duration 2 --rounds 1 --out /tmp/ab   # smoke run
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]
from load_clients import _read_response  # noqa: E402
from serve_report import fmt  # noqa: E402

CONFIGS = ("a", "b", "c", "ah", "d")
WHAT = {"a": "direct lora@1/@2", "b": "experiment lora@1/@2", "c": "experiment + 10 % shadow lora@3",
        "ah": "direct head@1/@2 (head-only)", "d": "experiment head@1/@2 + 10 % shadow head@3"}
EXPERIMENT = {"b": "ab-lora", "c": "ab-lora-shadow", "d": "ab-head-shadow"}
ADAPTER = {"a": "lora", "b": "lora", "c": "lora", "ah": "head", "d": "head"}  # the arms' adapter (versions 1, 2)
TARGETS = {"b": ("a", 0.97), "c": ("a", 0.88), "d": ("ah", 0.97)}  # config: (baseline, bound on config/baseline)
INFO = {"d": "a"}  # ratios reported beside the targets
SALT = "ab-overhead"  # every experiment's: the same user gets the same arm in each
SHADOW_PERCENT = 10.0
N_USERS = 512
TOKENS = 32


def experiment_body(kind: str) -> dict:
    name = ADAPTER[kind]
    body = {"arms": [{"name": "v1", "adapter": f"{name}@1", "weight": 1.0},
                     {"name": "v2", "adapter": f"{name}@2", "weight": 1.0}], "salt": SALT}
    if kind in ("c", "d"):
        body["shadow"] = {"adapter": f"{name}@3", "percent": SHADOW_PERCENT}
    return body


def arm_versions(users: list[str]) -> list[int]:
    """The arm version (1 or 2) each user gets from a new 50/50 experiment salted SALT (assign.py's spec)."""
    from serving.experiments.assign import Allocation, bucket

    allocation = Allocation.initial([1.0, 1.0])
    return [allocation.arm_of(bucket(SALT, u)) + 1 for u in users]


def request_bodies(kind: str, users: list[str], texts: list[str], versions: list[int]) -> list[str]:
    model = (lambda v: f"{ADAPTER[kind]}@{v}") if kind in ("a", "ah") else (lambda v: EXPERIMENT[kind])
    return [json.dumps({"model": model(v), "input": t, "user": u}) for u, t, v in zip(users, texts, versions)]


# the client ------------------------------------------------------------------------------------

def run_client(url: str, bodies: dict[str, list[str]], slices: list[tuple[str, float]], conc: int,
               seed: int, groups: dict[str, list[int]] | None = None) -> dict:
    """Closed loop in slices: for each (configuration, seconds) in turn, `conc` keep-alive connections each send
    POST /v1/classify of a random body of that configuration (seeded: the same sequence for every configuration)
    as soon as the previous answer is in; at the slice's end they send no more, and the next slice starts when
    every answer is in (no request of one configuration is worked on in another's slice). Per configuration:
    answers completed inside its slices over their total time, and the server's CPU time per answer (each of
    `groups`' processes, read from /proc at each slice's start and once its last answer is in: a cost that other
    work on the machine changes far less than req/s). In its own process (its CPU is its own)."""
    import numpy as np

    arg = json.dumps({"url": url, "bodies": bodies, "slices": slices, "conc": conc, "seed": seed,
                      "groups": groups or {}})
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--client"], input=arg, capture_output=True, text=True,
                          timeout=2 * sum(t for _, t in slices) + 180)
    wall = time.perf_counter() - start
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("ABJSON ")), None)
    if line is None:
        raise RuntimeError(f"client gave no result: rc={proc.returncode} {proc.stderr[-800:]}")
    r = json.loads(line[len("ABJSON "):])
    out = {}
    for kind in dict.fromkeys(k for k, _ in slices):
        mine = [x for x in r["slices"] if x["kind"] == kind]
        status = np.asarray([c for x in mine for c in x["status"]], dtype=np.int64)
        lat = np.asarray([v for x in mine for v in x["lat"]], dtype=np.float64) * 1000
        ok = status == 200
        secs = sum(x["seconds"] for x in mine)
        answers = sum(x["answers"] for x in mine)
        cpu = {g: sum(x["cpu_s"][g] for x in mine) for g in mine[0]["cpu_s"]}

        def pct(q):
            return float(np.percentile(lat[ok], q)) if ok.any() else None

        out[kind] = {"concurrency": conc, "slices": len(mine), "seconds": secs, "requests": int(len(status)),
                     "ok_per_s": int(ok.sum()) / secs, "n200": int(ok.sum()), "not_ok": int((~ok).sum()),
                     "statuses": {str(c): int((status == c).sum()) for c in sorted(set(status.tolist()) - {200})},
                     "p50_ms": pct(50), "p99_ms": pct(99), "answers": answers,
                     "cpu_ms_per_answer": {g: 1000 * v / answers for g, v in cpu.items()} if answers else {},
                     "slice_ok_per_s": [sum(c == 200 for c in x["status"]) / x["seconds"] for x in mine]}
    out["client_cpu_share_of_one_core"] = r["cpu_s"] / wall
    out["drain_s"] = r["drain_s"]
    return out


async def _client(a: dict) -> dict:
    import random
    from urllib.parse import urlsplit

    parts = urlsplit(a["url"])
    host, port = parts.hostname, parts.port or 80
    head = b"POST /v1/classify HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n" % (host.encode(), port)
    bodies = {k: [b.encode() for b in v] for k, v in a["bodies"].items()}
    conns: list = [None] * a["conc"]
    out, drain = [], 0.0
    tick = os.sysconf("SC_CLK_TCK")

    def cpu() -> dict[str, float]:  # each server process group's CPU seconds so far
        total = {}
        for group, pids in a["groups"].items():
            total[group] = 0.0
            for pid in pids:
                try:
                    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                total[group] += (int(fields[11]) + int(fields[12])) / tick  # utime + stime
        return total

    async def connection(k: int, kind: str, rng: random.Random, end: float, got: dict):
        while time.perf_counter() < end:
            if conns[k] is None:
                conns[k] = await asyncio.open_connection(host, port)
            reader, writer = conns[k]
            body = bodies[kind][rng.randrange(len(bodies[kind]))]
            t = time.perf_counter()
            try:
                writer.write(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
                code, close, _ = await _read_response(reader)
            except (OSError, ValueError, IndexError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                code, close = -1, True
            done = time.perf_counter()
            got["answers"] += 1
            if done <= end:  # answers after the slice's end are not counted
                got["status"].append(code)
                got["lat"].append(round(done - t, 6))
            if close:
                writer.close()
                conns[k] = None

    for i, (kind, seconds) in enumerate(a["slices"]):
        got = {"kind": kind, "status": [], "lat": [], "answers": 0}
        before = cpu()
        start = time.perf_counter()
        end = start + seconds
        await asyncio.gather(*(connection(k, kind, random.Random(f"{a['seed']}.{i // len(bodies)}.{k}"), end, got)
                               for k in range(a["conc"])))
        drain += time.perf_counter() - end
        after = cpu()  # every answer of the slice is in: its requests' work is done (a late shadow's aside)
        got["cpu_s"] = {g: after[g] - before[g] for g in after}
        got["seconds"] = seconds
        out.append(got)
    for c in conns:
        if c is not None:
            c[1].close()
    return {"slices": out, "drain_s": drain}


def _client_main() -> None:
    try:
        from uvloop import run  # a cheaper event loop, where installed
    except ImportError:
        run = asyncio.run
    out = run(_client(json.loads(sys.stdin.read())))
    t = os.times()
    out["cpu_s"] = t.user + t.system
    print("ABJSON " + json.dumps(out))


# the server ------------------------------------------------------------------------------------

def shadow_counts(client, experiment: str) -> dict:
    """The experiment's report summed over its arms: requests and shadow rows run, dropped, late, failed."""
    r = client.get(f"/v1/experiments/{experiment}/report")
    r.raise_for_status()
    arms = r.json()["arms"]
    out = {"requests": sum(a["requests"] for a in arms)}
    for key in ("rows", "dropped", "late", "failed"):
        out[key] = sum(a["shadow"][key] for a in arms)
    return out


def set_up(client, tmp: Path, schema, replicas: int, texts: list[str]) -> None:
    """Three versions of `lora` and of `head` registered, the three experiments defined, every adapter loaded in
    every model replica (serve_load.warm)."""
    from serve_load import TARGETS as LORA_TARGETS, warm
    from tests.adapter_factory import make_lora

    for v in (1, 2, 3):
        folders = {"lora": make_lora(tmp / f"lora{v}", schema, seed=v, r=16, alpha=32, targets=LORA_TARGETS,
                                     head="SEQ_CLS", num_labels=2),
                   "head": make_lora(tmp / f"head{v}", schema, seed=10 + v, targets=(), head="SEQ_CLS", num_labels=2)}
        for name, folder in folders.items():
            r = client.post("/v1/adapters", json={"name": name, "source": str(folder)})
            if r.status_code != 201 or r.json().get("version") != v:
                raise RuntimeError(f"registering {name} version {v}: {r.status_code} {r.text[:300]}")
    for kind, name in EXPERIMENT.items():
        r = client.put(f"/v1/experiments/{name}", json=experiment_body(kind))
        if r.status_code != 201:
            raise RuntimeError(f"PUT /v1/experiments/{name}: {r.status_code} {r.text[:300]}")
    warm(str(client.base_url).rstrip("/"), "polyhead", [f"{n}@{v}" for n in ("lora", "head") for v in (1, 2, 3)],
         texts, replicas=replicas, prefix="")


def check_assignment(client, users: list[str], texts: list[str], versions: list[int]) -> int:
    """Each experiment serves the first 64 users the arm computed here (the answer's `model`): the direct rows are
    the experiment's rows. Returns the requests checked."""
    def one(item):
        kind, i = item
        r = client.post("/v1/classify", json={"model": EXPERIMENT[kind], "input": texts[i], "user": users[i]})
        want = f"{ADAPTER[kind]}@{versions[i]}"
        if r.status_code != 200 or r.json()["data"][0]["model"] != want:
            raise RuntimeError(f"{EXPERIMENT[kind]} user {users[i]}: {r.status_code}, want {want}: {r.text[:300]}")

    items = [(kind, i) for kind in EXPERIMENT for i in range(64)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, items))
    return len(items)


def server_groups() -> dict[str, list[int]]:
    """This Ray instance's processes (this process's tree, less itself), by role: the ingress replica, the model
    replicas, the experiments' ledger actor, and the rest (Serve's controller and proxy, the metrics hub, Ray's
    own daemons)."""
    from soak import process_name, process_tree

    me = os.getpid()
    groups: dict[str, list[int]] = {"ingress": [], "model": [], "ledger": [], "other": []}
    for pid in process_tree(me):
        if pid == me:
            continue
        name = process_name(pid, me)
        group = ("ingress" if ":Ingress" in name else "model" if ":ModelServer" in name
                 else "ledger" if "ExperimentLedger" in name else "other")
        groups[group].append(pid)
    return groups


def measure_round(client, url: str, bodies: dict[str, list[str]], conc: int, duration: float, slice_s: float,
                  round_: int, settle_s: float, groups: dict[str, list[int]]) -> dict:
    """Every configuration for `duration` s at `conc`, in slices of about `slice_s` s, the order of each cycle
    reversed from the one before (and from the previous round's). Batch statistics are the level's (all
    configurations); shadow counts are each experiment's own."""
    from serve_load import batch_stats, scrape

    n = max(1, round(duration / slice_s))
    slices = [(k, duration / n) for j in range(n) for k in (CONFIGS if (round_ + j) % 2 == 0 else CONFIGS[::-1])]
    before = scrape(url)
    counts = {k: shadow_counts(client, e) for k, e in EXPERIMENT.items()}
    row = run_client(url, bodies, slices, conc, seed=1000 * round_ + conc, groups=groups)
    time.sleep(settle_s)  # metrics and ledger counts are pushed
    level = batch_stats("polyhead", before, scrape(url), sum(t for _, t in slices))
    level.update(client_cpu_share_of_one_core=row.pop("client_cpu_share_of_one_core"), drain_s=row.pop("drain_s"))
    for kind, exp in EXPERIMENT.items():
        after = shadow_counts(client, exp)
        row[kind]["experiment"] = {k: after[k] - counts[kind][k] for k in after}
    row["level"] = level
    base = {k: row[b]["ok_per_s"] for k, (b, _) in TARGETS.items()}
    print(f"    c={conc:3d} " + "  ".join(f"{k} {row[k]['ok_per_s']:5.1f}" for k in CONFIGS) + " ok/s;  "
          + "  ".join(f"{k}/{TARGETS[k][0]} {row[k]['ok_per_s'] / base[k]:.3f}" for k in TARGETS if base[k])
          + f";  batch {fmt(level.get('mean_batch_size'))}; not ok {sum(row[k]['not_ok'] for k in CONFIGS)}; shadow "
          + "  ".join(f"{k} run {e['rows']} dropped {e['dropped']} late {e['late']} failed {e['failed']} of "
                      f"{e['requests']}" for k in ("c", "d") for e in [row[k]["experiment"]]), flush=True)
    print("           server CPU ms/answer " + "  ".join(f"{k} {cpu_ms(row[k]):.1f}" for k in CONFIGS) + ";  "
          + "  ".join(f"{TARGETS[k][0]}/{k} {cpu_ms(row[TARGETS[k][0]]) / cpu_ms(row[k]):.3f}" for k in TARGETS
                      if cpu_ms(row[k])), flush=True)
    return row


def cpu_ms(res: dict) -> float:
    """The server's CPU time per answer, all its processes together (ms)."""
    return sum(res.get("cpu_ms_per_answer", {}).values())


# summary and report ----------------------------------------------------------------------------

def summarize(rounds: list[dict], levels: list[int]) -> list[dict]:
    out = []
    for conc in levels:
        runs = {k: [r[str(conc)][k] for r in rounds] for k in CONFIGS}
        for kind in CONFIGS:
            item = {"concurrency": conc, "config": kind, "what": WHAT[kind],
                    "ok_per_s": [x["ok_per_s"] for x in runs[kind]]}
            for key in ("ok_per_s", "p50_ms", "p99_ms"):
                vals = [x[key] for x in runs[kind] if x.get(key) is not None]
                item[f"median_{key}"] = statistics.median(vals) if vals else None
            item["not_ok"] = sum(x["not_ok"] for x in runs[kind])
            item["median_cpu_ms_per_answer"] = {g: statistics.median(x["cpu_ms_per_answer"][g] for x in runs[kind])
                                                for g in runs[kind][0]["cpu_ms_per_answer"]}
            item["median_cpu_ms"] = statistics.median(cpu_ms(x) for x in runs[kind])
            if kind in TARGETS:
                base, bound = TARGETS[kind]
                ratios = [x["ok_per_s"] / y["ok_per_s"] for x, y in zip(runs[kind], runs[base]) if y["ok_per_s"]]
                med = statistics.median(ratios) if ratios else None
                item.update(baseline=base, ratios=ratios, ratio=med, target=bound,
                            met=None if med is None else med >= bound)
                # what the CPU cost per answer implies for req/s where the server's CPU is what limits it
                cpu = [cpu_ms(y) / cpu_ms(x) for x, y in zip(runs[kind], runs[base]) if cpu_ms(x)]
                item.update(cpu_ratios=cpu, cpu_ratio=statistics.median(cpu) if cpu else None)
            if kind in INFO:
                ratios = [x["ok_per_s"] / y["ok_per_s"] for x, y in zip(runs[kind], runs[INFO[kind]]) if y["ok_per_s"]]
                item["info"] = {"baseline": INFO[kind], "ratios": ratios,
                                "ratio": statistics.median(ratios) if ratios else None}
            if kind in EXPERIMENT:
                first = runs[kind][0]["experiment"]
                item["experiment"] = {k: sum(x["experiment"][k] for x in runs[kind]) for k in first}
            out.append(item)
    return out


def table(summary: list[dict]) -> str:
    lines = ["| conc | config | ok/s (median) | ok/s per round | p50 ms | p99 ms | ratio per round | "
             "ratio (median) | target | met | server CPU ms/answer (ingress, model, ledger, other) | CPU ratio per "
             "round (baseline/config) | CPU ratio (median) | shadow run / dropped / late / failed (of requests) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        ratio, per, target, met = "-", "-", "-", "-"
        if "ratio" in s:
            ratio = f"{s['config']}/{s['baseline']} {fmt(s['ratio'], 3)}"
            per = " ".join(fmt(x, 3) for x in s["ratios"])
            target = f">= {s['target']}"
            met = {True: "yes", False: "NO", None: "-"}[s["met"]]
            if s["met"] is False:
                met += f" (short by {s['target'] - s['ratio']:.3f})"
        if "info" in s:
            ratio += f"; {s['config']}/{s['info']['baseline']} {fmt(s['info']['ratio'], 3)}"
            per += f"; {' '.join(fmt(x, 3) for x in s['info']['ratios'])}"
        g = s["median_cpu_ms_per_answer"]
        cpu = f"{s['median_cpu_ms']:.1f} ({', '.join(f'{g[k]:.1f}' for k in ('ingress', 'model', 'ledger', 'other'))})"
        cpu_per = " ".join(fmt(x, 3) for x in s["cpu_ratios"]) if "cpu_ratios" in s else "-"
        cpu_med = f"{s['baseline']}/{s['config']} {fmt(s['cpu_ratio'], 3)}" if "cpu_ratio" in s else "-"
        e = s.get("experiment")
        sh = "-" if e is None else f"{e['rows']} / {e['dropped']} / {e['late']} / {e['failed']} ({e['requests']})"
        lines.append(f"| {s['concurrency']} | {s['config']}: {s['what']} | {fmt(s['median_ok_per_s'])} | "
                     f"{' '.join(fmt(x) for x in s['ok_per_s'])} | {fmt(s['median_p50_ms'])} | "
                     f"{fmt(s['median_p99_ms'])} | {per} | {ratio} | {target} | "
                     f"{met} | {cpu} | {cpu_per} | {cpu_med} | {sh} |")
    return "\n".join(lines)


def level_table(rounds: list[dict], levels: list[int]) -> str:
    """Per level and round, all configurations together: the model's mean batch, the time spent waiting for the
    answers in flight at each slice's end, the client's CPU."""
    lines = ["| conc | round | mean batch | batches | drain s (all slices) | client CPU % |",
             "|---|---|---|---|---|---|"]
    for conc in levels:
        for r, row in enumerate(rounds):
            lv = row[str(conc)]["level"]
            lines.append(f"| {conc} | {r} | {fmt(lv.get('mean_batch_size'))} | {lv.get('batches')} | "
                         f"{fmt(lv['drain_s'])} | {100 * lv['client_cpu_share_of_one_core']:.0f} |")
    return "\n".join(lines)


def plot(summary: list[dict], levels: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(levels), figsize=(5.2 * len(levels), 4.4), squeeze=False, sharey=True)
    for ax, conc in zip(axes[0], levels):
        rows = [s for s in summary if s["concurrency"] == conc and "ratio" in s]
        for x, s in enumerate(rows):
            ax.bar(x, s["ratio"] or 0, width=0.6, color="tab:blue" if s["met"] else "tab:red", alpha=0.7)
            ax.plot([x - 0.1] * len(s["ratios"]), s["ratios"], "k.", ms=6, label="req/s, a round" if x == 0 else None)
            if s.get("cpu_ratio") is not None:
                ax.plot([x + 0.15] * len(s["cpu_ratios"]), s["cpu_ratios"], ".", color="tab:orange", ms=6)
                ax.plot([x + 0.15], [s["cpu_ratio"]], "D", color="tab:orange", ms=7,
                        label="server CPU per answer, baseline/config (dots: rounds)" if x == 0 else None)
            ax.hlines(s["target"], x - 0.4, x + 0.4, colors="k", linestyles="--")
            ax.annotate(f"{s['ratio']:.3f}", (x, s["ratio"] or 0), textcoords="offset points", xytext=(0, 4),
                        ha="center", fontsize=8)
        ax.set_xticks(range(len(rows)), [f"{s['config']}/{s['baseline']}" for s in rows])
        ax.set_title(f"concurrency {conc}", fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
    values = [x for s in summary if "ratio" in s for x in s["ratios"] + s.get("cpu_ratios", [])] or [1.0]
    axes[0][0].set_ylim(min(0.6, min(values) - 0.05), max(1.15, max(values) + 0.05))
    axes[0][0].set_ylabel("req/s ratio to direct")
    fig.suptitle("ab_overhead: req/s against naming the adapters directly\n"
                 "bars: median of rounds; dots: rounds; dashes: targets", fontsize=9)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)


def write(report: dict, out: Path) -> None:
    s = report["settings"]
    text = (f"# ab_overhead ({report['date']})\n\n"
            f"One-row POST /v1/classify of {s['tokens']}-token texts, {s['users']} sticky users (`user`), closed loop "
            f"on 127.0.0.1 (direct ingress), {s['rounds']} rounds x {s['duration_s']} s per level and configuration, "
            f"in slices of {s['duration_s'] / max(1, round(s['duration_s'] / s['slice_s'])):g} s cycling through the "
            "configurations, each cycle in the reverse order of the one before; ratios within a round, then their "
            "median. "
            f"{report['machine']['cpus']} CPUs shared by server and client (and other work on the machine). "
            f"Assignment checked: {report['assignment_checked']} experiment answers named the arm computed "
            f"with assign.py. App config: `{json.dumps(s['app_config'])}`. Server CPU per answer: CPU time of the "
            "app's processes (ingress replica, model replicas, the experiments' ledger actor, the rest of this Ray "
            "instance) from /proc over each slice until its last answer, over the slice's answers; its ratio "
            "baseline/config is the req/s ratio that cost implies where the server's CPU is the limit.\n\n"
            + "\n".join(f"- {k}: {v}" for k, v in WHAT.items()) + "\n\n" + table(report["summary"]) + "\n\n"
            + "Per level and round (all configurations):\n\n" + level_table(report["rounds"], s["levels"]) + "\n")
    out.mkdir(parents=True, exist_ok=True)
    (out / "ab_overhead.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "ab_overhead.md").write_text(text)
    try:
        plot(report["summary"], s["levels"], out / "ab_overhead.png")
    except Exception as exc:  # noqa: BLE001 - the tables matter more
        print(f"no plot: {exc}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--levels", default="16,32", help="concurrency levels (default 16,32)")
    ap.add_argument("--duration", type=float, default=8.0, help="seconds per level, configuration and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--slice", type=float, default=2.0,
                    help="seconds of one configuration before the next takes over (default 2)")
    ap.add_argument("--replicas", type=int, default=os.cpu_count() or 1, help="model replicas (default one per core)")
    ap.add_argument("--out", type=Path, default=HERE / "results", help="writes ab_overhead.json, .md, .png here")
    args = ap.parse_args(argv)
    levels = sorted({int(x) for x in args.levels.split(",") if x})

    import httpx
    import torch
    from transformers import AutoTokenizer

    from adapters_store import BaseSchema
    from serve_load import make_texts
    from serving.app import build_app, direct_ingress_url, free_port, free_ports, load_config, start_local_ray

    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="polyhead-ab-overhead-"))
    try:
        base = str(load_config(None).resolved_base_dir())
        texts = make_texts(AutoTokenizer.from_pretrained(base, local_files_only=True), N_USERS, TOKENS, seed=TOKENS)
        users = [f"user-{i:04d}" for i in range(N_USERS)]
        versions = arm_versions(users)
        bodies = {k: request_bodies(k, users, texts, versions) for k in CONFIGS}
        cfg = {"max_batch_size": 32, "batch_wait_timeout_s": 0.0, "max_ongoing_requests": 64,
               "max_queued_requests": 256, "num_replicas": args.replicas, "num_threads": 1, "max_slots": 8,
               "max_rank": 16, "dtype": "auto", "store_root": str(tmp / "store"), "api_keys": []}
        push_s = load_config(None, **cfg).metrics_push_s
        ports = free_ports(8)
        start_local_ray(2 * args.replicas + 2, direct_ingress_ports=ports, log_to_driver=False)
        import ray
        from ray import serve

        report = {"benchmark": "ab_overhead", "date": dt.datetime.now().isoformat(timespec="seconds"),
                  "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                              "python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__},
                  "settings": {"levels": levels, "duration_s": args.duration, "slice_s": args.slice,
                               "rounds": args.rounds, "tokens": TOKENS,
                               "users": N_USERS, "arm_v1_users": versions.count(1), "salt": SALT,
                               "shadow_percent": SHADOW_PERCENT, "configs": WHAT, "targets": TARGETS,
                               "experiments": {EXPERIMENT[k]: experiment_body(k) for k in EXPERIMENT},
                               "app_config": {k: v for k, v in cfg.items() if k != "store_root"}},
                  "rounds": []}
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
            serve.run(build_app(cfg), name="polyhead", route_prefix="/")
            url = direct_ingress_url("polyhead", ports)
            with httpx.Client(base_url=url, timeout=120) as client:
                set_up(client, tmp / "adapters", BaseSchema.from_config_dir(base), args.replicas, texts)
                report["assignment_checked"] = check_assignment(client, users, texts, versions)
                run_client(url, bodies, [(k, 1.0) for k in CONFIGS], max(levels), seed=0)  # unrecorded: first requests
                groups = server_groups()
                report["server_processes"] = {g: len(p) for g, p in groups.items()}
                print(f"ready after {time.perf_counter() - t0:.0f} s; {versions.count(1)} of {N_USERS} users on "
                      f"v1; assignment checked on {report['assignment_checked']} answers", flush=True)
                for r in range(args.rounds):
                    print(f"  round {r}", flush=True)
                    report["rounds"].append({str(conc): measure_round(client, url, bodies, conc, args.duration,
                                                                      args.slice, r, push_s + 0.3, groups)
                                             for conc in levels})
        finally:
            serve.shutdown()
            ray.shutdown()
        report["summary"] = summarize(report["rounds"], levels)
        report["total_seconds"] = time.perf_counter() - t0
        print(f"\n{table(report['summary'])}\n\n{level_table(report['rounds'], levels)}")
        write(report, args.out)
        print(f"\nwrote {args.out}/ab_overhead.json, .md, .png in {report['total_seconds']:.0f} s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["--client"]:  # run_client's own process
        _client_main()
    else:
        main()
