"""The Ray Serve application: `build_app(config)` for serve.run / a Serve config file, `run()` to serve locally."""
from __future__ import annotations

import math
import os
import signal
import threading
from pathlib import Path

from .config import ConfigError, ServeConfig, load_config

__all__ = ["ConfigError", "ServeConfig", "build_app", "load_config", "run"]


def build_app(config: ServeConfig | dict | str | Path | None = None):
    """The Application: Ingress (HTTP) -> ModelServer (one Engine, batched).

    `config` is a ServeConfig, its mapping (the `args:` of a Serve config file), a YAML path, or None (defaults).
    """
    from .deployments import ModelServer
    from .http import Ingress

    if config is None or isinstance(config, (str, Path)):
        cfg = load_config(config)
    elif isinstance(config, dict):
        cfg = load_config(None, **config)
    else:
        cfg = config
    data = cfg.model_dump()
    model = ModelServer.options(
        ray_actor_options={"num_cpus": cfg.replica_cpus(), "num_gpus": cfg.replica_gpus()},
        max_ongoing_requests=cfg.max_ongoing_requests,
        max_queued_requests=cfg.max_queued_requests,
    ).bind(data)
    # the ingress only waits on the model: it must never queue in Ray's proxy (which answers in plain text)
    return Ingress.options(ray_actor_options={"num_cpus": cfg.ingress_num_cpus}, max_ongoing_requests=1000,
                           ).bind(model, data)


def run(config_path: str | Path | None = None, **overrides) -> None:
    """Start Ray on 127.0.0.1 (no dashboard), serve the app on host:port, stop cleanly on SIGINT/SIGTERM."""
    import ray
    from ray import serve

    cfg = load_config(config_path, **overrides)
    num_cpus = max(os.cpu_count() or 1, math.ceil(cfg.replica_cpus() + cfg.ingress_num_cpus))
    ray.init(num_cpus=num_cpus, _node_ip_address="127.0.0.1", include_dashboard=False)
    stop = threading.Event()
    try:
        serve.start(http_options={"host": cfg.host, "port": cfg.port})
        serve.run(build_app(cfg), name="polyhead", route_prefix="/")
        print(f"polyhead: serving {cfg.resolved_model_name()} on http://{cfg.host}:{cfg.port} "
              f"(GET /ready, /v1/models, /metrics); Ctrl-C to stop", flush=True)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        while not stop.wait(1.0):
            pass
    finally:
        print("polyhead: shutting down", flush=True)
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
