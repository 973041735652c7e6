"""How fast is one batch that mixes every adapter kind, and what does multi-task fan-out save?

On the real all-MiniLM-L6-v2 base (CPU, fp32), side by side in one run (round-robin repetitions):
  base              plain BertModel forward on 256 rows x 32 tokens, no adapter
  polyhead_lora     serving.Engine: 256 rows, each its own LoRA adapter (r=16, query/key/value/every dense)
  polyhead_kinds    serving.Engine: 256 rows, all distinct adapters: 64 LoRA (as above), 64 AdapterHub
                    seq_bn bottlenecks (reduction 16), 64 IA3 (key/value out, output.dense in),
                    32 prompt tuning (10 virtual tokens), 32 prefix tuning (10 prefix tokens)
  multitask_fanout  64 inputs x 3 head-only adapters sent as one call of 192 rows (the body runs once per input)
  multitask_calls   the same 3 x 64 rows as 3 separate calls, one per adapter

x base = base median / variant median. FLOP-adjusted: prompt rows process 42 positions instead of 32 and
prefix rows attend over 10 more keys, by their nature; "x base, FLOP-adj." divides each variant's time by
the base model's FLOPs for the same sequence lengths (linear layers + attention, adapters excluded), i.e.
(base s / base FLOPs) / (variant s / variant FLOPs). Timings are reported, never asserted.

    .venv/bin/python benchmarks/mixed_kinds.py [--reps 5] [--quick] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from engine_throughput import (RESULTS_DIR, Variant, base_dir, environment, forward_variant, load_base,  # noqa: E402
                               polyhead_embeddings, quiet_libraries, time_interleaved, use_all_cores)

LORA_TARGETS = ("query", "key", "value", "dense")


def make_kinds(root: Path, schema, counts: dict[str, int], virtual: int) -> list[tuple[str, Path]]:
    from tests.adapter_factory import make_bottleneck, make_ia3, make_lora, make_prefix, make_prompt

    out, seed = [], 0
    for kind, n in counts.items():
        for i in range(n):
            seed += 1
            folder = root / f"{kind}{i}"
            if kind == "lora":
                make_lora(folder, schema, seed=seed, r=16, alpha=32, targets=LORA_TARGETS)
            elif kind == "bottleneck":
                make_bottleneck(folder, schema, seed=seed, arch="seq_bn", reduction_factor=16)
            elif kind == "ia3":
                make_ia3(folder, schema, seed=seed)
            elif kind == "prompt":
                make_prompt(folder, schema, seed=seed, n_virtual=virtual)
            else:
                make_prefix(folder, schema, seed=seed, n_virtual=virtual)
            out.append((f"{kind}{i}", folder))
    return out


def engine_with(adapters: list[tuple[str, Path]]):
    from serving import Engine

    eng = Engine.from_pretrained(base_dir(), device="cpu", dtype="float32", max_slots=max(len(adapters), 1))
    for name, folder in adapters:
        eng.load_adapter(name, folder)
    return eng


def infer_variant(name: str, eng, requests_sets: list[list]) -> Variant:
    def run():
        return [r for requests in requests_sets for r in eng.infer(requests)]

    polyhead_embeddings(run())  # fail before timing if any row errs
    return Variant(name, run, polyhead_embeddings)


def base_flops(config, lengths: list[int], extra_keys: list[int]) -> float:
    """FLOPs of the plain encoder on rows of these lengths (2 per multiply-add; linears + attention)."""
    H, inter, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    total = 0.0
    for n, k in zip(lengths, extra_keys):
        linear = 2 * n * (4 * H * H + 2 * H * inter)
        attn = 2 * 2 * n * (n + k) * H  # QK^T and AV
        total += L * (linear + attn)
    return total


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="smoke run: 32 rows; writes to a temp dir")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    quiet_libraries()
    threads = use_all_cores()
    rows, tokens, virtual = (32, 32, 10) if args.quick else (256, 32, 10)
    counts = {"lora": rows // 4, "bottleneck": rows // 4, "ia3": rows // 4, "prompt": rows // 8, "prefix": rows // 8}
    fan_inputs = rows // 4
    out_dir = args.out or (Path(tempfile.gettempdir()) / "polyhead-bench-quick" if args.quick else RESULTS_DIR)

    from adapters_store import BaseSchema
    from serving import Request

    schema = BaseSchema.from_config_dir(base_dir())
    model = load_base()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, schema.vocab_size, (rows, tokens), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102
    id_lists = ids.tolist()
    with tempfile.TemporaryDirectory(prefix="polyhead-bench-kinds-") as tmp:
        t0 = time.perf_counter()
        kinds = make_kinds(Path(tmp) / "kinds", schema, counts, virtual)
        loras = make_kinds(Path(tmp) / "loras", schema, {"lora": rows}, virtual)
        from tests.adapter_factory import make_lora
        heads = [(f"head{i}", make_lora(Path(tmp) / f"head{i}", schema, seed=900 + i, targets=(), head="SEQ_CLS",
                                        num_labels=3)) for i in range(3)]
        print(f"made {len(kinds) + len(loras) + 3} adapters in {time.perf_counter() - t0:.1f}s", flush=True)
        eng_kinds, eng_lora, eng_heads = engine_with(kinds), engine_with(loras), engine_with(heads)
    kind_requests = [Request(adapter=name, input_ids=row) for (name, _), row in zip(kinds, id_lists)]
    lora_requests = [Request(adapter=name, input_ids=row) for (name, _), row in zip(loras, id_lists)]
    fan = id_lists[:fan_inputs]
    fan_requests = [Request(adapter=name, input_ids=row) for row in fan for name, _ in heads]
    call_requests = [[Request(adapter=name, input_ids=row) for row in fan] for name, _ in heads]
    variants = [
        forward_variant("base", model, ids),
        infer_variant("polyhead_lora", eng_lora, [lora_requests]),
        infer_variant("polyhead_kinds", eng_kinds, [kind_requests]),
        infer_variant("multitask_fanout", eng_heads, [fan_requests]),
        infer_variant("multitask_calls", eng_heads, call_requests),
    ]
    forwards = eng_kinds.forwards
    eng_kinds.infer(kind_requests)
    kinds_forwards = eng_kinds.forwards - forwards
    print(f"{rows} rows x {tokens} tokens, {threads} threads, {args.reps} reps (+{args.warmup} warm-up)", flush=True)
    seconds, _, loadavg = time_interleaved(variants, args.reps, args.warmup)
    med = {k: float(np.median(v)) for k, v in seconds.items()}

    n_prompt, n_prefix = counts["prompt"], counts["prefix"]
    kind_lengths = [tokens] * (rows - n_prompt - n_prefix) + [tokens + virtual] * n_prompt + [tokens] * n_prefix
    kind_keys = [0] * (rows - n_prefix) + [virtual] * n_prefix
    flops = {"base": base_flops(model.config, [tokens] * rows, [0] * rows)}
    flops["polyhead_lora"] = flops["base"]
    flops["polyhead_kinds"] = base_flops(model.config, kind_lengths, kind_keys)
    table = ["| variant | median s | min s | x base | x base, FLOP-adj. |", "|---|---:|---:|---:|---:|"]
    summary = []
    for name in ("base", "polyhead_lora", "polyhead_kinds"):
        raw = med["base"] / med[name]
        adj = raw * flops[name] / flops["base"]
        summary.append({"variant": name, "median_s": med[name], "min_s": min(seconds[name]), "x_base": raw,
                        "x_base_flop_adjusted": adj, "flops": flops[name]})
        table.append(f"| {name} | {med[name]:.4f} | {min(seconds[name]):.4f} | {raw:.2f} | {adj:.2f} |")
    speedup = med["multitask_calls"] / med["multitask_fanout"]
    table.append("")
    table.append(f"multi-task, {fan_inputs} inputs x 3 head-only adapters: one call {med['multitask_fanout']:.4f} s, "
                 f"3 separate calls {med['multitask_calls']:.4f} s: fan-out is {speedup:.2f}x faster")
    table.append(f"the mixed-kind batch ran as {kinds_forwards} forward(s) (rows split by length where padding "
                 "costs more than a forward)")
    text = "\n".join(table)
    print("\n" + text)
    report = {"environment": environment(threads), "config": {"rows": rows, "tokens": tokens, "virtual": virtual,
              "counts": counts, "reps": args.reps, "warmup": args.warmup, "lora_targets": LORA_TARGETS},
              "raw_seconds": seconds, "loadavg_per_rep": loadavg, "summary": summary,
              "multitask": {"inputs": fan_inputs, "heads": 3, "fanout_s": med["multitask_fanout"],
                            "separate_calls_s": med["multitask_calls"], "speedup": speedup},
              "kinds_forwards": kinds_forwards, "markdown": text}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "mixed_kinds.json").write_text(json.dumps(report, indent=1))
    (out_dir / "mixed_kinds.md").write_text(
        f"# mixed_kinds ({report['environment']['date']}, {threads} threads)\n\n{text}\n")
    print(f"wrote {out_dir / 'mixed_kinds.json'} and {out_dir / 'mixed_kinds.md'}")


if __name__ == "__main__":
    main()
