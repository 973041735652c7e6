"""Autoscaling of model replicas on the rows queued at them: a Ray Serve custom autoscaling policy.

Serve's default policy scales on ongoing requests (`target_ongoing_requests` per replica). A polyhead request carries
1 to max_items rows, and a coalesced model call carries several requests, so a 256-row call and a 1-row call count
the same there. What a replica has to work off is rows; the decision here is taken on rows.

Semantics (once per tick of Serve's controller, about every 0.1 s):

    rows    = sum over running replicas of their queued_rows    ModelServer.record_autoscaling_stats: rows admitted
                                                                at that replica and not answered yet, averaged by
                                                                Serve over look_back_period_s
            + requests queued in callers' handles               each at least one row, seen by no replica yet
    demand  = max(rows, ongoing requests)                       Serve's own count (running + queued requests), so a
                                                                replica whose stats are missing still counts
    want    = clamp(ceil(demand / target_queued_rows), min_replicas, max_replicas)
    decided = want     once want > target has held for upscale_delay_s, or want < target for downscale_delay_s
              target   otherwise (the wait restarts whenever want stops being on the same side of target)

`target` is Serve's current target replica count, replicas still starting included: the same demand does not add
replicas a second time while the first ones start.

Serve 2.60 wraps every custom policy in its own delay, scaling-factor and bounds logic, read from the deployment's
AutoscalingConfig (`ray.serve.autoscaling_policy._apply_autoscaling_config`). `serve_autoscaling_config` sets those
delays to 0 and leaves the factors at 1, which pass a decision through unchanged: each delay counts once, here, as a
pure function of `ctx.current_time` and `ctx.policy_state` (tests/test_autoscale.py).

The policy is cloudpickled by value into Serve's controller (`AutoscalingPolicy.serialize_policy`), which never
imports polyhead: it depends on the standard library only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

QUEUED_ROWS = "queued_rows"  # the custom metric ModelServer.record_autoscaling_stats reports
POLICY_PATH = "serving.app.autoscale:QueuedRowsPolicy"
UP_SINCE = "polyhead_up_since"  # policy_state: when want > target began (ctx.current_time); Serve's keys start "__"
DOWN_SINCE = "polyhead_down_since"


def demand_rows(ctx) -> float:
    """Rows the deployment has to work off now: see the module's Semantics."""
    per_replica = (ctx.aggregated_metrics or {}).get(QUEUED_ROWS) or {}
    rows = sum(per_replica.values()) + (ctx.total_queued_requests or 0.0)
    return max(rows, ctx.total_num_requests or 0.0)


def wanted_replicas(demand: float, target_rows: int, lo: int, hi: int) -> int:
    return min(hi, max(lo, math.ceil(demand / target_rows)))


@dataclass(frozen=True)
class QueuedRowsPolicy:
    """Serve instantiates it once per deployment with the AutoscalingPolicy's `policy_kwargs` and calls it every tick;
    it keeps nothing itself (the timestamps are in the policy_state Serve hands back)."""

    target_queued_rows: int
    upscale_delay_s: float
    downscale_delay_s: float

    def __call__(self, ctx) -> tuple[int, dict]:
        lo, hi = ctx.capacity_adjusted_min_replicas, ctx.capacity_adjusted_max_replicas
        target = ctx.target_num_replicas
        if not lo <= target <= hi:  # the bounds changed (a redeploy, target_capacity): follow them at once
            return min(hi, max(lo, target)), {}
        want = wanted_replicas(demand_rows(ctx), self.target_queued_rows, lo, hi)
        if want == target:
            return target, {}
        key, delay_s = (UP_SINCE, self.upscale_delay_s) if want > target else (DOWN_SINCE, self.downscale_delay_s)
        now = ctx.current_time
        since = ctx.policy_state.get(key)
        since = now if since is None else since
        if now - since >= delay_s:
            return want, {}
        return target, {key: since}


def serve_autoscaling_config(settings, max_batch_size: int) -> dict:
    """The `autoscaling_config` of ModelServer's options for ServeConfig.autoscaling (config.Autoscaling).

    Serve's own delays are 0 (the policy applies polyhead's: see the module's docstring). Each replica records its
    queued_rows 5 times per look-back window (Serve's record interval factor, 0.2) and reports them every
    look_back_period_s / 3 s, at most every 10 s (Serve's default: 3 reports per 30 s window); handles report their
    queued and running requests as often.
    """
    target = settings.target_queued_rows or max_batch_size
    out = {"min_replicas": settings.min_replicas, "max_replicas": settings.max_replicas,
           "initial_replicas": settings.initial_replicas,
           "target_ongoing_requests": target,  # unused by the policy; Serve exports it as its target gauge
           "look_back_period_s": settings.look_back_period_s,
           "upscale_delay_s": 0.0, "downscale_delay_s": 0.0,
           "policy": {"policy_function": POLICY_PATH,
                      "policy_kwargs": {"target_queued_rows": target, "upscale_delay_s": settings.upscale_delay_s,
                                        "downscale_delay_s": settings.downscale_delay_s}}}
    report_s = settings.look_back_period_s / 3
    if report_s < 10:  # Serve's default is 10 s; set only below it (the field warns it is deprecated when set)
        out["metrics_interval_s"] = report_s
    return out
