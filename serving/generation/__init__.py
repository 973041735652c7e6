"""Generation on causal LM bases: continuous batching over a paged KV cache, every adapter kind per row.

Path of a sequence: Generator.add (validate, tokenize) -> Scheduler (waiting -> running while the
KV budget has room; preempted by recompute when it runs out) -> one step = one forward of the
frozen base over every running sequence's new tokens (serving/generation/step.py; paged attention
in serving/generation/paged.py) -> sampling.py (per-row sampling) -> detok.py (text and stop strings).
"""
