"""Generation throughput of polyhead's engine on a real causal base, beside transformers and PEFT.

SmolLM2-135M-Instruct (serving.bases.ensure_base), CPU, torch threads 2, greedy, EOS ignored.
Adapters: random PEFT LoRA r=16, alpha=32 on q/k/v/o_proj (A ~ N(0, 1/d_in), B ~ N(0, 0.02^2), so each one
changes the output), written with save_pretrained into a temporary folder.

(a) 32 rows x 32-token prompts x 64 new tokens, row i on adapter a{i}, per dtype (float32 and a 16-bit one):
    polyhead_32_adapters  Engine.generate, every row its own adapter
    polyhead_base         Engine.generate, adapter=None
    transformers_base     model.generate, one static batch of 32
    peft_mixed            PeftModel.generate(adapter_names=[...]) with the 32 adapters loaded
    peft_set_adapter_loop set_adapter + generate of batch 1 per adapter (a rate; measured on 8 adapters)
    An item still running after its cap (dtype's --cap) stops once its prefill and 3 decode steps are done;
    its time is projected as prefill + (new - 1) x median decode step, and marked "cut".
(b) batch-1 greedy decode of the base: polyhead's median gen.step() time (decode steps only) against the
    weight-read floor (weight bytes / memory read bandwidth of x.sum() over 1 GiB, best of 5) and
    transformers' own batch-1 generate.
(c) continuous batching, in a child process (its own peak RSS): Poisson arrivals, log-uniform prompt and output
    lengths, 64 adapters with Zipf(1) popularity; polyhead's incremental loop (add what has arrived, step)
    against the same requests as static batches of 32 in arrival order (a batch starts when its 32nd request
    has arrived and the previous batch is done; each batch is Engine.generate's own loop). Both in real time.
Timings are reported, never asserted. The machine may be shared: each item records the CPU share other
processes took while it ran (from /proc/stat minus this process's own CPU time).

    .venv/bin/python benchmarks/generate_throughput.py [--quick] [--dtypes float32,auto] [--parts a,b,c]
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
BASE = "smollm2-135m-instruct"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
B_STD = 0.02
THREADS = 2
GOALS = {"polyhead_32_adapters / transformers_base": 0.85, "polyhead_32_adapters / polyhead_base": 0.9,
         "polyhead_32_adapters / peft_mixed": 3.0}


@dataclass(frozen=True)
class Sizes:
    rows: int = 32  # (a)
    prompt: int = 32
    new: int = 64
    loop_adapters: int = 8
    rounds: int = 3  # interleaved polyhead rounds (routing cost side by side)
    b_prompt: int = 16  # (b)
    b_new: int = 128
    requests: int = 64  # (c)
    rate: float = 4.0  # requests per second
    min_len: int = 16
    max_len: int = 256
    max_total: int = 1024
    adapters_c: int = 64
    static_batch: int = 32


# asked for (c): 256 requests, lengths 16..512 (~36k prompt + ~36k generated tokens); on 2 shared AVX2 cores its
# two modes alone would take about 25 minutes
ASKED_C = {"requests": 256, "max_len": 512}
QUICK = Sizes(rows=4, prompt=32, new=8, loop_adapters=2, rounds=1, b_new=16, requests=16, rate=8.0, max_len=32, adapters_c=8,
              static_batch=8)


from generate_machine import CpuWatch, machine, peak_rss, quiet, quietest, read_bandwidth, timed, wait_for_quiet  # noqa: E402
from generate_report import plot, tables  # noqa: E402


# ---------------------------------------------------------------- models, adapters, prompts


def base_folder() -> str:
    from serving.bases import ensure_base

    return str(ensure_base(BASE))


def hf_model(dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base_folder(), dtype=dtype).eval().requires_grad_(False)


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())  # tied embeddings counted once


def make_adapters(root: Path, count: int, seed: int) -> list[Path]:
    """`count` random LoRA adapters from one PEFT model, its lora weights re-drawn (seeded) before each save."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(hf_model(torch.float32), LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32,
                                                               target_modules=TARGETS))
    lora = [(n, p) for n, p in model.named_parameters() if "lora_" in n]
    if len(lora) != 2 * len(TARGETS) * model.config.num_hidden_layers:
        raise RuntimeError(f"unexpected LoRA parameters: {len(lora)}")
    dirs = []
    for i in range(count):
        gen = torch.Generator().manual_seed(seed + i)
        with torch.no_grad():
            for name, p in lora:
                if "lora_A" in name:  # [r, d_in]
                    p.normal_(0.0, p.shape[1] ** -0.5, generator=gen)
                else:  # [d_out, r]
                    p.normal_(0.0, B_STD, generator=gen)
        dirs.append(root / f"a{i}")
        model.save_pretrained(dirs[-1])
    return dirs


def token_pool(tokenizer, vocab: int) -> np.ndarray:
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    return np.array([i for i in range(vocab) if i not in special])


def engine(dtype: str, dirs: list[Path], max_slots: int = 64):
    from serving import Engine

    eng = Engine.from_pretrained(base_folder(), device="cpu", dtype=dtype, max_slots=max_slots, kv_tokens=8192,
                                 kv_block_size=16, max_step_tokens=512, max_running=256)
    for i, d in enumerate(dirs):
        eng.load_adapter(f"a{i}", str(d))
    return eng


# ---------------------------------------------------------------- (a) one batch, five ways


class Cut(Exception):
    pass


@dataclass
class Run:
    seconds: float  # measured wall time
    tokens: list[list[int]]  # generated ids per row (fewer than asked when cut)
    prefill_s: float | None = None  # until every row had its first token
    step_s: float | None = None  # median decode step after that
    cut: bool = False

    def full_seconds(self, new: int) -> float:
        """Measured, or for a cut run: prefill + (new - 1) x median decode step."""
        return self.prefill_s + (new - 1) * self.step_s if self.cut else self.seconds


def summarize_steps(stamps: list[float], first_all: int) -> tuple[float, float | None]:
    """stamps: seconds since start after each step; first_all: the step after which every row had a token."""
    decode = np.diff(stamps[first_all:])
    return stamps[first_all], float(np.median(decode)) if len(decode) else None


def polyhead_run(eng, prompts: list[list[int]], names: list, new: int, cap: float) -> Run:
    """Engine.generate, with gen.step wrapped (on the instance) to stamp each step and stop at the cap."""
    from serving import Request, SamplingParams

    reqs = [Request(adapter=n, input_ids=p, max_new_tokens=new, sampling=SamplingParams(ignore_eos=True))
            for n, p in zip(names, prompts)]
    gen = eng.generator()
    step, stamps, started, first_all = gen.step, [], set(), [None]
    out: dict[int, list[int]] = {}

    def stamped():
        updates = step()
        stamps.append(time.perf_counter() - t0)
        for u in updates:
            out.setdefault(u.seq.id, []).extend(u.tokens)
            if u.tokens:
                started.add(u.seq.id)
        if first_all[0] is None and len(started) == len(reqs):
            first_all[0] = len(stamps) - 1
        if first_all[0] is not None and stamps[-1] > cap and len(stamps) - first_all[0] > 3:
            raise Cut()
        return updates

    gen.step = stamped
    t0 = time.perf_counter()
    try:
        results = eng.generate(reqs)
        cut = False
    except Cut:
        results, cut = None, True
    finally:
        del gen.step
    seconds = time.perf_counter() - t0
    if results is not None:
        bad = [r.error for r in results if r.error]
        if bad or any(len(r.token_ids) != new for r in results):
            raise RuntimeError(f"polyhead: {len(bad)} rows failed ({bad[:1]}) or came short")
        tokens = [r.token_ids for r in results]
    else:
        tokens = [out[k] for k in sorted(out)]
    prefill, step_s = summarize_steps(stamps, first_all[0])
    return Run(seconds, tokens, prefill, step_s, cut)


def stamps_criterion(cap: float):
    """A transformers StoppingCriteria: stamps each generated token; stops every row once past the cap."""
    from transformers import StoppingCriteria

    class Stamps(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            self.stamps.append(time.perf_counter() - self.t0)
            stop = self.stamps[-1] > cap and len(self.stamps) > 3
            return torch.full((input_ids.shape[0],), stop, dtype=torch.bool)

    crit = Stamps()
    crit.t0, crit.stamps = time.perf_counter(), []
    return crit


def hf_run(model, prompts: list[list[int]], new: int, cap: float, pad: int, **kwargs) -> Run:
    from transformers import StoppingCriteriaList

    ids = torch.tensor(prompts)  # [rows, prompt]: equal lengths, no padding
    stamps = stamps_criterion(cap)
    with torch.inference_mode():
        seconds, out = timed(lambda: model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new,
            min_new_tokens=new, pad_token_id=pad, stopping_criteria=StoppingCriteriaList([stamps]), **kwargs))
    tokens = out[:, ids.shape[1]:].tolist()
    prefill, step_s = summarize_steps(stamps.stamps, 0)
    return Run(seconds, tokens, prefill, step_s, cut=len(tokens[0]) < new)


def loop_run(model, prompts, names, new: int, cap: float, pad: int) -> Run:
    """set_adapter + batch-1 generate per adapter, until done or past the cap (then fewer adapters: a rate)."""
    t0, tokens = time.perf_counter(), []
    for name, prompt in zip(names, prompts):
        model.set_adapter(name)
        tokens += hf_run(model, [prompt], new, cap=float("inf"), pad=pad).tokens
        if time.perf_counter() - t0 > cap:
            break
    return Run(time.perf_counter() - t0, tokens, cut=len(tokens) < len(names))


def peft_model(dtype: torch.dtype, dirs: list[Path]):
    from peft import PeftModel

    model = PeftModel.from_pretrained(hf_model(dtype), str(dirs[0]), adapter_name="a0")
    for i, d in enumerate(dirs[1:], start=1):
        model.load_adapter(str(d), adapter_name=f"a{i}")
    return model.eval()


def bench_a(label: str, dtype: str, dirs: list[Path], prompts, sz: Sizes, cap: float, pad: int, wait: float) -> dict:
    names = [f"a{i}" for i in range(sz.rows)]
    tdtype = getattr(torch, dtype)
    items: dict[str, dict] = {}
    runs: dict[str, Run] = {}

    def item(name: str, fn, warm, tokens_total: int):
        warm()  # a tiny run first: lazy initialisation is not timed
        run, others, tries = quietest(fn, wait)
        runs[name] = run
        made = sum(len(t) for t in run.tokens)
        tps = made / run.seconds if name == "peft_set_adapter_loop" else tokens_total / run.full_seconds(sz.new)
        steady = tokens_total / (run.prefill_s + (sz.new - 1) * run.step_s) if run.step_s else None
        items[name] = {"tokens_per_s": tps, "tokens_per_s_steady": steady, "seconds": run.seconds,
                       "generated": made, "cut": run.cut,
                       "projected_seconds": run.full_seconds(sz.new) if run.cut and run.step_s else None,
                       "prefill_s": run.prefill_s, "decode_step_ms": None if run.step_s is None else 1e3 * run.step_s,
                       "others_cpu_share": others, "others_cpu_share_per_try": tries}
        note = (" (cut: projected)" if run.step_s else " (cut)") if run.cut else ""
        print(f"  [{label}] {name}: {tps:,.1f} tok/s{note}, {run.seconds:.1f}s, prefill "
              f"{run.prefill_s or 0:.2f}s, step {items[name]['decode_step_ms'] or 0:.0f} ms, "
              f"others' CPU {items[name]['others_cpu_share']:.0%}", flush=True)

    total = sz.rows * sz.new
    t0 = time.perf_counter()
    eng = engine(dtype, dirs[:sz.rows])
    print(f"  [{label}] engine + {sz.rows} adapters loaded in {time.perf_counter() - t0:.1f}s", flush=True)
    item("polyhead_32_adapters", lambda: polyhead_run(eng, prompts, names, sz.new, cap),
         lambda: polyhead_run(eng, prompts[:2], names[:2], 2, cap), total)
    item("polyhead_base", lambda: polyhead_run(eng, prompts, [None] * sz.rows, sz.new, cap),
         lambda: polyhead_run(eng, prompts[:2], [None] * 2, 2, cap), total)
    # this machine's speed drifts by tens of percent within minutes: the routing cost is also measured in rounds that
    # alternate the two runs back to back, as the median of the per-round ratios of steady tokens/s
    per_round = []
    for _ in range(sz.rounds):
        with_adapters = polyhead_run(eng, prompts, names, sz.new, cap)
        base_only = polyhead_run(eng, prompts, [None] * sz.rows, sz.new, cap)
        steady = [total / (r.prefill_s + (sz.new - 1) * r.step_s) for r in (with_adapters, base_only)]
        per_round.append(steady[0] / steady[1])
    interleaved = {"per_round": per_round, "median": statistics.median(per_round), "target": 0.9}
    print(f"  [{label}] polyhead_32_adapters / polyhead_base, interleaved rounds: "
          f"{', '.join(f'{x:.2f}' for x in per_round)} (median {interleaved['median']:.2f})", flush=True)
    kv = {"kv_bytes_per_token": eng.generator().cache.bytes_per_token(), "kv_bytes": eng.generator().cache.nbytes(),
          "slot_bytes": eng.stats()["slot_bytes"]}
    eng = None  # freed before the next model loads
    gc.collect()
    model = hf_model(tdtype)
    item("transformers_base", lambda: hf_run(model, prompts, sz.new, cap, pad),
         lambda: hf_run(model, prompts[:2], 2, cap, pad), total)
    model = None
    gc.collect()
    pm = peft_model(tdtype, dirs[:sz.rows])
    item("peft_mixed", lambda: hf_run(pm, prompts, sz.new, cap, pad, adapter_names=names),
         lambda: hf_run(pm, prompts[:2], 2, cap, pad, adapter_names=names[:2]), total)
    loop_names = names[:sz.loop_adapters]
    item("peft_set_adapter_loop", lambda: loop_run(pm, prompts, loop_names, sz.new, cap, pad),
         lambda: loop_run(pm, prompts[:1], loop_names[:1], 2, cap, pad), 0)
    pm = None
    gc.collect()
    return {"dtype": dtype, "label": label, "cap_s": cap, "items": items, "ratios": ratios(items),
            "routing_interleaved": interleaved, **kv,
            "agreement": agreement(runs)}


def ratios(items: dict) -> dict:
    """value: of tokens/s as measured (projected where cut); steady: of prefill + (new - 1) x median step,
    which a burst of other processes' work moves less."""
    out = {}
    for key, goal in GOALS.items():
        a, b = (items[n] for n in key.split(" / "))
        value = a["tokens_per_s"] / b["tokens_per_s"]
        steady = a["tokens_per_s_steady"] / b["tokens_per_s_steady"]
        out[key] = {"value": value, "steady": steady, "target": goal, "met": value >= goal,
                    "met_steady": steady >= goal}
    return out


def agreement(runs: dict[str, Run]) -> dict:
    """Greedy token agreement between runs that should match (rows compared over their common length)."""
    def same(a: str, b: str) -> dict:
        x, y = runs[a].tokens, runs[b].tokens
        pairs = list(zip(x, y))
        prefix = [next((k for k, (p, q) in enumerate(zip(r, s)) if p != q), min(len(r), len(s))) for r, s in pairs]
        return {"rows": len(pairs), "rows_identical": sum(r[:len(s)] == s[:len(r)] for r, s in pairs),
                "mean_common_prefix": float(np.mean(prefix))}

    return {"polyhead_base vs transformers_base": same("polyhead_base", "transformers_base"),
            "polyhead_32_adapters vs peft_mixed": same("polyhead_32_adapters", "peft_mixed"),
            "peft_set_adapter_loop vs peft_mixed": same("peft_set_adapter_loop", "peft_mixed"),
            "polyhead_32_adapters vs polyhead_base (should differ)": same("polyhead_32_adapters", "polyhead_base")}


# ---------------------------------------------------------------- (b) batch-1 decode against the floor


def linear_pass(model) -> float:
    """Seconds of F.linear at batch 1 over every Linear weight of the model (the LM head included), best of 5:
    what torch's own kernels take to stream the weights, without attention, norms or Python around them."""
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    xs = {w.shape[1]: torch.randn(1, w.shape[1], dtype=w.dtype) for w in weights}

    def one_pass():
        for w in weights:
            torch.nn.functional.linear(xs[w.shape[1]], w)

    with torch.inference_mode():
        one_pass()
        return min(timed(one_pass)[0] for _ in range(5))


def bench_b(prompt: list[int], sz: Sizes, pad: int, wait: float) -> dict:
    from serving import Request, SamplingParams

    wait_for_quiet(wait)
    bandwidths = [read_bandwidth()]  # again after the decodes: the best of both is the floor's
    eng = engine("float32", [])
    wbytes = weight_bytes(eng.model)
    gen = eng.generator()

    def decode(new: int) -> list[float]:
        gen.add(Request(input_ids=prompt, max_new_tokens=new, sampling=SamplingParams(ignore_eos=True)))
        return [timed(gen.step)[0] for _ in iter(gen.has_work, False)]  # each step's seconds; [0] the prefill

    decode(4)
    steps, poly_others, _ = quietest(lambda: decode(sz.b_new), wait)
    poly = float(np.median(steps[1:]))
    eng = gen = None
    gc.collect()
    model = hf_model(torch.float32)
    hf_run(model, [prompt], 4, float("inf"), pad)
    hf, hf_others, _ = quietest(lambda: hf_run(model, [prompt], sz.b_new, float("inf"), pad), wait)
    matvec = linear_pass(model)
    bandwidths.append(read_bandwidth())
    bandwidth = max(bandwidths)
    floor = wbytes / bandwidth
    out = {"weight_bytes": wbytes, "read_bandwidth_gb_s": bandwidth / 1e9, "floor_ms": 1e3 * floor,
           "read_bandwidth_samples_gb_s": [b / 1e9 for b in bandwidths],
           "polyhead_step_ms": 1e3 * poly, "polyhead_prefill_ms": 1e3 * steps[0],
           "transformers_step_ms": 1e3 * hf.step_s, "transformers_prefill_ms": 1e3 * hf.prefill_s,
           "ratio_to_floor": poly / floor, "target": 1.3, "met": poly / floor <= 1.3,
           "linear_pass_ms": 1e3 * matvec, "polyhead_over_linear_pass": poly / matvec,
           "transformers_ratio_to_floor": hf.step_s / floor, "others_cpu_share_polyhead": poly_others,
           "others_cpu_share_transformers": hf_others}
    print(f"  (b) polyhead {out['polyhead_step_ms']:.1f} ms/token, transformers {out['transformers_step_ms']:.1f}, "
          f"floor {out['floor_ms']:.1f} ({wbytes / 1e6:.0f} MB / {bandwidth / 1e9:.1f} GB/s)", flush=True)
    return out


# ---------------------------------------------------------------- (c) continuous against static batches


def workload(sz: Sizes, pool: np.ndarray, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1.0 / sz.rate, sz.requests))
    lo, hi = np.log(sz.min_len), np.log(sz.max_len + 1)
    zipf = 1.0 / np.arange(1, sz.adapters_c + 1)
    adapters = rng.choice(sz.adapters_c, size=sz.requests, p=zipf / zipf.sum())
    out = []
    for i in range(sz.requests):
        p, o = (int(np.exp(rng.uniform(lo, hi))) for _ in range(2))
        p, o = min(p, sz.max_len), min(o, sz.max_len, sz.max_total - min(p, sz.max_len))
        out.append({"arrival": float(arrivals[i]), "prompt": rng.choice(pool, p).tolist(), "new": o,
                    "adapter": f"a{adapters[i]}"})
    return out


def drive(gen, reqs: list, arrivals: list[float], batches: list[list[int]] | None) -> dict:
    """Real time from the first arrival's clock zero. batches None: continuous (add what has arrived, step);
    else each batch is added once its last request has arrived and the previous batch is done, then stepped
    to the end (Engine.generate's own loop). Returns per-request first-token and finish times."""
    first, finish = [None] * len(reqs), [None] * len(reqs)
    index, busy_steps = {}, []
    t0 = time.perf_counter()

    def step():
        updates = gen.step()
        now = time.perf_counter() - t0
        busy_steps.append(len(updates))
        for u in updates:
            k = index[u.seq.id]
            if u.seq.error:
                raise RuntimeError(f"request {k}: {u.seq.error}")
            if u.tokens and first[k] is None:
                first[k] = now
            if u.finished:
                finish[k] = now

    def wait_until(t: float):
        time.sleep(max(0.0, t - (time.perf_counter() - t0)))

    if batches is None:
        nxt = 0
        while nxt < len(reqs) or gen.has_work():
            now = time.perf_counter() - t0
            while nxt < len(reqs) and arrivals[nxt] <= now:
                index[gen.add(reqs[nxt]).id] = nxt
                nxt += 1
            if gen.has_work():
                step()
            elif nxt < len(reqs):
                wait_until(arrivals[nxt])
    else:
        for batch in batches:
            wait_until(arrivals[batch[-1]])
            for k in batch:
                index[gen.add(reqs[k]).id] = k
            while gen.has_work():
                step()
    return {"first": first, "finish": finish, "steps": len(busy_steps),
            "mean_sampling_rows_per_step": float(np.mean(busy_steps)) if busy_steps else 0.0}


def summarize_c(name: str, run: dict, work: list[dict], seconds: float, others: float) -> dict:
    arr = np.array([w["arrival"] for w in work])
    ttft = np.array(run["first"]) - arr
    e2e = np.array(run["finish"]) - arr
    made = sum(w["new"] for w in work)
    return {"mode": name, "seconds": seconds, "generated": made, "tokens_per_s": made / (max(run["finish"]) - arr.min()),
            "ttft_p50_s": float(np.percentile(ttft, 50)), "ttft_p99_s": float(np.percentile(ttft, 99)),
            "e2e_p50_s": float(np.percentile(e2e, 50)), "e2e_p99_s": float(np.percentile(e2e, 99)),
            "steps": run["steps"], "mean_sampling_rows_per_step": run["mean_sampling_rows_per_step"],
            "others_cpu_share": others}


def bench_c(sz: Sizes, adapters_dir: Path, seed: int, wait: float) -> dict:
    """Child process: one engine (dtype auto), both modes on the same requests."""
    from serving import Request, SamplingParams

    eng = engine("auto", [adapters_dir / f"a{i}" for i in range(sz.adapters_c)])
    pool = token_pool(eng.tokenizer, eng.schema.vocab_size)
    work = workload(sz, pool, seed)
    reqs = [Request(adapter=w["adapter"], input_ids=w["prompt"], max_new_tokens=w["new"],
                    sampling=SamplingParams(ignore_eos=True)) for w in work]
    arrivals = [w["arrival"] for w in work]
    gen = eng.generator()
    gen.generate([replace(reqs[0], max_new_tokens=2)])  # warm-up
    out = {"dtype": str(eng.dtype).removeprefix("torch."), "rate_per_s": sz.rate, "requests": sz.requests,
           "prompt_tokens": sum(len(w["prompt"]) for w in work), "generated_tokens": sum(w["new"] for w in work),
           "last_arrival_s": arrivals[-1], "adapters_used": len({w["adapter"] for w in work})}
    modes = {}
    for name, batches in (("continuous", None),
                          ("static_32", [list(range(i, min(i + sz.static_batch, sz.requests)))
                                         for i in range(0, sz.requests, sz.static_batch)])):
        pre = gen.scheduler.preemptions
        wait_for_quiet(wait)
        watch = CpuWatch()
        seconds, run = timed(lambda: drive(gen, reqs, arrivals, batches))
        modes[name] = summarize_c(name, run, work, seconds, watch.others())
        modes[name]["preemptions"] = gen.scheduler.preemptions - pre
        m = modes[name]
        print(f"  (c) {name}: {m['tokens_per_s']:.1f} tok/s over {seconds:.0f}s, TTFT p50 {m['ttft_p50_s']:.1f}s "
              f"p99 {m['ttft_p99_s']:.1f}s, {m['mean_sampling_rows_per_step']:.1f} rows/step, "
              f"{m['preemptions']} preemptions, others' CPU {m['others_cpu_share']:.0%}", flush=True)
    wbytes = weight_bytes(eng.model)
    out.update(modes=modes, kv_bytes_per_token=gen.cache.bytes_per_token(), kv_bytes=gen.cache.nbytes(),
               kv_tokens=gen.cache.num_tokens, slot_bytes=eng.stats()["slot_bytes"], weight_bytes=wbytes,
               peak_rss_bytes=peak_rss(), peak_rss_over_weights=peak_rss() / wbytes)
    return out


def run_child_c(sz: Sizes, adapters_dir: Path, seed: int, wait: float) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd = [sys.executable, __file__, "--child-c", f.name, "--adapters-dir", str(adapters_dir),
               "--sizes", json.dumps(asdict(sz)), "--seed", str(seed), "--quiet-wait", str(wait)]
        subprocess.run(cmd, check=True)
        return json.loads(Path(f.name).read_text())


# ---------------------------------------------------------------- main


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run (small sizes); writes to a temp folder")
    ap.add_argument("--dtypes", default="float32,auto",
                    help="dtypes of (a); 'auto' is serving.engine.auto_dtype('cpu'), bfloat16 where that is float32")
    ap.add_argument("--parts", default="a,b,c")
    ap.add_argument("--cap", type=float, default=180.0, help="seconds an (a) item may run in float32 before it is cut")
    ap.add_argument("--cap16", type=float, default=40.0,
                    help="the same for a 16-bit dtype (emulated, slow on CPUs without AVX512-BF16/AMX)")
    ap.add_argument("--requests", type=int, help=f"(c) requests (default {Sizes.requests})")
    ap.add_argument("--rate", type=float, help=f"(c) arrivals per second (default {Sizes.rate})")
    ap.add_argument("--max-len", type=int, help=f"(c) longest prompt and output (default {Sizes.max_len})")
    ap.add_argument("--quiet-wait", type=float, default=6.0,
                    help="before each timed item, wait up to this many seconds for other processes to go quiet")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help=f"results folder (default {RESULTS_DIR})")
    ap.add_argument("--child-c", help=argparse.SUPPRESS)
    ap.add_argument("--adapters-dir", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--sizes", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    sz = QUICK if args.quick else Sizes()
    for key in ("requests", "rate", "max_len"):
        if getattr(args, key) is not None:
            sz = replace(sz, **{key: getattr(args, key)})
    args.sizes_obj = Sizes(**json.loads(args.sizes)) if args.sizes else sz
    args.out = args.out or (Path(tempfile.gettempdir()) / "polyhead-generate-quick" if args.quick else RESULTS_DIR)
    return args


def resolve_dtypes(spec: str) -> list[tuple[str, str]]:
    from serving.engine import auto_dtype

    out = []
    for d in spec.split(","):
        if d == "auto":
            auto = auto_dtype("cpu")
            if auto == "float32":
                out.append(("bfloat16", "bfloat16 (explicit: auto picks float32 on this CPU)"))
            else:
                out.append((auto, f"{auto} (auto)"))
        else:
            out.append((d, d))
    seen = set()
    return [x for x in out if not (x[0] in seen or seen.add(x[0]))]


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(THREADS)
    quiet()
    sz = args.sizes_obj
    if args.child_c:
        Path(args.child_c).write_text(json.dumps(bench_c(sz, args.adapters_dir, args.seed, args.quiet_wait)))
        return
    t_start = time.perf_counter()
    parts = args.parts.split(",")
    info = machine()
    notes = [f"auto dtype on this CPU: {info['auto_dtype_cpu']} (ISA: {', '.join(info['isa'])})",
             "others' CPU: share of the machine's CPU time taken by other processes while the item ran "
             "(the 2 cores are shared)",
             "steady tokens/s: rows x new / (prefill + (new - 1) x median decode step); a burst of other processes' "
             "work moves it less than the measured tokens/s"]
    if not args.quick and (sz.requests, sz.max_len) != (ASKED_C["requests"], ASKED_C["max_len"]):
        notes.append(f"(c) reduced from {ASKED_C['requests']} requests, lengths 16..{ASKED_C['max_len']} to "
                     f"{sz.requests} requests, lengths {sz.min_len}..{sz.max_len}, so that the whole run fits about "
                     "15 minutes on this machine")
    print(f"{info['cpu']}, {info['cpu_count']} cores, torch threads {torch.get_num_threads()}; "
          f"auto dtype {info['auto_dtype_cpu']}; sizes {asdict(sz)}", flush=True)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_folder())
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    pool = token_pool(tok, len(tok))
    rng = np.random.default_rng(args.seed)
    prompts = [rng.choice(pool, sz.prompt).tolist() for _ in range(sz.rows)]
    report = {"environment": info, "config": {"args": {k: str(v) for k, v in vars(args).items() if k != "sizes_obj"},
              "sizes": asdict(sz), "lora": {"r": 16, "lora_alpha": 32, "targets": TARGETS, "A_std": "1/sqrt(d_in)",
                                            "B_std": B_STD}, "goals": GOALS}, "notes": notes}
    with tempfile.TemporaryDirectory(prefix="polyhead-gen-adapters-") as tmp:
        count = max(sz.rows if "a" in parts else 0, sz.adapters_c if "c" in parts else 0)
        secs, dirs = timed(lambda: make_adapters(Path(tmp), count, args.seed))
        print(f"made {count} adapters in {secs:.1f}s", flush=True)
        if "a" in parts:
            report["a"] = []
            for dtype, label in resolve_dtypes(args.dtypes):
                cap = args.cap if dtype == "float32" else args.cap16
                report["a"].append(bench_a(label, dtype, dirs, prompts, sz, cap, pad, args.quiet_wait))
                if any(it["cut"] for it in report["a"][-1]["items"].values()):
                    notes.append(f"(a) {label}: items marked cut ran past {cap:.0f}s; a batch item's tokens/s is "
                                 "projected from its prefill and median decode step, the loop's is its rate over "
                                 "the adapters it finished")
        if "b" in parts:
            report["b"] = bench_b(rng.choice(pool, sz.b_prompt).tolist(), sz, pad, args.quiet_wait)
        if "c" in parts:
            report["c"] = run_child_c(sz, Path(tmp), args.seed, args.quiet_wait)
    report["wall_seconds"] = time.perf_counter() - t_start
    notes.append(f"whole run {report['wall_seconds'] / 60:.1f} min")
    md = tables(report)
    report["markdown"] = md
    print("\n" + md)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "generate_throughput.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "generate_throughput.md").write_text(
        f"# generate_throughput ({info['date']}, {info['cpu']}, {THREADS} threads)\n\n" + md)
    plot(report, args.out / "generate_throughput.png")
    print(f"wrote {args.out}/generate_throughput.{{json,md,png}}")


if __name__ == "__main__":
    main()
