"""How fast are the Triton LoRA kernels on a GPU, against the torch path and the hardware's roofline?

Part 1, one routed LoRA op (shrink then expand into y, in place), d_in = d_out = hidden:
  triton         serving.kernels.triton_lora.add_lora (what the engine runs on CUDA)
  torch_path     serving.kernels.cpu.add_lora: one bmm per bucket of equal-size segments (the torch fallback)
  cublas_shared  two cuBLAS mm's of the same FLOPs for ONE shared adapter: no routing, the floor to beat
Sweep: hidden 4096 and 8192, ranks 8/16/64, tokens 1..4096 (one token per row, as in decode),
distinct adapters 1..256 (row i uses adapter i % n, each adapter in an odd slot of a pool twice
that size, so no bucket is one consecutive run of slots), bf16. Each variant is timed eagerly
(CUDA events around each call: launch overhead included) and replayed from a CUDA graph (GPU
time only); the routed op's compulsory bytes (x, the adapters' A and B, y read and written)
and FLOPs (4 * tokens * hidden * rank) give achieved bandwidth and TFLOP/s against the roofline
(--peak-tbs, --peak-tflops; H200 defaults). Small cases fit in the 50+ MB L2: bandwidth above the
HBM peak means L2 hits.

Part 2, the decode-step overhead: a random-weight Llama-7B-shaped stack (hidden 4096, 32 heads,
MLP 11008, --layers of 32, RMSNorm, SDPA over a 512-token KV cache), batch 64 sequences of one
new token, 64 distinct adapters, r=16 on q/k/v/o (q/k/v share one shrink, as serving/layers.py
does), against the base alone; eager and CUDA-graph replay. Plan metadata is built inside each
eager step, as the engine does once per forward.

Prints a table, writes kernels_gpu.json and kernels_gpu.md to benchmarks/results/ (or --out).
Without CUDA it says so and exits 0. It imports only serving.batch and serving.kernels (not the
serving package's engine), so torch and triton are all it needs. Timings are reported, never asserted.

    PYTHONPATH=. python benchmarks/kernels_gpu.py [--quick] [--reps 25] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DTYPE = torch.bfloat16
DEV = "cuda"  # "cpu" only for --cpu-smoke: tiny shapes under TRITON_INTERPRET=1, to check the script itself


def import_kernels():
    """serving.batch and serving.kernels, without running serving/__init__ (it imports the engine, transformers)."""
    if "serving" not in sys.modules:
        pkg = types.ModuleType("serving")
        pkg.__path__ = [str(ROOT / "serving")]
        sys.modules["serving"] = pkg
    from serving.batch import BatchPlan
    from serving.kernels import cpu, triton_lora

    return BatchPlan, cpu, triton_lora


# ---------------------------------------------------------------- timing


def time_eager(fn, warmup: int, reps: int) -> float:
    """Median seconds per call, CUDA events around each call (includes host launch overhead)."""
    for _ in range(warmup):
        fn()
    if DEV == "cpu":
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return statistics.median(times)
    torch.cuda.synchronize()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in ev:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in ev) / 1e3


def time_graph(fn, warmup: int, reps: int) -> float | None:
    """Median seconds per call replayed from a CUDA graph (GPU time only); None if capture fails."""
    if DEV == "cpu":
        return None
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return time_eager(graph.replay, warmup, reps)
    except Exception as err:  # a benchmark reports, it does not stop
        print(f"  graph capture failed: {type(err).__name__}: {err}", flush=True)
        sync()
        return None


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------- part 1: one routed op


def op_case(BatchPlan, hidden: int, rank: int, tokens: int, adapters: int, seed: int = 0) -> dict:
    g = torch.Generator(device=DEV).manual_seed(seed)
    S = 2 * adapters
    A = torch.randn(S, rank, hidden, generator=g, device=DEV, dtype=DTYPE) / math.sqrt(hidden)  # [S, r, d_in]
    B = torch.randn(S, hidden, rank, generator=g, device=DEV, dtype=DTYPE) * 0.05  # [S, d_out, r]
    scale = torch.full((S,), 2.0, device=DEV, dtype=DTYPE)
    slots = [2 * (i % adapters) + 1 for i in range(tokens)]
    t = time.perf_counter()
    plan = BatchPlan.build(slots, DEV)
    sync()
    plan_s = time.perf_counter() - t
    x = torch.randn(tokens, hidden, generator=g, device=DEV, dtype=DTYPE)  # rows already in plan order
    y = torch.zeros(tokens, hidden, device=DEV, dtype=DTYPE)
    return dict(A=A, B=B, scale=scale, ranks=[rank] * S, plan=plan, x=x, y=y, plan_build_s=plan_s)


def run_ops(BatchPlan, cpu, triton_lora, args) -> list[dict]:
    hiddens = [64] if args.cpu_smoke else [4096] if args.quick else [4096, 8192]
    ranks = [16] if args.quick or args.cpu_smoke else [8, 16, 64]
    token_list = [1, 16] if args.cpu_smoke else [1, 64, 1024] if args.quick else [1, 16, 64, 256, 1024, 4096]
    adapter_list = [1, 8] if args.cpu_smoke else [1, 64] if args.quick else [1, 8, 64, 256]
    rows = []
    header = (f"{'hidden':>6} {'rank':>4} {'tokens':>6} {'adapt':>5} | {'triton':>8} {'graph':>8} | "
              f"{'torch':>8} {'graph':>8} | {'cublas':>8} | {'GB/s':>7} {'TFLOP/s':>7} {'%roof':>5} | {'maxdiff':>7}")
    print("Part 1: one routed LoRA op (us; 'graph' = CUDA-graph replay; rates from the triton graph time)")
    print(header)
    for hidden in hiddens:
        for rank in ranks:
            for tokens in token_list:
                for adapters in adapter_list:
                    if adapters > tokens:
                        continue
                    rows.append(one_op(BatchPlan, cpu, triton_lora, hidden, rank, tokens, adapters, args))
                    print(fmt_op(rows[-1]), flush=True)
                    if DEV == "cuda":
                        torch.cuda.empty_cache()
    return rows


def one_op(BatchPlan, cpu, triton_lora, hidden, rank, tokens, adapters, args) -> dict:
    c = op_case(BatchPlan, hidden, rank, tokens, adapters)
    A, B, scale, ranks, plan, x, y = (c[k] for k in ("A", "B", "scale", "ranks", "plan", "x", "y"))
    A0t, B0t = A[1].T, B[1].T  # one adapter, for the same-FLOPs cuBLAS floor

    def tri():
        triton_lora.add_lora(y, x, A, B, scale, ranks, plan, 1)

    def torch_path():
        cpu.add_lora(y, x, A, B, scale, ranks, plan, 1)

    def cublas():
        y.addmm_(torch.mm(x, A0t), B0t, alpha=2.0)

    # agreement (a sanity check, not a timing): triton against the torch path from y = 0
    y.zero_()
    tri()
    got = y.float().clone()
    y.zero_()
    torch_path()
    want = y.float()
    maxdiff = (got - want).abs().max().item()
    rel = maxdiff / max(want.abs().max().item(), 1e-6)
    t = time.perf_counter()
    fresh = BatchPlan.build([2 * (i % adapters) + 1 for i in range(tokens)], DEV)
    triton_lora.shrink(x, A, [(0, rank)], [scale], [ranks], fresh, 1)  # first use: builds the device tables
    sync()
    first_use_s = time.perf_counter() - t

    out = {"hidden": hidden, "rank": rank, "tokens": tokens, "adapters": adapters,
           "max_abs_diff_vs_torch": maxdiff, "rel_diff_vs_torch": rel,
           "plan_build_s": c["plan_build_s"], "plan_first_use_s": first_use_s}
    for name, fn in (("triton", tri), ("torch_path", torch_path), ("cublas_shared", cublas)):
        out[f"{name}_eager_s"] = time_eager(fn, args.warmup, args.reps)
        out[f"{name}_graph_s"] = time_graph(fn, args.warmup, args.reps)
    elem = torch.finfo(DTYPE).bits // 8
    out["bytes"] = elem * (tokens * hidden + 2 * adapters * rank * hidden + 2 * tokens * hidden)
    out["flops"] = 4 * tokens * hidden * rank
    t_gpu = out["triton_graph_s"] or out["triton_eager_s"]
    out["triton_GBps"] = out["bytes"] / t_gpu / 1e9
    out["triton_TFLOPs"] = out["flops"] / t_gpu / 1e12
    t_roof = max(out["bytes"] / (args.peak_tbs * 1e12), out["flops"] / (args.peak_tflops * 1e12))
    out["roofline_s"] = t_roof
    out["triton_pct_of_roofline"] = 100 * t_roof / t_gpu
    return out


def us(v: float | None) -> str:
    return f"{v * 1e6:8.1f}" if v else f"{'-':>8}"


def fmt_op(r: dict) -> str:
    return (f"{r['hidden']:6d} {r['rank']:4d} {r['tokens']:6d} {r['adapters']:5d} | {us(r['triton_eager_s'])} "
            f"{us(r['triton_graph_s'])} | {us(r['torch_path_eager_s'])} {us(r['torch_path_graph_s'])} | "
            f"{us(r['cublas_shared_graph_s'] or r['cublas_shared_eager_s'])} | {r['triton_GBps']:7.0f} "
            f"{r['triton_TFLOPs']:7.2f} {r['triton_pct_of_roofline']:5.1f} | {r['rel_diff_vs_torch']:7.1e}")


# ---------------------------------------------------------------- part 2: decode step


class DecodeStack:
    """Llama-7B-shaped layers with random weights; LoRA r on q/k/v/o through a kernels module."""

    def __init__(self, layers: int, batch: int, adapters: int, rank: int, ctx: int,
                 hidden: int = 4096, heads: int = 32, inter: int = 11008):
        g = torch.Generator(device=DEV).manual_seed(0)
        kw = dict(device=DEV, dtype=DTYPE)

        def w(*shape, std):
            return torch.randn(*shape, generator=g, **kw) * std

        self.hidden, self.heads, self.rank = hidden, heads, rank
        hd, S = hidden // heads, 2 * adapters
        self.layers = []
        for _ in range(layers):
            L = {n: w(hidden, hidden, std=hidden ** -0.5) for n in ("q", "k", "v", "o")}  # [d_out, d_in]
            L["gate"], L["up"] = w(inter, hidden, std=hidden ** -0.5), w(inter, hidden, std=hidden ** -0.5)
            L["down"] = w(hidden, inter, std=inter ** -0.5)
            L["norm1"], L["norm2"] = torch.ones(hidden, **kw), torch.ones(hidden, **kw)
            L["kc"], L["vc"] = w(batch, heads, ctx, hd, std=1.0), w(batch, heads, ctx, hd, std=1.0)
            L["A_qkv"] = w(S, 3 * rank, hidden, std=hidden ** -0.5)  # q, k, v A's side by side: [S, 3r, d_in]
            L["A_o"] = w(S, rank, hidden, std=hidden ** -0.5)
            for n in ("q", "k", "v", "o"):
                L["B_" + n] = w(S, hidden, rank, std=0.05)  # [S, d_out, r]
                L["s_" + n] = torch.full((S,), 2.0, **kw)
            self.layers.append(L)
        self.ranks = [rank] * S
        self.slots = [2 * (i % adapters) + 1 for i in range(batch)]

    @staticmethod
    def rms(x, weight):
        return torch.nn.functional.rms_norm(x, (x.shape[-1],), weight, 1e-5)

    def step(self, x: torch.Tensor, kern=None, plan=None) -> torch.Tensor:
        """x: [batch, hidden], one new token per sequence; kern=None is the base alone."""
        b, r = x.shape[0], self.rank
        for L in self.layers:
            h = self.rms(x, L["norm1"])
            if kern is None:
                q, k, v = h @ L["q"].T, h @ L["k"].T, h @ L["v"].T
            else:
                us = kern.shrink(h, L["A_qkv"], [(0, r), (r, r), (2 * r, r)], [L["s_q"], L["s_k"], L["s_v"]],
                                 [self.ranks] * 3, plan, 1)
                q, k, v = (kern.linear_expand(h, L[n], None, False, u, L["B_" + n], plan, 1)
                           for n, u in zip("qkv", us))
            L["kc"][:, :, -1] = k.view(b, self.heads, -1)  # the new token's key and value go to the cache's last place
            L["vc"][:, :, -1] = v.view(b, self.heads, -1)
            q = q.view(b, self.heads, 1, -1)
            a = torch.nn.functional.scaled_dot_product_attention(q, L["kc"], L["vc"]).reshape(b, self.hidden)
            if kern is None:
                o = a @ L["o"].T
            else:
                [u] = kern.shrink(a, L["A_o"], [(0, r)], [L["s_o"]], [self.ranks], plan, 1)
                o = kern.linear_expand(a, L["o"], None, False, u, L["B_o"], plan, 1)
            x = x + o
            h = self.rms(x, L["norm2"])
            x = x + (torch.nn.functional.silu(h @ L["gate"].T) * (h @ L["up"].T)) @ L["down"].T
        return x


def run_decode(BatchPlan, cpu, triton_lora, args) -> dict:
    batch, adapters, rank, ctx = (8, 8, 16, 16) if args.cpu_smoke else (64, 64, 16, 512)
    shape = dict(hidden=256, heads=4, inter=512) if args.cpu_smoke else {}
    stack = DecodeStack(args.layers, batch, adapters, rank, ctx, **shape)
    x = torch.randn(batch, stack.hidden, device=DEV, dtype=DTYPE)
    static_plan = BatchPlan.build(stack.slots, DEV)
    variants = {"base": None, "triton": triton_lora, "torch_path": cpu}
    res = {"layers": args.layers, "batch": batch, "adapters": adapters, "rank": rank, "ctx": ctx,
           "targets": "q,k,v,o", "hidden": stack.hidden, "intermediate": shape.get("inter", 11008)}
    outs = {}
    for name, kern in variants.items():
        def eager(kern=kern):  # the engine builds a plan per forward
            plan = BatchPlan.build(stack.slots, DEV) if kern is not None else None
            return stack.step(x, kern, plan)

        outs[name] = eager().float()
        res[f"{name}_eager_s"] = time_eager(eager, args.warmup, args.reps)
        res[f"{name}_graph_s"] = time_graph(lambda kern=kern: stack.step(x, kern, static_plan), args.warmup, args.reps)
    diff = (outs["triton"] - outs["torch_path"]).abs().max().item()
    res["max_abs_diff_triton_vs_torch"] = diff
    res["adapters_change_output"] = bool((outs["triton"] - outs["base"]).abs().max().item() > 0)
    for name in ("triton", "torch_path"):
        for mode in ("eager", "graph"):
            b, v = res[f"base_{mode}_s"], res[f"{name}_{mode}_s"]
            res[f"{name}_{mode}_overhead_pct"] = 100 * (v - b) / b if (b and v) else None
    return res


def print_decode(d: dict) -> None:
    print(f"\nPart 2: decode step, Llama-7B-shaped, {d['layers']} layers, batch {d['batch']}, "
          f"{d['adapters']} adapters, r={d['rank']} on {d['targets']} (ms per step)")
    print(f"{'variant':>10} | {'eager':>8} {'overhead':>8} | {'graph':>8} {'overhead':>8}")
    for name in ("base", "triton", "torch_path"):
        cells = []
        for mode in ("eager", "graph"):
            v, o = d[f"{name}_{mode}_s"], d.get(f"{name}_{mode}_overhead_pct")
            if not v:
                cells.append(f"{'-':>8} {'':>8}")
            else:
                cells.append(f"{v * 1e3:8.3f} " + (f"{o:7.1f}%" if o is not None else f"{'':>8}"))
        print(f"{name:>10} | {cells[0]} | {cells[1]}")
    print(f"triton vs torch path max |diff|: {d['max_abs_diff_triton_vs_torch']:.3g}; "
          f"adapters change the output: {d['adapters_change_output']}")


# ---------------------------------------------------------------- output


def write(out_dir: Path, meta: dict, ops: list[dict], decode: dict | None) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "kernels_gpu.json").write_text(json.dumps({"meta": meta, "ops": ops, "decode": decode}, indent=1))

    def ms(v):
        return f"{v * 1e6:.1f}" if v else "-"

    lines = [f"# Triton LoRA kernels on {meta['device']}", "",
             f"torch {meta['torch']}, triton {meta['triton']}, {meta['dtype']}, roofline {meta['peak_tbs']} TB/s and "
             f"{meta['peak_tflops']} TFLOP/s. Times in microseconds (median); `graph` = CUDA-graph replay "
             "(GPU time), the other = eager with launch overhead. Rates and % of roofline from triton's graph "
             "time.", "",
             "| hidden | rank | tokens | adapters | triton | triton graph | torch path | torch graph "
             "| cuBLAS shared graph | GB/s | TFLOP/s | % roofline | rel diff |", "|" + "---|" * 13]
    for r in ops:
        lines.append(f"| {r['hidden']} | {r['rank']} | {r['tokens']} | {r['adapters']} | {ms(r['triton_eager_s'])} | "
                     f"{ms(r['triton_graph_s'])} | {ms(r['torch_path_eager_s'])} | {ms(r['torch_path_graph_s'])} | "
                     f"{ms(r['cublas_shared_graph_s'] or r['cublas_shared_eager_s'])} | {r['triton_GBps']:.0f} | "
                     f"{r['triton_TFLOPs']:.2f} | {r['triton_pct_of_roofline']:.1f} | {r['rel_diff_vs_torch']:.1e} |")
    if decode:
        lines += ["", f"## Decode step: Llama-7B-shaped, {decode['layers']} layers, batch {decode['batch']}, "
                      f"{decode['adapters']} adapters, r={decode['rank']} on {decode['targets']}", "",
                  "| variant | eager ms | overhead | graph ms | overhead |", "|---|---|---|---|---|"]
        for name in ("base", "triton", "torch_path"):
            cells = []
            for mode in ("eager", "graph"):
                v, o = decode[f"{name}_{mode}_s"], decode.get(f"{name}_{mode}_overhead_pct")
                cells += [f"{v * 1e3:.3f}" if v else "-", f"{o:.1f}%" if o is not None else ""]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    (out_dir / "kernels_gpu.md").write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: hidden 4096, rank 16, few shapes")
    parser.add_argument("--reps", type=int, default=25)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--layers", type=int, default=4, help="decoder layers in the decode-step stack")
    parser.add_argument("--skip-decode", action="store_true")
    parser.add_argument("--peak-tbs", type=float, default=4.8, help="HBM bandwidth, TB/s (H200: 4.8)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 TFLOP/s (H200: ~989)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    # --cpu-smoke checks the script itself (tiny shapes, Triton's interpreter) and measures nothing
    parser.add_argument("--cpu-smoke", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    global DEV, DTYPE
    if args.cpu_smoke:  # tiny shapes in Triton's interpreter (fp16: it computes bf16 dots wrongly)
        os.environ["TRITON_INTERPRET"] = "1"
        DEV, DTYPE, args.layers, args.reps, args.warmup = "cpu", torch.float16, 1, 2, 1
    elif not torch.cuda.is_available():
        print("kernels_gpu: no CUDA device here; this benchmark runs on a GPU machine. Nothing measured.")
        return 0
    try:
        import triton
        BatchPlan, cpu, triton_lora = import_kernels()
    except ImportError as err:
        print(f"kernels_gpu: cannot import the Triton kernels ({err}); install triton (pip install 'polyhead[gpu]').")
        return 1
    t0 = time.perf_counter()
    props = (torch.cuda.get_device_properties(0) if DEV == "cuda"
             else types.SimpleNamespace(name="cpu (smoke run)", multi_processor_count=0))
    meta = {"device": props.name, "sms": props.multi_processor_count, "torch": torch.__version__,
            "triton": triton.__version__, "python": sys.version.split()[0], "dtype": str(DTYPE).removeprefix("torch."),
            "peak_tbs": args.peak_tbs, "peak_tflops": args.peak_tflops, "reps": args.reps, "warmup": args.warmup,
            "date": time.strftime("%Y-%m-%d"), "unit": "seconds (median)"}
    print(f"{props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, triton {triton.__version__}")
    ops = run_ops(BatchPlan, cpu, triton_lora, args)
    decode = None
    if not args.skip_decode:
        decode = run_decode(BatchPlan, cpu, triton_lora, args)
        print_decode(decode)
    meta["wall_s"] = time.perf_counter() - t0
    write(args.out, meta, ops, decode)
    print(f"\nwrote {args.out / 'kernels_gpu.json'} and kernels_gpu.md in {meta['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
