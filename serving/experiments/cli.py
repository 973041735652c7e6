"""`polyhead experiments create|list|show|ramp|rm`: the admin routes /v1/experiments of a running server.

Every action talks to --url (default $POLYHEAD_URL, else http://127.0.0.1:8000) with --admin-key (default
$POLYHEAD_ADMIN_API_KEY; without one the server answers local clients only). A user mistake, an HTTP error or an
unreachable server prints one line, `polyhead experiments <action>: error: <why>`, on stderr and exits 1.

`ramp NAME ARM PERCENT` gives ARM PERCENT % of the units and scales the other arms' weights so that they keep their
proportions and fill the rest (the total weight is unchanged); it writes with if_version = the version it read, and
re-reads once when someone changed the experiment meanwhile.
"""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

DEFAULT_URL = "http://127.0.0.1:8000"
TIMEOUT_S = 30.0
GUARDRAIL_OPTIONS = (("max_error_rate", float), ("min_requests", int), ("min_outcome_difference", float),
                     ("min_outcomes", int))


class CliError(Exception):
    """A user mistake or a refusal: its message is the one line printed."""


def add_parser(sub, parser_class=None) -> None:
    """Add `experiments` and its actions to polyhead's subparsers `sub`."""
    if parser_class is None:
        from serving.cli import _OneLineParser as parser_class  # lazily: serving.cli imports this module lazily
    experiments = sub.add_parser("experiments", help="create, list, show, ramp or remove A/B experiments on a "
                                 "running server (its admin routes)")
    actions = experiments.add_subparsers(dest="action", required=True, parser_class=parser_class)

    def action(name: str, text: str, json_flag: bool = True):
        p = actions.add_parser(name, help=text)
        p.add_argument("--url", default=os.environ.get("POLYHEAD_URL") or DEFAULT_URL,
                       help=f"the server (default: $POLYHEAD_URL, else {DEFAULT_URL})")
        p.add_argument("--admin-key", default=os.environ.get("POLYHEAD_ADMIN_API_KEY"),
                       help="the server's admin_api_key (default: $POLYHEAD_ADMIN_API_KEY; none: local clients only)")
        if json_flag:
            p.add_argument("--json", action="store_true", help="print the server's JSON answer instead")
        return p

    create = action("create", "define a new experiment, from --arm options or a --file")
    create.add_argument("name", metavar="NAME")
    create.add_argument("--arm", action="append", default=[], metavar="NAME=ADAPTER:WEIGHT",
                        help="an arm, e.g. control=sentiment@1:90 (repeat for each arm; ADAPTER may be 'base')")
    create.add_argument("--control", metavar="ARM", help="the arm the others are compared with (default: the first)")
    create.add_argument("--shadow", metavar="ADAPTER:PERCENT", help="run ADAPTER beside PERCENT %% of requests, "
                        "compared and never returned")
    create.add_argument("--salt", help="the assignment hash's salt (default: the experiment's name)")
    create.add_argument("--max-error-rate", metavar="X", help="guardrail: roll back an arm whose error rate is surely "
                        "above X (0-1)")
    create.add_argument("--min-requests", metavar="N", help="guardrail: requests an arm has before it is judged")
    create.add_argument("--min-outcome-difference", metavar="D", help="guardrail: roll back an arm whose outcome "
                        "mean minus the control's is surely below D")
    create.add_argument("--min-outcomes", metavar="N", help="guardrail: outcomes each side has before it is judged")
    create.add_argument("--file", metavar="PATH", help="the definition (PUT /v1/experiments/{name}'s body) as JSON "
                        "or YAML, instead of the options above")
    create.add_argument("--replace", action="store_true", help="update the experiment when it exists already")
    action("list", "list the experiments with their arms' shares")
    show = action("show", "an experiment's definition and its report")
    show.add_argument("name", metavar="NAME")
    ramp = action("ramp", "give ARM PERCENT %% of the units; the other arms keep their proportions")
    ramp.add_argument("name", metavar="NAME")
    ramp.add_argument("arm", metavar="ARM")
    ramp.add_argument("percent", metavar="PERCENT")
    rm = action("rm", "remove an experiment", json_flag=False)
    rm.add_argument("name", metavar="NAME")


def run(args) -> int:
    """Run `polyhead experiments <action>`; the exit code."""
    import httpx

    try:
        with _Admin(args.url, args.admin_key) as admin:
            return _ACTIONS[args.action](admin, args)
    except CliError as exc:
        message = str(exc)
    except httpx.ConnectError:
        message = f"the server at {args.url} is not reachable (is it running? --url or $POLYHEAD_URL)"
    except httpx.TimeoutException:
        message = f"the server at {args.url} did not answer within {TIMEOUT_S:g} s"
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        message = f"{args.url}: {type(exc).__name__}: {exc}"
    except OSError as exc:
        message = str(exc)
    print(f"polyhead experiments {args.action}: error: {_one_line(message)}", file=sys.stderr)
    return 1


class _Admin:
    """The admin routes of one server, as calls that raise CliError with the server's message."""

    def __init__(self, url: str, key: str | None):
        import httpx

        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=TIMEOUT_S)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.http.close()

    def call(self, method: str, path: str, body: dict | None = None, ok=(200,)):
        """(status, JSON answer); CliError(message, code) for any other status."""
        r = self.http.request(method, path, json=body)
        try:
            data = r.json()
        except ValueError:
            data = None
        if r.status_code in ok and isinstance(data, dict):
            return r.status_code, data
        error = data.get("error") if isinstance(data, dict) else None
        if isinstance(error, dict) and error.get("message"):
            raise ApiRefusal(r.status_code, str(error["message"]), error.get("code"))
        raise ApiRefusal(r.status_code, f"HTTP {r.status_code} from {self.url}{path}: {r.text[:200] or 'no body'}")


class ApiRefusal(CliError):
    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.code = status, code


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _path(name: str) -> str:
    from urllib.parse import quote

    return "/v1/experiments/" + quote(name, safe="")


def _print_json(data) -> None:
    print(json.dumps(data, indent=2))


def _pct(share: float | None) -> str:
    if share is None:
        return "-"
    return f"{100 * share:.2f}".rstrip("0").rstrip(".") + "%"


def _arms_line(experiment: dict) -> str:
    """e.g. "control 90% sentiment@1, candidate 10% sentiment@2"."""
    return ", ".join(f"{a['name']} {_pct(a.get('share'))} {a['adapter']}" + (" (rolled back)" if a.get("rolled_back")
                                                                            else "")
                     for a in experiment["arms"])


def _shadow_text(experiment: dict) -> str:
    shadow = experiment.get("shadow")
    return "-" if not shadow else f"{shadow['adapter']} {_pct(shadow['percent'] / 100)}"


# create -----------------------------------------------------------------------------------

def _number(option: str, text: str, kind=float):
    try:
        value = kind(text)
    except (TypeError, ValueError):
        raise CliError(f"{option} {text!r}: not {'an integer' if kind is int else 'a number'}") from None
    if kind is float and not math.isfinite(value):
        raise CliError(f"{option} {text!r}: not a finite number")
    return value


def parse_arm(text: str) -> dict:
    """"NAME=ADAPTER:WEIGHT" -> {"name", "adapter", "weight"}."""
    name, eq, rest = text.partition("=")
    adapter, colon, weight = rest.rpartition(":")
    if not (eq and colon and name and adapter and weight):
        raise CliError(f"--arm {text!r}: expected NAME=ADAPTER:WEIGHT, e.g. control=sentiment@1:90")
    value = _number(f"--arm {text!r}: weight", weight)
    if value < 0:
        raise CliError(f"--arm {text!r}: the weight must be >= 0")
    return {"name": name, "adapter": adapter, "weight": value}


def parse_shadow(text: str) -> dict:
    """"ADAPTER:PERCENT" -> {"adapter", "percent"}."""
    adapter, colon, percent = text.rpartition(":")
    if not (colon and adapter and percent):
        raise CliError(f"--shadow {text!r}: expected ADAPTER:PERCENT, e.g. sentiment@3:5")
    value = _number(f"--shadow {text!r}: percent", percent)
    if not 0 <= value <= 100:
        raise CliError(f"--shadow {text!r}: the percent must be in [0, 100]")
    return {"adapter": adapter, "percent": value}


def _options_body(args) -> dict:
    if not args.arm:
        raise CliError("give the arms (--arm NAME=ADAPTER:WEIGHT, once per arm) or --file")
    body: dict = {"arms": [parse_arm(a) for a in args.arm]}
    if args.control is not None:
        body["control"] = args.control
    if args.shadow is not None:
        body["shadow"] = parse_shadow(args.shadow)
    if args.salt is not None:
        body["salt"] = args.salt
    guardrails = {key: _number("--" + key.replace("_", "-"), getattr(args, key), kind)
                  for key, kind in GUARDRAIL_OPTIONS if getattr(args, key) is not None}
    if guardrails:
        body["guardrails"] = guardrails
    return body


def _file_body(path: str) -> dict:
    import yaml

    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise CliError(f"--file {path}: {exc.strerror or exc}") from None
    try:
        body = yaml.safe_load(text)  # YAML, and so JSON too
    except yaml.YAMLError as exc:
        raise CliError(f"--file {path}: not valid JSON or YAML: {exc}") from None
    if not isinstance(body, dict):
        raise CliError(f"--file {path}: expected a mapping with `arms` (the body of PUT /v1/experiments/{{name}})")
    return body


def _create(admin: _Admin, args) -> int:
    if args.file is not None:
        given = [f"--{k.replace('_', '-')}" for k in ("arm", "control", "shadow", "salt", *dict(GUARDRAIL_OPTIONS))
                 if getattr(args, k) not in (None, [])]
        if given:
            raise CliError(f"--file holds the whole definition: leave out {', '.join(given)}")
        body = _file_body(args.file)
    else:
        body = _options_body(args)
    if not args.replace:
        body["if_version"] = 0  # must not exist yet
    try:
        status, data = admin.call("PUT", _path(args.name), body, ok=(200, 201))
    except ApiRefusal as exc:
        if exc.code == "version_conflict" and not args.replace:
            raise CliError(f"experiment {args.name!r} exists already ({exc}): change its split with `polyhead "
                           f"experiments ramp`, remove it with `polyhead experiments rm`, or redefine it with "
                           "create --replace") from None
        raise
    if args.json:
        _print_json(data)
    else:
        print(f"{'created' if status == 201 else 'updated'} experiment {data['id']} version {data['version']}: "
              f"{_arms_line(data)}" + (f"; shadow {_shadow_text(data)}" if data.get("shadow") else ""))
    for warning in data.get("warnings") or ():
        print(f"warning: {warning}", file=sys.stderr)
    return 0


# list, show -------------------------------------------------------------------------------

def _list(admin: _Admin, args) -> int:
    _, data = admin.call("GET", "/v1/experiments")
    if args.json:
        _print_json(data)
        return 0
    rows = [(e["id"], str(e["version"]), _arms_line(e), _shadow_text(e)) for e in data["data"]]
    rows += [(b["id"], "BROKEN", "-", "-") for b in data.get("broken") or ()]
    for b in data.get("broken") or ():
        print(f"warning: experiment {b['id']} cannot be read ({_one_line(str(b['error']))})", file=sys.stderr)
    header = ("EXPERIMENT", "VERSION", "ARMS", "SHADOW")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths)) + "  " + row[3])
    return 0


def _definition(e: dict) -> str:
    lines = [f"experiment {e['id']}  version {e['version']}  phase {e['phase']}  origin {e.get('origin', '-')}",
             f"control: {e['control']}  salt: {e['salt']}" + (f"  task: {e['task']}" if e.get("task") else "")]
    rows = [(a["name"], _pct(a.get("share")), a["adapter"], f"weight {a['weight']:g}", f"{a['buckets']} buckets",
             "ROLLED BACK" if a.get("rolled_back") else "") for a in e["arms"]]
    widths = [max(len(r[i]) for r in rows) for i in range(6)]
    lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    shadow = e.get("shadow")
    lines.append("shadow: " + ("none" if not shadow else f"{shadow['adapter']} beside {_pct(shadow['percent'] / 100)}"
                                                         " of requests"))
    g = e.get("guardrails") or {}
    lines.append("guardrails: " + ", ".join(f"{k}={'-' if g.get(k) is None else format(g[k], 'g')}"
                                            for k, _ in GUARDRAIL_OPTIONS))
    return "\n".join(lines)


def _show(admin: _Admin, args) -> int:
    _, experiment = admin.call("GET", _path(args.name))
    _, report = admin.call("GET", _path(args.name) + "/report")
    if args.json:
        _print_json({"experiment": experiment, "report": report})
        return 0
    from .report import format_table  # scipy: only here

    print(_definition(experiment))
    print()
    print(format_table(report))
    return 0


# ramp, rm ---------------------------------------------------------------------------------

def ramped_weights(arms: list[dict], arm: str, percent: float) -> list[float]:
    """The arms' weights once `arm` has `percent` % of the total and the others keep their proportions in the
    rest; the total weight is unchanged. CliError when that cannot be done."""
    names = [a["name"] for a in arms]
    if arm not in names:
        raise CliError(f"no arm {arm!r} (the arms: {', '.join(names)})")
    if not 0 <= percent <= 100:
        raise CliError(f"PERCENT {percent:g}: must be in [0, 100]")
    total = sum(a["weight"] for a in arms)
    others = total - next(a["weight"] for a in arms if a["name"] == arm)
    if percent < 100 and others <= 0:
        raise CliError(f"every arm but {arm!r} has weight 0: there are no proportions to fill the other "
                       f"{100 - percent:g} % with (redefine the experiment: create --replace)")
    rest = total * (100 - percent) / 100
    return [total * percent / 100 if a["name"] == arm else (a["weight"] * rest / others if others > 0 else 0.0)
            for a in arms]


def _ramp(admin: _Admin, args) -> int:
    percent = _number("PERCENT", args.percent.rstrip("%"))
    for attempt in range(2):
        _, current = admin.call("GET", _path(args.name))
        weights = ramped_weights(current["arms"], args.arm, percent)
        body = {"arms": [{"name": a["name"], "adapter": a["adapter"], "weight": w}
                         for a, w in zip(current["arms"], weights)],
                "control": current["control"], "shadow": current.get("shadow"), "salt": current["salt"],
                "guardrails": current["guardrails"], "if_version": current["version"]}
        try:
            _, data = admin.call("PUT", _path(args.name), body, ok=(200,))
            break
        except ApiRefusal as exc:
            if exc.code != "version_conflict":
                raise
            if attempt == 1:
                raise CliError(f"experiment {args.name!r} kept changing while being ramped ({exc}): try again") \
                    from None
    if args.json:
        _print_json(data)
    else:
        print(f"ramped experiment {data['id']} to version {data['version']}: {_arms_line(data)}")
    for warning in data.get("warnings") or ():
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def _rm(admin: _Admin, args) -> int:
    admin.call("DELETE", _path(args.name))
    print(f"removed experiment {args.name}")
    return 0


_ACTIONS = {"create": _create, "list": _list, "show": _show, "ramp": _ramp, "rm": _rm}
