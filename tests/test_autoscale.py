"""The autoscaling policy (serving/app/autoscale.py) without a cluster: Serve's real AutoscalingContext, fed back tick
by tick as Serve's controller does; the `autoscaling` knob of ServeConfig and what build_app gives Serve."""
from __future__ import annotations

import pytest
from ray.serve._private.common import DeploymentID
from ray.serve.autoscaling_policy import _apply_autoscaling_config
from ray.serve.config import AutoscalingConfig, AutoscalingContext
from ray.serve.request_router import ReplicaID

from serving.app.autoscale import DOWN_SINCE, UP_SINCE, QueuedRowsPolicy, serve_autoscaling_config
from serving.app.config import ConfigError, ServeConfig, load_config

DEPLOYMENT = DeploymentID(name="ModelServer", app_name="polyhead")


def context(queued_rows=(), *, target: int | None = None, now: float = 0.0, state: dict | None = None, lo: int = 1,
            hi: int = 4, requests: float = 0.0, handle_queued: float = 0.0, metrics: bool = True,
            config: AutoscalingConfig | None = None) -> AutoscalingContext:
    """A context with one running replica per entry of `queued_rows` (each its aggregated queued_rows)."""
    replicas = [ReplicaID(unique_id=f"r{i}", deployment_id=DEPLOYMENT) for i in range(len(queued_rows))]
    return AutoscalingContext(
        deployment_id=DEPLOYMENT, deployment_name=DEPLOYMENT.name, app_name=DEPLOYMENT.app_name,
        current_num_replicas=len(replicas), target_num_replicas=len(replicas) if target is None else target,
        running_replicas=replicas, total_num_requests=requests, total_queued_requests=handle_queued,
        aggregated_metrics={"queued_rows": dict(zip(replicas, queued_rows))} if metrics else {}, raw_metrics={},
        capacity_adjusted_min_replicas=lo, capacity_adjusted_max_replicas=hi, policy_state=dict(state or {}),
        last_scale_up_time=None, last_scale_down_time=None, current_time=now, config=config)


def drive(policy, ticks, replicas: int = 1, **kw) -> list[int]:
    """Each (time, rows queued in all, spread evenly over the running replicas) through the policy; each decision is
    the next tick's target (replicas start at once) and its state the next policy_state. The replica count after
    each tick."""
    state, out = {}, []
    for now, rows in ticks:
        replicas, state = policy(context([rows / replicas] * replicas, now=now, state=state, **kw))
        out.append(replicas)
    return out


POLICY = QueuedRowsPolicy(target_queued_rows=32, upscale_delay_s=5.0, downscale_delay_s=10.0)
AT_ONCE = QueuedRowsPolicy(target_queued_rows=32, upscale_delay_s=0.0, downscale_delay_s=0.0)


@pytest.mark.parametrize("rows, want", [
    ([0], 1), ([1], 1), ([32], 1), ([33], 2), ([80], 3), ([40, 40], 3), ([32, 32], 2), ([10, 0, 0], 1)])
def test_replicas_follow_queued_rows_over_the_target(rows, want):
    replicas, state = AT_ONCE(context(rows))
    assert (replicas, state) == (want, {})


def test_requests_waiting_in_handles_count_as_rows_and_ongoing_requests_are_a_floor():
    assert AT_ONCE(context([20], handle_queued=20))[0] == 2  # 20 rows at the replica + 20 requests not routed yet
    assert AT_ONCE(context([20], requests=70))[0] == 3  # Serve counts more requests than rows: its count wins
    assert AT_ONCE(context([0, 0], metrics=False, requests=40, target=2))[0] == 2  # no stats from any replica yet


def test_bounds_clamp_the_decision():
    assert AT_ONCE(context([10_000]))[0] == 4
    assert AT_ONCE(context([10_000], hi=2))[0] == 2
    assert AT_ONCE(context([0, 0, 0], lo=2))[0] == 2
    # bounds that moved past the target (a redeploy with a new max_replicas) are followed at once, whatever the delay
    assert POLICY(context([500] * 6, hi=4)) == (4, {})
    assert POLICY(context([0], lo=3)) == (3, {})


def test_scale_up_waits_upscale_delay_s_of_wanting_more():
    ticks = [(0.0, 80), (2.0, 80), (4.9, 80), (5.0, 80)]
    assert drive(POLICY, ticks) == [1, 1, 1, 3]
    replicas, state = POLICY(context([80], now=3.0, state={UP_SINCE: 0.0}))
    assert (replicas, state) == (1, {UP_SINCE: 0.0})  # the wait is kept in policy_state, nothing else


def test_the_up_wait_restarts_when_the_queue_falls_back():
    ticks = [(0.0, 80), (3.0, 20), (4.0, 80), (8.9, 80), (9.0, 80)]
    assert drive(POLICY, ticks) == [1, 1, 1, 1, 3]


def test_scale_down_waits_downscale_delay_s_of_wanting_fewer():
    ticks = [(0.0, 0), (5.0, 0), (9.9, 0), (10.0, 0)]
    assert drive(POLICY, ticks, replicas=3) == [3, 3, 3, 1]
    # a burst inside the wait restarts it
    ticks = [(0.0, 0), (6.0, 80), (7.0, 0), (16.9, 0), (17.0, 0)]
    assert drive(POLICY, ticks, replicas=3) == [3, 3, 3, 3, 1]


def test_zero_traffic_goes_to_min_replicas():
    assert drive(POLICY, [(0.0, 0), (10.0, 0)], replicas=4, lo=2) == [4, 2]
    assert drive(AT_ONCE, [(0.0, 0)], replicas=4) == [1]


def test_a_load_step_up_then_back_down():
    ticks = [(t, 100) for t in range(0, 7)] + [(t, 0) for t in range(7, 30)]
    out = drive(POLICY, ticks)
    assert out[:5] == [1] * 5 and out[5] == 4  # 100 rows / 32 = 4 replicas after 5 s
    assert out[6] == 4  # the same rows over 4 replicas: 25 each, within the target
    assert out[-1] == 1 and out.index(1, 6) == 17  # idle from t=7: down once wanted for 10 s


def test_serve_runs_the_policy_with_its_own_delays_at_zero():
    """Serve 2.60 wraps every custom policy in its delay, factor and bounds logic (_apply_autoscaling_config): with the
    config build_app gives it, a decision passes through unchanged and the state keeps the policy's wait."""
    settings = ServeConfig(autoscaling={"min_replicas": 1, "max_replicas": 4, "upscale_delay_s": 5}).autoscaling
    config = AutoscalingConfig(**serve_autoscaling_config(settings, max_batch_size=32))
    wrapped = _apply_autoscaling_config(config.policy.get_policy()(**config.policy.policy_kwargs))
    replicas, state = wrapped(context([80], now=0.0, config=config))
    assert replicas == 1 and state[UP_SINCE] == 0.0
    replicas, state = wrapped(context([80], now=5.0, state=state, config=config))
    assert replicas == 3 and UP_SINCE not in state
    replicas, state = wrapped(context([0, 0, 0], now=6.0, config=config))
    assert replicas == 3 and state[DOWN_SINCE] == 6.0  # downscale_delay_s: 600 s by default


def test_serve_autoscaling_config_is_a_valid_ray_config():
    settings = ServeConfig(autoscaling={"max_replicas": 3}).autoscaling
    config = AutoscalingConfig(**serve_autoscaling_config(settings, max_batch_size=16))
    assert (config.min_replicas, config.max_replicas, config.initial_replicas) == (1, 3, None)
    assert (config.upscale_delay_s, config.downscale_delay_s, config.look_back_period_s) == (0, 0, 30)
    assert config.metrics_interval_s == 10  # Serve's default: never set at look_back_period_s 30
    assert config.policy.policy_function == "serving.app.autoscale:QueuedRowsPolicy"
    assert config.policy.policy_kwargs == {"target_queued_rows": 16, "upscale_delay_s": 30.0,
                                           "downscale_delay_s": 600.0}
    fast = ServeConfig(autoscaling={"max_replicas": 2, "target_queued_rows": 4, "look_back_period_s": 1.5})
    raw = serve_autoscaling_config(fast.autoscaling, 32)
    assert raw["metrics_interval_s"] == 0.5 and raw["policy"]["policy_kwargs"]["target_queued_rows"] == 4


# the `autoscaling` knob ------------------------------------------------------------------------

def test_autoscaling_is_off_by_default_and_num_replicas_becomes_max_replicas():
    assert ServeConfig().autoscaling is None and ServeConfig(num_replicas=3).num_replicas == 3
    cfg = ServeConfig(autoscaling={"min_replicas": 2, "max_replicas": 5})
    assert cfg.num_replicas == 5 and cfg.autoscaling.initial_replicas is None
    assert cfg.pending_rows_limit() == max(256, 4 * 32 * 5) and cfg.admission_floor() == 3 * 32 * 5 // 4
    assert ServeConfig(**cfg.model_dump()) == cfg  # what the replicas rebuild from build_app's data
    assert ServeConfig(num_replicas=5, autoscaling={"max_replicas": 5}).num_replicas == 5


@pytest.mark.parametrize("autoscaling, message", [
    ({"min_replicas": 3, "max_replicas": 2}, r"max_replicas \(2\) must be >= min_replicas \(3\)"),
    ({"max_replicas": 4, "initial_replicas": 5}, r"initial_replicas \(5\) must be within min_replicas \(1\) and "
                                                 r"max_replicas \(4\)"),
    ({"min_replicas": 0, "max_replicas": 2}, r"autoscaling\.min_replicas: Input should be greater than or equal to 1"),
    ({"min_replicas": 1}, r"autoscaling\.max_replicas: Field required"),
    ({"max_replicas": 2, "target_queued_rows": 0}, r"autoscaling\.target_queued_rows: Input should be greater"),
    ({"max_replicas": 2, "look_back_period_s": 0.5}, r"autoscaling\.look_back_period_s: Input should be greater"),
    ({"max_replicas": 2, "upscale_delay": 1}, r"autoscaling\.upscale_delay: Extra inputs are not permitted"),
])
def test_bad_autoscaling_settings_are_refused_with_the_field_named(autoscaling, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, autoscaling=autoscaling)


def test_a_fixed_num_replicas_beside_autoscaling_is_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("num_replicas: 2\nautoscaling: {min_replicas: 1, max_replicas: 4}\n")
    with pytest.raises(ConfigError, match=r"(?s)c\.yaml.*num_replicas \(2\) is a fixed replica count; with "
                                          r"autoscaling.*leave num_replicas out or set it to 4"):
        load_config(path)


def test_build_app_gives_model_server_the_autoscaling_config_instead_of_num_replicas():
    from serving.app import build_app

    def model_config(app):
        (model,) = app._bound_deployment.init_args[:1]
        return model._bound_deployment._deployment_config

    fixed = model_config(build_app(ServeConfig(num_replicas=3)))
    assert fixed.num_replicas == 3 and fixed.autoscaling_config is None
    scaled = model_config(build_app(ServeConfig(autoscaling={"min_replicas": 2, "max_replicas": 3})))
    assert scaled.autoscaling_config.min_replicas == 2 and scaled.autoscaling_config.max_replicas == 3
    assert scaled.autoscaling_config.policy.policy_function == "serving.app.autoscale:QueuedRowsPolicy"
