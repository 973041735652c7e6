"""serve_load's report: its tables (levels, overload, targets), plot and the files it writes under results/."""
from __future__ import annotations

import json
from pathlib import Path

APPS = ("floor", "polyhead", "proxied", "multiplexed")


def good(r) -> bool:
    return isinstance(r, dict) and "error" not in r


def fmt(v, nd=1):
    return "-" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def level_table(run: dict) -> str:
    head = ("| conc | app | req/s | ok/s | p50 ms | p95 ms | p99 ms | 429 % | 503 % | other err | mean batch "
            "| adapters/batch | batch compute ms | model loads/s | client CPU % | engine rows/s @batch |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for lv in run["levels"]:
        for app in APPS:
            r = lv.get(app)
            if r is None:
                continue
            if not good(r):
                msg = " ".join(r["error"].split())[:80].replace("|", "/")
                lines.append(f"| {lv['concurrency']} | {app} | error: {msg} |" + " |" * 13)
                continue
            eng = lv.get("engine") if app == "polyhead" else None
            eng_s = f"{eng['rows_per_s']:.0f} @{eng['batch']}" if good(eng) else "-"
            lines.append(
                f"| {lv['concurrency']} | {app} | {r['req_per_s']:.1f} | {r['ok_per_s']:.1f} | {fmt(r['p50_ms'])} | "
                f"{fmt(r['p95_ms'])} | {fmt(r['p99_ms'])} | {100 * r['share_429']:.1f} | {100 * r['share_503']:.1f} | "
                f"{r['nother'] + r['socket_errors'] + r['timeouts']} | {fmt(r.get('mean_batch_size'))} | "
                f"{fmt(r.get('mean_batch_adapters'))} | {fmt(r.get('mean_batch_compute_ms'))} | "
                f"{fmt(r.get('model_loads_per_s'))} | {100 * r['client_cpu_share_of_one_core']:.0f} | {eng_s} |")
    return "\n".join(lines)


def overload_table(runs: list[dict], factor: int) -> str:
    head = (f"| tokens | app | client | sat. conc | {factor}x conc | peak ok/s | goodput ok/s | goodput/peak | 429 % "
            "| 503 % | shed p50 ms | shed p99 ms | shed p99 after 1st s | accepted p99 ms | p99 at sat. ms | ratio "
            "| Retry-After p50/max s | client CPU % |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for run in runs:
        for app, ov in run["overload"].items():
            if not good(ov):
                lines.append(f"| {run['tokens']} | {app} | error: {ov.get('error', '-')[:80]} |" + " |" * 15)
                continue
            beside = ov.get("beside_reconnecting")
            for client, summary in (("honours Retry-After", ov), ("retries at once", ov.get("immediate_retry")),
                                    (f"honours Retry-After, beside {beside['overload']['reconnecting']['clients']} "
                                     "reconnecting at once" if beside else "", beside)):
                if summary is None:
                    continue
                o, ref = summary["overload"], summary["at_saturation"]
                given = o.get("retry_after_s")
                retry = f"{given['p50']:g}/{given['max']:g}" if given else "-"
                lines.append(
                    f"| {run['tokens']} | {app} | {client} | {ref['concurrency']} | {o['concurrency']} | "
                    f"{summary['peak_ok_per_s']:.1f} | {o['ok_per_s']:.1f} | {fmt(summary['goodput_over_peak'], 2)} | "
                    f"{100 * o['share_429']:.1f} | {100 * o['share_503']:.1f} | {fmt(o['shed_p50_ms'])} | "
                    f"{fmt(o['shed_p99_ms'])} | {fmt(o.get('shed_p99_later_ms'))} | {fmt(o['ok_p99_ms'])} | "
                    f"{fmt(ref['ok_p99_ms'])} | "
                    f"{fmt(summary['accepted_p99_over_saturation_p99'], 2)} | {retry} | "
                    f"{100 * o['client_cpu_share_of_one_core']:.0f} |")
    return "\n".join(lines)


def targets_table(targets: list[dict]) -> str:
    lines = ["| tokens | target | measured | bound | met |", "|---|---|---|---|---|"]
    for t in targets:
        nd = 2 if t["unit"] == "x" else 1
        met = {True: "yes", False: "NO", None: "-"}[t["met"]]
        lines.append(f"| {t['tokens']} | {t['target']} | {fmt(t['measured'], nd)} {t['unit']} | "
                     f"{fmt(t['bound'], nd)} {t['unit']} | {met} |")
    return "\n".join(lines)


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(6.5 * len(runs), 4.8), squeeze=False)
    colors = {"floor": "tab:gray", "polyhead": "tab:blue", "proxied": "tab:cyan", "multiplexed": "tab:red"}
    for ax, run in zip(axes[0], runs):
        for app, color in colors.items():
            pts = [(lv[app]["ok_per_s"], lv[app]["p50_ms"], lv[app]["p99_ms"], lv["concurrency"])
                   for lv in run["levels"] if good(lv.get(app)) and lv[app]["ok_per_s"] and lv[app]["p99_ms"]]
            if not pts:
                continue
            x, p50, p99, c = zip(*pts)
            ax.plot(x, p50, "o-", color=color, label=f"{app} p50")
            ax.plot(x, p99, "s--", color=color, label=f"{app} p99")
            for xi, yi, ci in zip(x, p99, c):
                ax.annotate(f"c={ci}", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
        for app, ov in run["overload"].items():
            if good(ov) and ov["overload"]["ok_p99_ms"] is not None:
                o = ov["overload"]
                ax.plot([o["ok_per_s"]], [o["ok_p99_ms"]], "*", ms=12, color=colors.get(app, "k"),
                        label=f"{app} accepted p99 at c={o['concurrency']} (overload)")
        ax.set_xscale("symlog", linthresh=1)
        ax.set_yscale("log")
        ax.set_xlabel("goodput (200 answers/s)")
        ax.set_ylabel("latency (ms)")
        ax.set_title(f"{run['tokens']}-token inputs, 64 LoRA adapters")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("serve_load: closed-loop latency vs throughput (127.0.0.1)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_report(report: dict, out: Path, client: str) -> None:
    s = report["settings"]
    parts = [f"# serve_load ({report['date']})\n",
             f"Closed loop on 127.0.0.1, {s['duration_s']} s per level, app and input length, client `{client}` "
             f"(overload: `py`); {s['adapters']} random LoRA r=16 adapters (all encoder linears, 2-label head), "
             f"{s['routes']}; {report['machine']['cpus']} CPUs shared by server and client. "
             f"Entry: {s.get('entry', 'proxy')}. floor = same Ingress, stub model; proxied = the polyhead app "
             "through Ray Serve's proxy; multiplexed = @serve.multiplexed(max_num_models_per_replica=8), one PEFT model per "
             "adapter, as many replicas and threads as polyhead's model; engine = Engine.infer in-process, a torch "
             "thread per core, at polyhead's mean batch size x its mean replicas computing (one engine doing all "
             "the work). "
             f"App config: `{json.dumps(s['app_config'])}`.\n"]
    for run in report["runs"]:
        parts.append(f"## {run['tokens']}-token inputs\n\n{level_table(run)}\n")
    parts.append(f"## Overload ({s['overload_factor']}x the saturating concurrency, py client; targets use the "
                 "run whose clients honour Retry-After)\n\n"
                 f"{overload_table(report['runs'], s['overload_factor'])}\n")
    parts.append(f"## Targets (serving issue)\n\n{targets_table(report['targets'])}\n")
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve_load.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "serve_load.md").write_text("\n".join(parts))
    try:
        plot(report["runs"], out / "serve_load.png")
    except Exception as exc:  # noqa: BLE001 - the tables matter more
        print(f"no plot: {exc}")


# main -----------------------------------------------------------------------------------------
