"""`polyhead experiments create|list|show|ramp|rm` run in-process against the session's real server: what each
action prints, that a ramp moves units only into the ramped arm, and that every mistake is one line and exit 1."""
from __future__ import annotations

import json
import re

import pytest

from serving.cli import main
from serving.experiments import cli as experiments_cli
from serving.experiments.assign import Allocation, bucket

from .conftest import ADMIN_KEY

KEY = {"Authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture(scope="module")
def clix(client, adapter_dirs):
    """`clix@1`, `clix@2`: two classifiers of one task, registered through the admin route."""
    refs = []
    for source in (adapter_dirs["ver-1"], adapter_dirs["ver-2"]):
        r = client.post("/v1/adapters", json={"name": "clix", "source": str(source)}, headers=KEY)
        assert r.status_code == 201, r.text
        refs.append(r.json()["ref"])
    return refs


@pytest.fixture
def cli(server, capsys, monkeypatch):
    """cli(action, *args) -> (exit code, stdout, stderr) of `polyhead experiments action ... --url --admin-key`."""
    monkeypatch.delenv("POLYHEAD_URL", raising=False)
    monkeypatch.delenv("POLYHEAD_ADMIN_API_KEY", raising=False)

    def call(action: str, *args: str, url: str = server, key: str | None = ADMIN_KEY):
        capsys.readouterr()
        argv = ["experiments", action, *args, "--url", url] + (["--admin-key", key] if key is not None else [])
        code = main(argv)
        out = capsys.readouterr()
        return code, _without_ray_lines(out.out), _without_ray_lines(out.err)

    return call


# what Ray's log monitor prints into this (the driver's) process meanwhile, e.g. "\x1b[33m(raylet)\x1b[0m ..."
RAY_LINE = re.compile(r"^(\x1b\[[0-9;]*m)?\((raylet|[\w.]+ pid=\d+[^)]*|pid=\d+[^)]*)\)")


def _without_ray_lines(text: str) -> str:
    return "".join(line for line in text.splitlines(keepends=True) if not RAY_LINE.match(line))


def assert_one_line_error(code: int, out: str, err: str, action: str, *words: str) -> str:
    assert code == 1 and out == ""
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith(f"polyhead experiments {action}: error: "), err
    for word in words:
        assert word in err, err
    return err


def arm_of(client, name: str, user: str) -> str:
    r = client.post("/v1/classify", json={"model": name, "input": "the market fell sharply", "user": user})
    assert r.status_code == 200, r.text
    return r.headers["x-polyhead-arm"]


def test_create_with_arms_then_show_prints_the_definition_and_the_report(cli, client, clix):
    v1, v2 = clix
    code, out, err = cli("create", "clix-ab", "--arm", f"control={v1}:90", "--arm", f"candidate={v2}:10")
    assert code == 0, err
    assert out == f"created experiment clix-ab version 1: control 90% {v1}, candidate 10% {v2}\n"
    exp = client.get("/v1/experiments/clix-ab", headers=KEY).json()
    assert [(a["name"], a["adapter"], a["share"]) for a in exp["arms"]] == [("control", v1, 0.9),
                                                                          ("candidate", v2, 0.1)]
    code, out, err = cli("show", "clix-ab")
    assert code == 0, err
    definition, table = out.split("\n\n")
    assert "experiment clix-ab  version 1" in definition and "control: control  salt: clix-ab" in definition
    assert any(line.split()[:3] == ["control", "90%", v1] for line in definition.splitlines())
    assert any(line.split()[:3] == ["candidate", "10%", v2] for line in definition.splitlines())
    assert "shadow: none" in definition and "min_requests=100" in definition
    assert table.splitlines()[0].split()[:3] == ["arm", "adapter", "share"]
    assert table.splitlines()[1].split()[:4] == ["control", "(control)", v1, "90.0%"]
    assert table.splitlines()[2].split()[:3] == ["candidate", v2, "10.0%"]
    assert "SRM" in table
    code, out, _ = cli("show", "clix-ab", "--json")
    assert code == 0 and json.loads(out)["experiment"]["id"] == "clix-ab"
    assert json.loads(out)["report"]["object"] == "experiment.report"


def test_create_refuses_to_overwrite_an_existing_experiment(cli, client, clix):
    v1, v2 = clix
    before = client.get("/v1/experiments/clix-ab", headers=KEY).json()
    code, out, err = cli("create", "clix-ab", "--arm", f"a={v1}:1", "--arm", f"b={v2}:1")
    assert_one_line_error(code, out, err, "create", "clix-ab", "exists", "ramp", "rm")
    assert client.get("/v1/experiments/clix-ab", headers=KEY).json()["version"] == before["version"]


def test_ramp_sets_the_share_and_moves_units_only_into_the_ramped_arm(cli, client, clix):
    v1, v2 = clix
    users = [f"clix-user-{i}" for i in range(40)]
    before = {u: arm_of(client, "clix-ab", u) for u in users}
    table = Allocation.initial([90, 10])
    names = ["control", "candidate"]
    assert before == {u: names[table.arm_of(bucket("clix-ab", u))] for u in users}  # salt: the name
    code, out, err = cli("ramp", "clix-ab", "candidate", "50")
    assert code == 0, err
    assert out == f"ramped experiment clix-ab to version 2: control 50% {v1}, candidate 50% {v2}\n"
    exp = client.get("/v1/experiments/clix-ab", headers=KEY).json()
    assert [(a["name"], a["share"], a["buckets"]) for a in exp["arms"]] == [("control", 0.5, 5000),
                                                                          ("candidate", 0.5, 5000)]
    after = {u: arm_of(client, "clix-ab", u) for u in users}
    moved = {u for u in users if after[u] != before[u]}
    assert all(before[u] == "control" and after[u] == "candidate" for u in moved)
    want = table.rebalanced(names, names, [50, 50])
    assert after == {u: names[want.arm_of(bucket("clix-ab", u))] for u in users}
    assert moved  # control released buckets [4500, 9000): 45 % of the units (the hash is fixed: no flake)
    # float weights and a --json answer
    code, out, err = cli("ramp", "clix-ab", "control", "12.5", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert [a["share"] for a in data["arms"]] == [0.125, 0.875] and data["version"] == 3


def test_ramp_rereads_once_when_the_experiment_changed_meanwhile(cli, client, clix, monkeypatch):
    v1, v2 = clix
    assert cli("create", "clix-race", "--arm", f"a={v1}:80", "--arm", f"b={v2}:20")[0] == 0
    call = experiments_cli._Admin.call
    raced = []

    def racing(self, method, path, body=None, ok=(200,)):
        if method == "PUT" and not raced:  # someone else's change lands between our GET and PUT
            raced.append(client.put("/v1/experiments/clix-race", headers=KEY,
                                    json={"arms": [{"name": "a", "adapter": v1, "weight": 60},
                                                   {"name": "b", "adapter": v2, "weight": 20},
                                                   {"name": "c", "adapter": v2, "weight": 20}]}).status_code)
        return call(self, method, path, body, ok)

    monkeypatch.setattr(experiments_cli._Admin, "call", racing)
    code, out, err = cli("ramp", "clix-race", "b", "50")
    assert raced == [200] and code == 0, err
    exp = client.get("/v1/experiments/clix-race", headers=KEY).json()
    assert exp["version"] == 3  # ours, made from the other change's version 2
    assert [(a["name"], a["share"]) for a in exp["arms"]] == [("a", 0.375), ("b", 0.5), ("c", 0.125)]
    assert out.startswith("ramped experiment clix-race to version 3: a 37.5% ")


def test_ramp_refusals_name_why(cli, client, clix):
    v1, v2 = clix
    assert cli("create", "clix-solo", "--arm", f"only={v1}:1", "--arm", f"off={v2}:0")[0] == 0
    assert_one_line_error(*cli("ramp", "clix-solo", "only", "50"), "ramp", "weight 0")
    assert_one_line_error(*cli("ramp", "clix-solo", "nope", "50"), "ramp", "no arm 'nope'", "only, off")
    assert_one_line_error(*cli("ramp", "clix-solo", "off", "150"), "ramp", "[0, 100]")
    assert_one_line_error(*cli("ramp", "clix-solo", "off", "lots"), "ramp", "not a number")
    assert client.get("/v1/experiments/clix-solo", headers=KEY).json()["version"] == 1
    code, out, err = cli("ramp", "clix-solo", "off", "100")  # all to `off`: `only`'s weight 0 is fine
    assert code == 0 and out.endswith(f"only 0% {v1}, off 100% {v2}\n"), err
    assert cli("rm", "clix-solo")[0] == 0


def test_create_from_a_yaml_file_and_list(cli, client, clix, tmp_path):
    v1, v2 = clix
    path = tmp_path / "def.yaml"
    path.write_text(f"""
arms:
  - {{name: base-arm, adapter: "{v1}", weight: 3}}
  - {{name: new-arm, adapter: "{v2}", weight: 1.5}}
control: base-arm
shadow: {{adapter: "{v2}", percent: 5}}
salt: clix-salt
guardrails: {{max_error_rate: 0.2, min_requests: 50}}
""")
    code, out, err = cli("create", "clix-yaml", "--file", str(path))
    assert code == 0, err
    assert out.startswith("created experiment clix-yaml version 1: base-arm 66.67% ")
    exp = client.get("/v1/experiments/clix-yaml", headers=KEY).json()
    assert exp["salt"] == "clix-salt" and exp["shadow"] == {"adapter": v2, "percent": 5.0}
    assert exp["guardrails"]["max_error_rate"] == 0.2 and exp["guardrails"]["min_requests"] == 50
    code, out, err = cli("list")
    assert code == 0, err
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert out.splitlines()[0].split() == ["EXPERIMENT", "VERSION", "ARMS", "SHADOW"]
    assert f"base-arm 66.67% {v1}, new-arm 33.33% {v2}" in rows["clix-yaml"]
    assert rows["clix-yaml"].endswith(f"{v2} 5%")
    code, out, _ = cli("list", "--json")
    assert code == 0 and "clix-yaml" in {e["id"] for e in json.loads(out)["data"]}
    # --replace updates it in place; --file with --arm is a mistake
    path.write_text(json.dumps({"arms": [{"name": "base-arm", "adapter": v1, "weight": 1}]}))
    code, out, err = cli("create", "clix-yaml", "--file", str(path), "--replace")
    assert code == 0 and out.startswith("updated experiment clix-yaml version 2: base-arm 100% "), err
    assert_one_line_error(*cli("create", "clix-yaml", "--file", str(path), "--arm", f"a={v1}:1"), "create",
                          "--arm")
    assert_one_line_error(*cli("create", "clix-yaml2", "--file", str(tmp_path / "none.yaml")), "create",
                          "none.yaml")


def test_rm_removes_the_experiment(cli, client, clix):
    code, out, err = cli("rm", "clix-ab")
    assert code == 0 and out == "removed experiment clix-ab\n", err
    assert client.get("/v1/experiments/clix-ab", headers=KEY).status_code == 404
    assert_one_line_error(*cli("rm", "clix-ab"), "rm", "unknown experiment 'clix-ab'")


@pytest.mark.parametrize("case", ["unknown experiment", "wrong admin key", "no admin key", "unreachable",
                                  "bad --arm", "bad --arm weight", "bad --shadow", "server refusal",
                                  "unknown option"])
def test_every_mistake_is_one_line_and_exit_1(cli, clix, case):
    from serving.app import free_port

    v1, v2 = clix
    if case == "unknown experiment":
        assert_one_line_error(*cli("show", "clix-nothing"), "show", "unknown experiment 'clix-nothing'")
    elif case == "wrong admin key":
        assert_one_line_error(*cli("list", key="wrong"), "list", "wrong API key")
    elif case == "no admin key":
        assert_one_line_error(*cli("list", key=None), "list", "Authorization")
    elif case == "unreachable":
        url = f"http://127.0.0.1:{free_port()}"
        assert_one_line_error(*cli("list", url=url), "list", f"the server at {url} is not reachable")
    elif case == "bad --arm":
        assert_one_line_error(*cli("create", "clix-bad", "--arm", f"control{v1}:1"), "create",
                              "NAME=ADAPTER:WEIGHT")
    elif case == "bad --arm weight":
        assert_one_line_error(*cli("create", "clix-bad", "--arm", f"a={v1}:-1"), "create", ">= 0")
    elif case == "bad --shadow":
        assert_one_line_error(*cli("create", "clix-bad", "--arm", f"a={v1}:1", "--shadow", f"{v2}"), "create",
                              "ADAPTER:PERCENT")
    elif case == "server refusal":  # the server's own message, one line
        assert_one_line_error(*cli("create", "clix-bad", "--arm", f"a={v1}:1", "--control", "zzz"), "create",
                              "control 'zzz' is not one of the arms")
    else:
        assert_one_line_error(*cli("list", "--bogus"), "list", "unrecognized arguments: --bogus")
