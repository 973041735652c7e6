"""The Ray Serve application: `build_app(config)` for serve.run / a Serve config file, `run()` to serve locally."""
from __future__ import annotations

import logging
import math
import os
import sys
import time
from pathlib import Path

from .config import ConfigError, ServeConfig, load_config
from . import stopping
from .gate import CALLBACK as GATE_CALLBACK

__all__ = ["ConfigError", "RayStartError", "ServeConfig", "build_app", "direct_ingress_url", "load_config", "run", "start_local_ray"]

LOOPBACK = "127.0.0.1"


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
    routing = {}
    if cfg.request_router == "affinity":
        from ray.serve.config import RequestRouterConfig

        routing["request_router_config"] = RequestRouterConfig(
            request_router_class="serving.app.router:AffinityRouter",
            request_router_kwargs={"homes": cfg.affinity_homes, "capacity_rows": 2 * cfg.max_batch_size},
            request_routing_stats_period_s=0.5)
    replicas = {"num_replicas": cfg.num_replicas}
    if cfg.autoscaling is not None:  # Serve refuses num_replicas beside autoscaling_config
        from .autoscale import serve_autoscaling_config

        replicas = {"autoscaling_config": serve_autoscaling_config(cfg.autoscaling, cfg.max_batch_size)}
    model = ModelServer.options(
        ray_actor_options={"num_cpus": cfg.replica_cpus(), "num_gpus": cfg.replica_gpus(),
                           "resources": dict(cfg.replica_resources)},
        max_ongoing_requests=cfg.max_ongoing_requests,
        max_queued_requests=cfg.max_queued_requests,
        logging_config={"log_level": cfg.log_level},
        **replicas,
        **routing,
    ).bind(data)
    # the ingress only waits on the model: it must never queue in Ray's proxy (which answers in plain text)
    # no access log of Serve's own: the ingress logs each request (serving/app/logs.py)
    return Ingress.options(ray_actor_options={"num_cpus": cfg.ingress_num_cpus,
                                              "resources": dict(cfg.ingress_resources)}, max_ongoing_requests=1000,
                           logging_config={"enable_access_log": False, "log_level": cfg.log_level},
                           ).bind(model, data)


THROUGHPUT_OPTIMIZED = "RAY_SERVE_THROUGHPUT_OPTIMIZED"


def start_local_ray(num_cpus: int, direct_ingress_ports: range | None = None, job_log_level: str | None = None,
                    forwarded_allow_ips: tuple[str, ...] | list[str] = (), **init_kwargs) -> None:
    """Start a new single-node Ray in this process whose every server listens on 127.0.0.1 only.

    An open Ray port runs arbitrary code (the dashboard/job API: CVE-2023-48022), so the embedded default
    must expose nothing. On Linux, `ray.init(_node_ip_address="127.0.0.1")` alone does not do it: Ray
    replaces a loopback node address with the machine's address (`services.resolve_ip_for_localhost`),
    and then the GCS, raylet and worker gRPC servers bind every interface (they bind 127.0.0.1 only when
    the node address *is* 127.0.0.1) and the dashboard agent and runtime-env agent bind the public
    address. `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` is Ray's own switch for a local-only node (its default
    on macOS and Windows): `services.get_node_ip_address` then answers 127.0.0.1, in this process and in
    every Ray process started from it. The one server no Ray setting moves, Ray Serve's per-replica
    inter-deployment gRPC server, is moved by `loopback_setup_hook()`, run in every Ray worker as the
    documented `worker_process_setup_hook`. `address="local"` never attaches to another cluster
    (RAY_ADDRESS, `ray start`). tests/integration/test_ray_loopback.py checks every listening socket.

    Ray starts its workers at nice 15 (`worker_niceness`); here they keep the default 0 (unless
    RAY_worker_niceness is set), and each model replica's engine thread lowers itself by `engine_nice`
    (ServeConfig). The HTTP side (proxy, ingress, replica event loops) then wins the CPU over a forward by
    a CFS weight of 1024 to 110 instead of 36 to 15 (serve_load, 32 tokens: +10 % req/s at saturation,
    4x-overload goodput 0.99 vs 0.88 of peak, shed p99 0.4 vs 0.7 s), and is no longer 28x weaker than
    any other process on the machine.

    Ray's workers (Serve's controller, proxy and replicas; not this process) run with Ray Serve's
    RAY_SERVE_THROUGHPUT_OPTIMIZED=1 unless this process's environment sets it: each replica runs its
    user code and its handles' router on its main event loop instead of a thread each, and deployments call
    each other over gRPC (serve_load, 32 tokens, 2 cores, runs alternating with the default: concurrency-1
    p50 17.9-19.6 vs 20.7-22.1 ms, 275-310 vs 226-272 req/s at concurrency 32). Not in this process: a
    handle used from synchronous code (make serve, tests, benchmarks) needs the router's own loop.

    Serve's proxy gets polyhead's front gate (serving/app/gate.py: overload is refused in the proxy, before
    any Ray work) through RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH, unless that variable is already set.

    `direct_ingress_ports`: Ray Serve's direct ingress. Every ingress replica then answers HTTP itself, on
    the lowest free port of that range, on Serve's http_options host, wrapped in the same middlewares (the
    gate included); Serve's proxy still runs on the head node and serves the same apps one hop further. The
    proxy hop (the proxy's HTTP work, its call into the ingress replica, the answer streamed back) was half
    the front end's CPU: serve_load, 32 tokens, 2 cores, the same app both ways side by side: 92-96 vs 58-62
    req/s at concurrency 32, p50 35 vs 47-49 ms at concurrency 1. A released port is reused at once
    (Ray's quarantine is for an HAProxy in front), so a restarted ingress replica listens where it did, and a
    stopping one holds its port only while it finishes its ongoing requests (Ray's minimum draining period,
    30 s for a load balancer to deregister it, is 0 here).
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # read when Ray's constants are imported
    if direct_ingress_ports is not None:  # all read by Serve's controller and replicas, which Ray starts below
        if not direct_ingress_ports:
            raise ValueError("direct_ingress_ports is an empty range")
        os.environ["RAY_SERVE_ENABLE_DIRECT_INGRESS"] = "1"
        os.environ["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"] = str(direct_ingress_ports.start)
        os.environ["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"] = str(direct_ingress_ports.stop)  # exclusive
        os.environ.setdefault("RAY_SERVE_PORT_QUARANTINE_S", "0")
        # a stopping ingress replica still finishes its ongoing requests; Ray's extra hold (30 s, for a load
        # balancer in front to deregister it) has no one to wait for here and made Ctrl-C take 35 s or more
        os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "0")
    os.environ.setdefault("RAY_worker_niceness", "0")  # read by the raylet this starts
    os.environ.setdefault("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", GATE_CALLBACK)  # read by Serve's proxy
    import ray

    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None and getattr(constants, "ENABLE_RAY_CLUSTER", False):
        constants.ENABLE_RAY_CLUSTER = False  # ray was imported before: the value the variable now gives
    if job_log_level is not None:  # workers' stdout reaches this process's stdout as it is, without Ray's
        init_kwargs.setdefault("logging_config", ray.LoggingConfig(log_level=job_log_level))  # prefix (logs.py)
        logging.getLogger("httpx").setLevel(logging.WARNING)  # the root logger Ray sets up would print every call
    runtime_env = dict(init_kwargs.pop("runtime_env", None) or {})
    runtime_env.setdefault("worker_process_setup_hook", loopback_setup_hook())
    env_vars = dict(runtime_env.get("env_vars") or {})
    env_vars.setdefault(THROUGHPUT_OPTIMIZED, os.environ.get(THROUGHPUT_OPTIMIZED, "1"))
    # uvicorn (Serve's proxy, direct ingress) rewrites a request's client from X-Forwarded-For when the peer is in
    # FORWARDED_ALLOW_IPS (its default: 127.0.0.1): a same-host proxy passing a client's own header made it "local"
    # to the admin check. Only the configured proxies are believed (none by default; the environment wins).
    env_vars.setdefault("FORWARDED_ALLOW_IPS", os.environ.get("FORWARDED_ALLOW_IPS", ",".join(forwarded_allow_ips)))
    runtime_env["env_vars"] = env_vars
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _node_ip_address=LOOPBACK,
             runtime_env=runtime_env, **init_kwargs)
    node_ip = ray.util.get_node_ip_address()
    if node_ip != LOOPBACK:
        ray.shutdown()
        raise RuntimeError(f"Ray started on {node_ip}, not {LOOPBACK}: refusing to run with Ray's ports on a "
                           "public interface (see serving.app.start_local_ray)")


def direct_ingress_url(app: str, ports: range, host: str = LOOPBACK, timeout_s: float = 60.0) -> str:
    """The URL where `app`'s ingress replica answers directly (start_local_ray's direct_ingress_ports): the
    port in `ports` whose Serve route table (GET /-/routes, answered by Ray) names `app`."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        for port in ports:
            url = f"http://{host}:{port}"
            try:
                r = httpx.get(url + "/-/routes", timeout=2)
                if r.status_code == 200 and app in r.json().values():
                    return url
            except (httpx.HTTPError, ValueError):
                continue
        if time.monotonic() > deadline:
            raise RuntimeError(f"no ingress replica of app {app!r} answers on {host} ports {ports.start}-"
                               f"{ports.stop - 1} within {timeout_s} s")
        time.sleep(0.3)


def free_port(host: str = LOOPBACK) -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def free_ports(n: int, host: str = LOOPBACK) -> range:
    """n consecutive ports free on `host` now (for direct_ingress_ports when several ingress replicas run)."""
    import random
    import socket

    rng = random.Random()
    for _ in range(200):
        start = rng.randrange(20000, 29000)
        try:
            for port in range(start, start + n):
                with socket.socket() as s:
                    s.bind((host, port))
        except OSError:
            continue
        return range(start, start + n)
    raise RuntimeError(f"no {n} consecutive free ports found on {host}")


def loopback_setup_hook():
    """A Ray worker setup hook: Serve replicas' inter-deployment gRPC server listens on 127.0.0.1, not [::];
    a direct-ingress HTTP port binds again at once after a stop or a crash (rebind_after_a_restart).

    Ray 2.60 binds it with `add_port_to_grpc_server(server, "[::]:0")` in ray/serve/_private/replica.py
    and has no setting for its host (ray-project/ray#64544). The hook replaces only that module's
    reference; if a later Ray moves it, nothing is patched and test_ray_loopback fails.
    It is a closure so that Ray ships it by value: workers need not import polyhead (and torch) for it.
    """

    def serve_grpc_on_loopback() -> None:
        try:
            from ray.serve._private import replica
        except ImportError:
            return
        original = getattr(replica, "add_port_to_grpc_server", None)
        if original is None or getattr(original, "loopback_only", False):
            return

        def add_port_on_loopback(server, address: str):
            host, _, port = address.rpartition(":")
            return original(server, f"127.0.0.1:{port}" if host in ("[::]", "0.0.0.0", "") else address)

        add_port_on_loopback.loopback_only = True
        replica.add_port_to_grpc_server = add_port_on_loopback

    def rebind_after_a_restart() -> None:
        """Direct ingress binds its HTTP socket without SO_REUSEADDR (ray/serve/_private/http_util.py), so a
        port with connections of a previous server still in TIME_WAIT or FIN_WAIT (a stop or a crash with
        clients connected) cannot be bound for a minute; Ray then blocks the port for good. `make serve` started
        again after Ctrl-C with keep-alive clients failed to deploy, and an ingress replica killed under load
        was never replaced. SO_REUSEADDR (what uvicorn and nginx set) binds past those, never past a listener."""
        import socket as stdlib

        try:
            from ray.serve._private import http_util
        except ImportError:
            return
        if getattr(http_util.socket, "reuse_address", False):
            return

        class SocketModule:  # the socket module as http_util sees it, whose sockets have SO_REUSEADDR set
            reuse_address = True

            def __getattr__(self, name):
                return getattr(stdlib, name)

            @staticmethod
            def socket(*args, **kwargs):
                sock = stdlib.socket(*args, **kwargs)
                sock.setsockopt(stdlib.SOL_SOCKET, stdlib.SO_REUSEADDR, 1)
                return sock

        http_util.socket = SocketModule()

    def setup() -> None:
        serve_grpc_on_loopback()
        rebind_after_a_restart()

    return setup


def run(config_path: str | Path | None = None, address: str | None = None, **overrides) -> None:
    """Start Ray on 127.0.0.1 only (no dashboard), serve the app on host:port, stop cleanly on SIGINT/SIGTERM.

    `address` ("auto", "ray://host:10001", "host:6379"): deploy onto that running Ray cluster instead (`ray start
    --head` / KubeRay); Serve's proxy listens on host:port (no direct ingress: Serve's environment is the
    cluster's); on stop the app is drained and deleted, and this process disconnects, leaving the cluster up.

    With `direct_ingress` (the default), the ingress replica itself listens on host:port and Serve's proxy
    on a free port of the same host (the same app, one hop further); without it, the proxy listens on
    host:port. Ctrl-C or SIGTERM at any point, start-up included, shuts Serve and Ray's own processes down
    and returns; once serving, it drains first (ServeConfig.drain_timeout_s; serving/app/stopping.py, which also
    stops the server under `make serve` when make alone got SIGINT).
    """
    cfg = load_config(config_path, **overrides)
    if address is not None:
        cfg = cfg.model_copy(update={"direct_ingress": False})
    num_cpus = max(os.cpu_count() or 1, math.ceil(cfg.num_replicas * cfg.replica_cpus() + cfg.ingress_num_cpus))

    stopping.install_handlers()  # SIGTERM and SIGINT raise KeyboardInterrupt: unwind through the stop below
    parent, served = stopping.ParentMake(), False  # `make serve`: make's own SIGINT stops the server too
    try:
        ports = range(cfg.port, cfg.port + 1) if cfg.direct_ingress else None  # the one ingress replica
        if address is not None:
            _join_cluster(address, cfg.log_level)
        else:
            _start_ray(num_cpus, direct_ingress_ports=ports, job_log_level=cfg.log_level,
                       forwarded_allow_ips=cfg.forwarded_allow_ips)
        stopping.install_handlers()  # again: Ray's driver replaced SIGTERM's with its own (a stack dump, abort)
        from ray import serve

        # Serve's INFO lines here named its proxy's port as where the app "is ready at" and said "Connecting to
        # existing Serve app" on a fresh start: the banner below says where polyhead answers
        logging.getLogger("ray.serve").setLevel(logging.WARNING)

        proxy_port = free_port(cfg.host) if cfg.direct_ingress else cfg.port
        serve.start(http_options={"host": cfg.host, "port": proxy_port})
        serve.run(build_app(cfg), name="polyhead", route_prefix="/")
        if ports is not None:
            direct_ingress_url("polyhead", ports, cfg.host)
        via = f"; Ray Serve's proxy on port {proxy_port}" if cfg.direct_ingress else ""
        dtype = serve.get_deployment_handle("ModelServer", "polyhead").info.remote().result()["dtype"]
        print(f"polyhead: serving {cfg.resolved_model_name()} ({dtype}) on http://{cfg.host}:{cfg.port} "
              f"(GET /ready, /v1/models, /metrics){via}; Ctrl-C to stop", flush=True)
        served = True
        stopping.wait_for_stop(parent)
    except KeyboardInterrupt:
        pass
    finally:
        _stop(cfg, served, stopping.Deferred(), own_ray=address is None)


class RayStartError(RuntimeError):
    """Ray did not start (`polyhead serve` says so in one line)."""


def _start_ray(num_cpus: int, attempts: int = 3, **kwargs) -> None:
    """start_local_ray, again after Ray's node start-up timeout: Ray's driver gives its raylet 30 s to register
    (a constant in ray/_private/node.py), which a machine busy with other work can miss."""
    import ray

    for attempt in range(1, attempts + 1):
        try:
            return start_local_ray(num_cpus, **kwargs)
        except Exception as exc:  # noqa: BLE001 - Ray raises a bare Exception for it
            if "timed out during startup" not in str(exc):
                raise
            ray.shutdown()
            if attempt == attempts:
                raise RayStartError(f"Ray did not start: its node timed out {attempts} times (is the machine "
                                    "overloaded?)") from None
            print(f"polyhead: Ray's node timed out during start-up (attempt {attempt} of {attempts}); starting "
                  "it again", flush=True)


def _join_cluster(address: str, log_level: str) -> None:
    """Connect to the running Ray cluster at `address`; RayStartError (one line) when there is none."""
    import ray

    try:
        ray.init(address=address, logging_config=ray.LoggingConfig(log_level=log_level), log_to_driver=True)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise RayStartError(f"no Ray cluster at {address!r} ({type(exc).__name__}: {str(exc)[:200]}); start one "
                            "with `ray start --head`, or leave --address out to run Ray here") from None


def _stop(cfg: ServeConfig, served: bool, signals: stopping.Deferred, own_ray: bool = True) -> None:
    """Drain (when the app served), stop Serve and Ray, end any process of theirs still running after a grace.
    On a cluster polyhead joined (`own_ray` False): drain, delete the app, disconnect; the cluster stays up."""
    def log(line: str) -> None:
        print(line, flush=True)

    ray = sys.modules.get("ray")
    try:
        if ray is None or not ray.is_initialized():
            return
        from ray import serve

        if served:
            log(f"polyhead: stopping: new requests answer 503 draining, those in flight finish (at most "
                f"{cfg.drain_timeout_s:g} s)")
            ingress = serve.get_deployment_handle("Ingress", "polyhead")
            stopping.drain(lambda: ingress.stop_accepting.remote().result(timeout_s=5), cfg.drain_timeout_s,
                           signals, log)
        if not own_ray:
            log("polyhead: deleting the app from the cluster")
            try:
                serve.delete("polyhead")
            finally:
                ray.shutdown()
            log("polyhead: stopped")
            return
        log("polyhead: shutting down")
        procs = stopping.descendants()  # Ray's processes: its agents outlived the driver when it went abruptly
        try:
            serve.shutdown()
        finally:
            procs |= stopping.descendants()
            ray.shutdown()
            left = stopping.reap(procs)
            if left:
                log(f"polyhead: ended {len(left)} Ray process(es) still running after the shutdown")
        log("polyhead: stopped")
    finally:
        signals.restore()
