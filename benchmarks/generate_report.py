"""The report of benchmarks/generate_throughput.py: markdown tables and the PNG."""
from __future__ import annotations

from pathlib import Path

import numpy as np

def f(x, spec: str = ",.1f") -> str:
    return "-" if x is None else format(x, spec)


def tables(report: dict) -> str:
    out = []
    for a in report.get("a", []):
        out += [f"### (a) {report['config']['sizes']['rows']} rows x {report['config']['sizes']['prompt']} prompt "
                f"tokens x {report['config']['sizes']['new']} new, {a['label']}\n",
                "| item | tokens/s | steady tokens/s | seconds | prefill s | decode step ms (median) | cut | "
                "others' CPU |", "|---|---:|---:|---:|---:|---:|---|---:|"]
        for name, it in a["items"].items():
            cut = f"yes (projected {it['projected_seconds']:.0f}s)" if it["cut"] and it["projected_seconds"] else (
                f"yes ({it['generated']} tokens)" if it["cut"] else "")
            out.append(f"| {name} | {f(it['tokens_per_s'])} | {f(it['tokens_per_s_steady'])} | {f(it['seconds'])} | "
                       f"{f(it['prefill_s'], '.2f')} | "
                       f"{f(it['decode_step_ms'], '.0f')} | {cut} | {it['others_cpu_share']:.0%} |")
        out += ["", "| ratio | value (tokens/s) | met | value (steady) | met | target |", "|---|---:|---|---:|---|---:|"]
        for key, r in a["ratios"].items():
            out.append(f"| {key} | {r['value']:.2f} | {'yes' if r['met'] else 'NO'} | {r['steady']:.2f} | "
                       f"{'yes' if r['met_steady'] else 'NO'} | >= {r['target']} |")
        il = a.get("routing_interleaved")
        if il:
            out.append(f"| polyhead_32_adapters / polyhead_base, {len(il['per_round'])} interleaved rounds (median; "
                       f"{', '.join(f'{x:.2f}' for x in il['per_round'])}) | | | {il['median']:.2f} | "
                       f"{'yes' if il['median'] >= il['target'] else 'NO'} | >= {il['target']} |")
        out += ["", "| greedy agreement | rows identical | mean common prefix (tokens) |", "|---|---:|---:|"]
        for key, g in a["agreement"].items():
            out.append(f"| {key} | {g['rows_identical']}/{g['rows']} | {g['mean_common_prefix']:.1f} |")
        out.append("")
    if "b" in report:
        b = report["b"]
        out += ["### (b) batch-1 greedy decode of the base, float32\n",
                "| | ms/token |", "|---|---:|",
                f"| polyhead (median gen.step, decode only; others' CPU {b['others_cpu_share_polyhead']:.0%}) | "
                f"{b['polyhead_step_ms']:.1f} |",
                f"| transformers generate (median step; others' CPU {b['others_cpu_share_transformers']:.0%}) | "
                f"{b['transformers_step_ms']:.1f} |",
                f"| weight-read floor ({b['weight_bytes'] / 1e6:.0f} MB / {b['read_bandwidth_gb_s']:.1f} GB/s) | "
                f"{b['floor_ms']:.1f} |",
                f"| F.linear over every weight, batch 1, nothing else (torch's kernels streaming the weights) | "
                f"{b['linear_pass_ms']:.1f} |",
                f"| polyhead / floor (target <= {b['target']}) | {b['ratio_to_floor']:.2f} "
                f"{'met' if b['met'] else 'NOT met'} |",
                f"| transformers / floor | {b['transformers_ratio_to_floor']:.2f} |",
                f"| polyhead / F.linear pass | {b['polyhead_over_linear_pass']:.2f} |", ""]
    if "c" in report:
        c = report["c"]
        out += [f"### (c) {c['requests']} requests, Poisson {c['rate_per_s']}/s (last arrives at "
                f"{c['last_arrival_s']:.0f}s), {c['prompt_tokens']:,} prompt + {c['generated_tokens']:,} generated "
                f"tokens, {c['adapters_used']} adapters used, {c['dtype']}\n",
                "| mode | tokens/s | TTFT p50 s | TTFT p99 s | e2e p50 s | e2e p99 s | rows/step | preemptions | "
                "wall s | others' CPU |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for m in c["modes"].values():
            out.append(f"| {m['mode']} | {m['tokens_per_s']:.1f} | {m['ttft_p50_s']:.2f} | {m['ttft_p99_s']:.2f} | "
                       f"{m['e2e_p50_s']:.1f} | {m['e2e_p99_s']:.1f} | {m['mean_sampling_rows_per_step']:.1f} | "
                       f"{m['preemptions']} | {m['seconds']:.0f} | {m['others_cpu_share']:.0%} |")
        out += ["", "| memory | bytes |", "|---|---:|",
                f"| KV per token | {c['kv_bytes_per_token']:,} |",
                f"| KV cache (a budget of {c['kv_tokens']:,} tokens) | {c['kv_bytes']:,} |",
                f"| adapter slots | {c['slot_bytes']:,} |", f"| base weights | {c['weight_bytes']:,} |",
                f"| peak RSS of the (c) process | {c['peak_rss_bytes']:,} ({c['peak_rss_over_weights']:.2f}x weights) |",
                ""]
    out += [f"Note: {n}" for n in report["notes"]]
    return "\n".join(out) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    ax = axes[0]
    runs = report.get("a", [])
    names = list(runs[0]["items"]) if runs else []
    width = 0.8 / max(1, len(runs))
    for k, a in enumerate(runs):
        vals = [a["items"][n]["tokens_per_s"] for n in names]
        bars = ax.bar(np.arange(len(names)) + k * width, vals, width, label=a["label"])
        for bar, n in zip(bars, names):
            if a["items"][n]["cut"]:
                ax.annotate("cut", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", fontsize=7)
    ax.set_xticks(np.arange(len(names)) + width * (len(runs) - 1) / 2, [n.replace("_", "\n", 1) for n in names],
                  fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("generated tokens/s")
    ax.set_title("(a) 32 rows x 64 new tokens")
    ax.legend(fontsize=8)
    if "c" in report:
        modes = list(report["c"]["modes"].values())
        x = np.arange(len(modes))
        for k, key in enumerate(("ttft_p50_s", "ttft_p99_s")):
            axes[1].bar(x + k * 0.4, [m[key] for m in modes], 0.4, label=key.replace("_s", "").replace("_", " "))
        axes[1].set_xticks(x + 0.2, [m["mode"] for m in modes])
        axes[1].set_ylabel("seconds")
        axes[1].set_title("(c) time to first token")
        axes[1].legend()
        axes[2].bar(x, [m["tokens_per_s"] for m in modes], color=["C2", "C3"])
        axes[2].set_xticks(x, [m["mode"] for m in modes])
        axes[2].set_ylabel("generated tokens/s")
        axes[2].set_title(f"(c) throughput, {report['c']['requests']} requests")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
