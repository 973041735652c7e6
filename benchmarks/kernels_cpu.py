"""Which CPU implementation of the routed LoRA op (shrink + expand into y) is fastest, per shape?

Candidates, on one linear module (d_in = d_out = 384, MiniLM's width), rows of 32 tokens,
every distinct adapter in its own slot of a pool twice the batch's size (slots not consecutive):
  unrouted       one shared adapter, two plain matmuls: the floor routing cannot beat
  polyhead       serving.kernels.cpu: sorted segments, one bmm per bucket (what the engine runs)
  gather_bmm     gather each row's A and B (per-row weight copies), then bmm
  segment_loop   one mm + addmm per segment (Python loop)
  grouped_mm     torch._grouped_mm over the whole slot stack with per-slot offsets (no gather)
Sweep: distinct adapters 1..256, ranks 4/16/64, total tokens 256..8192. Prints a table,
writes JSON + markdown + a PNG plot (time vs distinct adapters) to benchmarks/results/.

    .venv/bin/python benchmarks/kernels_cpu.py [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from serving.batch import BatchPlan  # noqa: E402
from serving.kernels import cpu  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
D, TOKENS_PER_ROW = 384, 32


def setup(adapters: int, rank: int, tokens: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    rows = tokens // TOKENS_PER_ROW
    S = 2 * adapters
    A = torch.randn(S, rank, D, generator=g) / D**0.5  # [S, r, d_in]
    B = torch.randn(S, D, rank, generator=g) * 0.05  # [S, d_out, r]
    scale = torch.full((S,), 2.0)
    slots = [2 * (i % adapters) + 1 for i in range(rows)]  # odd slots: never one consecutive run
    plan = BatchPlan.build(slots)
    x = torch.randn(rows * TOKENS_PER_ROW, D, generator=g)  # rows already in plan order
    y = torch.zeros(rows * TOKENS_PER_ROW, D)
    return dict(A=A, B=B, scale=scale, ranks=[rank] * S, plan=plan, x=x, y=y, rank=rank)


def unrouted(c):
    u = c["x"] @ c["A"][1].T
    c["y"].addmm_(u, c["B"][1].T, alpha=2.0)


def polyhead(c):
    cpu.add_lora(c["y"], c["x"], c["A"], c["B"], c["scale"], c["ranks"], c["plan"], TOKENS_PER_ROW)


def gather_bmm(c):
    idx = c["plan"].token_slots  # [rows]
    rows = idx.shape[0]
    xs = c["x"].view(rows, TOKENS_PER_ROW, D)
    u = torch.bmm(xs, c["A"][idx].transpose(1, 2)) * c["scale"][idx].view(-1, 1, 1)
    c["y"].view(rows, TOKENS_PER_ROW, D).baddbmm_(u, c["B"][idx].transpose(1, 2))


def segment_loop(c):
    for seg in c["plan"].segments:
        t0, t1 = seg.row0 * TOKENS_PER_ROW, seg.row1 * TOKENS_PER_ROW
        u = c["x"][t0:t1] @ c["A"][seg.slot].T
        c["y"][t0:t1].addmm_(u, c["B"][seg.slot].T, alpha=float(c["scale"][seg.slot]))


def grouped_mm(c):
    if "AT" not in c:  # layouts _grouped_mm wants: [S, d_in, r] and [S, r, d_out]; counted as set-up
        c["AT"] = c["A"].transpose(1, 2).contiguous()
        c["BT"] = c["B"].transpose(1, 2).contiguous()
        counts = torch.zeros(c["A"].shape[0], dtype=torch.int32)
        for seg in c["plan"].segments:
            counts[seg.slot] = (seg.row1 - seg.row0) * TOKENS_PER_ROW
        c["offs"] = torch.cumsum(counts, 0, dtype=torch.int32)
    u = torch._grouped_mm(c["x"], c["AT"], offs=c["offs"])
    c["y"] += torch._grouped_mm(u, c["BT"], offs=c["offs"]) * 2.0


CANDIDATES = [unrouted, polyhead, gather_bmm, segment_loop, grouped_mm]


def dispatcher_choice(plan: BatchPlan) -> str:
    """What serving.kernels.cpu does for this plan's buckets (see cpu._matmul_slots)."""
    picks = set()
    for b in plan.buckets:
        consecutive = b.slots[-1] - b.slots[0] == b.n_seg - 1
        if b.n_seg == 1 or (b.n_seg <= cpu.LOOP_MAX_SEGMENTS and not consecutive):
            picks.add("mm per segment")
        else:
            picks.add("bmm in place" if consecutive else "gather + bmm")
    return " / ".join(sorted(picks))


def timed(fn, c, reps: int) -> float:
    fn(c)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn(c)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def check_agreement(c) -> None:
    """Every routed candidate computes the same y (sanity, not a timing)."""
    outs = []
    for fn in CANDIDATES[1:]:
        c["y"] = torch.zeros_like(c["y"])
        fn(c)
        outs.append(c["y"].clone())
    for fn, out in zip(CANDIDATES[2:], outs[1:]):
        torch.testing.assert_close(out, outs[0], atol=1e-3, rtol=1e-3, msg=lambda m: f"{fn.__name__}: {m}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    adapters_list = [1, 4, 16] if args.quick else [1, 4, 16, 64, 256]
    ranks = [16] if args.quick else [4, 16, 64]
    token_list = [256] if args.quick else [256, 2048, 8192]
    rows = []
    for tokens in token_list:
        for rank in ranks:
            for adapters in adapters_list:
                if adapters > tokens // TOKENS_PER_ROW:
                    continue
                c = setup(adapters, rank, tokens)
                check_agreement(c)
                result = {"tokens": tokens, "rank": rank, "adapters": adapters}
                for fn in CANDIDATES:
                    skip = fn is grouped_mm and adapters * tokens > 64 * 2048  # minutes per call beyond this
                    result[fn.__name__] = None if skip else timed(fn, c, args.reps if fn is not grouped_mm else 1)
                routed = {k: v for k, v in result.items() if k in ("polyhead", "gather_bmm", "segment_loop", "grouped_mm") and v}
                result["fastest"] = min(routed, key=routed.get)
                result["polyhead_path"] = dispatcher_choice(c["plan"])
                rows.append(result)
                print(fmt_row(result), flush=True)
    write(rows)


def fmt_row(r: dict) -> str:
    cells = [f"{r[f.__name__] * 1e3:9.2f}" if r[f.__name__] else f"{'skip':>9}" for f in CANDIDATES]
    return f"{r['tokens']:6d} {r['rank']:4d} {r['adapters']:4d} " + " ".join(cells) + f"  {r['fastest']:13s} {r['polyhead_path']}"


def write(rows: list[dict]) -> None:
    RESULTS.mkdir(exist_ok=True)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "d": D, "tokens_per_row": TOKENS_PER_ROW,
            "date": time.strftime("%Y-%m-%d"), "unit": "seconds (median)"}
    (RESULTS / "kernels_cpu.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    names = [f.__name__ for f in CANDIDATES]
    lines = ["| tokens | rank | adapters | " + " | ".join(f"{n} ms" for n in names) + " | fastest routed | polyhead runs |",
             "|" + "---|" * (len(names) + 5)]
    for r in rows:
        cells = [f"{r[n] * 1e3:.2f}" if r[n] else "skip" for n in names]
        lines.append(f"| {r['tokens']} | {r['rank']} | {r['adapters']} | " + " | ".join(cells)
                     + f" | {r['fastest']} | {r['polyhead_path']} |")
    (RESULTS / "kernels_cpu.md").write_text("\n".join(lines) + "\n")
    plot(rows)


def plot(rows: list[dict]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no PNG")
        return
    tokens = max(r["tokens"] for r in rows)
    fig, axes = plt.subplots(1, 3, figsize=(14, 4), sharey=False)
    for ax, rank in zip(axes, sorted({r["rank"] for r in rows})):
        sel = [r for r in rows if r["tokens"] == tokens and r["rank"] == rank]
        for name in [f.__name__ for f in CANDIDATES]:
            pts = [(r["adapters"], r[name] * 1e3) for r in sel if r[name]]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name)
        ax.set(xscale="log", yscale="log", xlabel="distinct adapters", ylabel="ms", title=f"{tokens} tokens, r={rank}")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "kernels_cpu.png", dpi=90)


if __name__ == "__main__":
    main()
