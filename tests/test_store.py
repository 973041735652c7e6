"""AdapterStore: versions, pinning, hashes, labels, bad input, concurrency, fsspec commit markers,
atomic publish under SIGKILL, and the `polyhead adapters` command line."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import uuid
from pathlib import Path

import pytest

from adapters_store import AdapterError, AdapterStore, AdapterVersion, BaseSchema
from adapters_store import store as store_module
from tests.adapter_factory import make_bottleneck, make_lora
from tests.conftest import minilm_path

REPO = Path(__file__).resolve().parents[1]
BAD_REFS = ["../x", "a/b", "a\x00b", "x" * 10_000, "x@abc", "x@0", "x@-1", "x@", "@1", "x@1@2", "x@1.0", "base", ""]


@pytest.fixture(scope="module")
def schema() -> BaseSchema:
    return BaseSchema.from_config_dir(minilm_path())


def lora(tmp_path: Path, schema: BaseSchema, seed: int = 0, **kw) -> Path:
    return make_lora(tmp_path / f"src-{seed}-{uuid.uuid4().hex[:6]}", schema, seed=seed, layers=[0], **kw)


def visible(root: Path) -> list[str]:
    """Everything under the store root a reader could see (the staging area excluded)."""
    if not root.exists():
        return []
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.relative_to(root).parts[0] != ".tmp")


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_add_resolve_list_remove(tmp_path, schema):
    store = AdapterStore(tmp_path / "store")
    v = store.add("sent", lora(tmp_path, schema), schema=schema)
    assert isinstance(v, AdapterVersion) and (v.name, v.version, v.ref) == ("sent", 1, "sent@1")
    assert v.path == tmp_path / "store" / "sent" / "1" and v.labels is None and v.created > 0
    assert sorted(p.name for p in v.path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "polyhead.json"]
    assert store.resolve("sent") == v == store.resolve("sent@1")
    assert store.list() == [v]
    assert store.remove("sent") == [v]
    assert store.list() == [] and not v.path.exists()
    with pytest.raises(AdapterError, match="unknown adapter 'sent'"):
        store.resolve("sent")
    with pytest.raises(AdapterError, match="unknown adapter"):
        store.remove("sent")


def test_versions_increase_pin_and_are_never_reused(tmp_path, schema):
    store = AdapterStore(tmp_path / "store")
    v1 = store.add("a", lora(tmp_path, schema, seed=1), schema=schema)
    v2 = store.add("a", lora(tmp_path, schema, seed=2), schema=schema)
    other = store.add("b", lora(tmp_path, schema, seed=3), schema=schema)
    assert (v1.version, v2.version, other.version) == (1, 2, 1) and v1.sha256 != v2.sha256
    assert store.resolve("a") == v2 and store.resolve("a@1") == v1
    assert [x.ref for x in store.list()] == ["a@1", "a@2", "b@1"]
    assert store.published_versions("a") == [1, 2] and store.published_versions("never") == []
    with pytest.raises(AdapterError):
        store.published_versions("../a")
    with pytest.raises(AdapterError, match=r"unknown version a@3 \(published versions: 1, 2\)"):
        store.resolve("a@3")
    assert store.remove("a", 2) == [v2]
    assert store.resolve("a") == v1 and store.published_versions("a") == [1]
    v3 = store.add("a", lora(tmp_path, schema, seed=4), schema=schema)
    assert v3.version == 3  # the removed number 2 stays used: a pin never silently changes content
    with pytest.raises(AdapterError, match="unknown adapter 'a@2'"):
        store.remove("a", 2)


def test_hash_recorded_and_verified(tmp_path, schema):
    store = AdapterStore(tmp_path / "store")
    src = lora(tmp_path, schema)
    v = store.add("h", src, schema=schema)
    meta = json.loads((v.path / "polyhead.json").read_text())
    files = {f: sha256_of(src / f) for f in ("adapter_config.json", "adapter_model.safetensors")}
    assert {f: m["sha256"] for f, m in meta["files"].items()} == files
    lines = "".join(f"{files[f]}  {f}\n" for f in sorted(files))
    assert meta["sha256"] == v.sha256 == hashlib.sha256(lines.encode()).hexdigest()
    assert (meta["name"], meta["version"], meta["format"], meta["labels"]) == ("h", 1, "peft", None)
    assert store.resolve("h", verify=True) == v
    weights = v.path / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(AdapterError, match="adapter_model.safetensors does not match its recorded sha256"):
        store.resolve("h", verify=True)


def test_only_the_formats_files_are_stored(tmp_path, schema):
    src = lora(tmp_path, schema, head="SEQ_CLS", num_labels=2)
    (src / "config.json").write_text(json.dumps({"id2label": {"0": "neg", "1": "pos"}}))
    (src / "README.md").write_text("notes")
    (src / "tokenizer.json").write_text("{}")
    v = AdapterStore(tmp_path / "store").add("x", src, schema=schema)
    assert sorted(p.name for p in v.path.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "config.json", "polyhead.json"]


def test_adapterhub_folders_are_stored_with_their_own_files(tmp_path, schema):
    src = make_bottleneck(tmp_path / "bn", schema, seed=1, head="classification", num_labels=2)
    (src / "pytorch_adapter.txt").write_text("not stored")
    store = AdapterStore(tmp_path / "store")
    v = store.add("bn", src, schema=schema)
    assert sorted(p.name for p in v.path.iterdir()) == [
        "adapter.safetensors", "adapter_config.json", "head_config.json", "model_head.safetensors", "polyhead.json"]
    meta = json.loads((v.path / "polyhead.json").read_text())
    assert meta["format"] == "adapterhub" and meta["kind"] == "bottleneck"
    head_only = tmp_path / "head"
    head_only.mkdir()
    for f in ("head_config.json", "model_head.safetensors"):
        (head_only / f).write_bytes((src / f).read_bytes())
    h = store.add("head", head_only, schema=schema)
    assert sorted(p.name for p in h.path.iterdir()) == ["head_config.json", "model_head.safetensors", "polyhead.json"]
    assert json.loads((store.resolve("head").path / "polyhead.json").read_text())["kind"] == "head"


def test_labels_stored_and_returned(tmp_path, schema):
    store = AdapterStore(tmp_path / "store")
    v = store.add("cls", lora(tmp_path, schema, head="SEQ_CLS", num_labels=3), schema=schema, labels=["a", "b", "c"])
    assert v.labels == ("a", "b", "c")
    assert store.resolve("cls@1").labels == ("a", "b", "c") == store.list()[0].labels
    assert json.loads((v.path / "polyhead.json").read_text())["labels"] == ["a", "b", "c"]


def test_the_head_is_recorded_so_a_listing_knows_its_task_without_loading(tmp_path, schema):
    store = AdapterStore(tmp_path / "store")
    store.add("tagger", lora(tmp_path, schema, head="TOKEN_CLS", num_labels=3), schema=schema, labels=["O", "B", "I"])
    store.add("body", make_lora(tmp_path / "body", schema, seed=5), schema=schema)
    store.add("plain", make_lora(tmp_path / "plain", schema, seed=6, head="SEQ_CLS", num_labels=2), schema=schema)
    got = {v.name: (v.task, v.head_labels, v.labels) for v in store.list()}
    assert got == {"tagger": ("token_cls", ("O", "B", "I"), ("O", "B", "I")), "body": (None, None, None),
                   "plain": ("seq_cls", ("LABEL_0", "LABEL_1"), None)}


def test_versions_recorded_before_the_head_field_still_read(tmp_path, schema):
    """A store written before polyhead.json had "head": its versions list and resolve, their task unknown."""
    store = AdapterStore(tmp_path / "store")
    v = store.add("cls", lora(tmp_path, schema, head="SEQ_CLS", num_labels=3), schema=schema)
    meta_path = v.path / "polyhead.json"
    meta = json.loads(meta_path.read_text())
    del meta["head"]
    meta_path.write_text(json.dumps(meta))
    assert (store.resolve("cls").task, store.resolve("cls").head_labels) == (None, None)
    meta["head"] = {"task": 3, "labels": None}
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(AdapterError, match="malformed store metadata"):
        store.resolve("cls")


@pytest.mark.parametrize("case", ["missing_weights", "pickle", "wrong_labels", "labels_without_head",
                                  "rank_over_max", "no_folder", "name_too_long", "link_loop", "unreadable_weights"])
def test_bad_adapters_leave_nothing_behind(tmp_path, schema, case):
    root = tmp_path / "store"
    store = AdapterStore(root)
    head = "SEQ_CLS" if case == "wrong_labels" else None
    src = lora(tmp_path, schema, head=head, r=8)
    kw = {}
    if case == "missing_weights":
        (src / "adapter_model.safetensors").unlink()
    elif case == "pickle":
        (src / "pytorch_model.bin").write_bytes(b"\x80\x04")
    elif case in ("wrong_labels", "labels_without_head"):
        kw["labels"] = ["only", "two"]
    elif case == "rank_over_max":
        kw["max_rank"] = 4
    elif case == "no_folder":
        src = tmp_path / "nowhere"
    elif case == "name_too_long":  # the OS refuses the path (ENAMETOOLONG): the caller's mistake, not a crash
        src = tmp_path / ("a" * 5000)
    elif case == "link_loop":  # ELOOP
        src = tmp_path / "loop"
        src.symlink_to(src)
    elif case == "unreadable_weights":  # EISDIR where a file is read
        (src / "adapter_model.safetensors").unlink()
        (src / "adapter_model.safetensors").mkdir()
    with pytest.raises(AdapterError, match=None if case in ("wrong_labels", "labels_without_head", "rank_over_max",
                                                           "missing_weights", "pickle") else str(src)[:60]):
        store.add("bad", src, schema=schema, **kw)
    assert not root.exists()
    assert store.list() == []


@pytest.mark.parametrize("ref", BAD_REFS, ids=repr)
def test_bad_names_and_refs_are_refused(tmp_path, schema, ref):
    root = tmp_path / "store"
    store = AdapterStore(root)
    store.add("x", lora(tmp_path, schema), schema=schema)
    before = visible(root)
    with pytest.raises(AdapterError) as err:
        store.resolve(ref)
    assert len(str(err.value)) < 400
    if "@" not in ref:
        with pytest.raises(AdapterError):
            store.add(ref, lora(tmp_path, schema), schema=schema)
        with pytest.raises(AdapterError):
            store.remove(ref)
    assert visible(root) == before


@pytest.mark.parametrize("version", [0, -1, True, "1", 1.0])
def test_remove_refuses_bad_versions(tmp_path, version):
    with pytest.raises(AdapterError, match="invalid adapter version"):
        AdapterStore(tmp_path / "store").remove("x", version)


def test_concurrent_adds_of_one_name_get_distinct_versions(tmp_path, schema):
    store = AdapterStore(tmp_path / "store")
    sources = [lora(tmp_path, schema, seed=i) for i in range(6)]
    results, errors = [], []
    barrier = threading.Barrier(len(sources))

    def add(src):
        try:
            barrier.wait()
            results.append(store.add("same", src, schema=schema))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=add, args=(s,)) for s in sources]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(v.version for v in results) == [1, 2, 3, 4, 5, 6]
    assert sorted(store.list(), key=lambda v: v.version) == sorted(results, key=lambda v: v.version)
    assert list((tmp_path / "store" / ".tmp").iterdir()) == []


@pytest.fixture
def memory_url():
    import fsspec

    url = f"memory://polyhead-test-{uuid.uuid4().hex}/store"
    yield url
    fs, path = fsspec.core.url_to_fs(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def test_memory_backend_commit_marker_cache_and_hash(tmp_path, schema, memory_url):
    import fsspec

    fs, base = fsspec.core.url_to_fs(memory_url)
    store = AdapterStore(memory_url, cache_dir=tmp_path / "cache")
    src = lora(tmp_path, schema, head="TOKEN_CLS", num_labels=2)
    v1 = store.add("m", src, schema=schema, labels=["O", "X"])
    assert fs.cat_file(f"{base}/m/1/COMMITTED").decode() == v1.sha256
    got = store.resolve("m")
    assert got == v1 and got.path == tmp_path / "cache" / v1.sha256 and got.labels == ("O", "X")
    assert sha256_of(got.path / "adapter_model.safetensors") == sha256_of(src / "adapter_model.safetensors")

    v2 = store.add("m", lora(tmp_path, schema, seed=5), schema=schema)
    assert [x.ref for x in store.list()] == ["m@1", "m@2"]
    fs.rm_file(f"{base}/m/2/COMMITTED")  # as if the writer died before its last step
    assert [x.ref for x in store.list()] == ["m@1"] and store.resolve("m") == v1
    with pytest.raises(AdapterError, match="unknown version m@2"):
        store.resolve("m@2")
    v3 = store.add("m", lora(tmp_path, schema, seed=6), schema=schema)
    assert v3.version == 3 and v2.version == 2

    fs.pipe_file(f"{base}/m/3/adapter_config.json", fs.cat_file(f"{base}/m/3/adapter_config.json") + b" ")
    with pytest.raises(AdapterError, match="adapter_config.json does not match its recorded sha256"):
        store.resolve("m@3")
    assert not (tmp_path / "cache" / v3.sha256).exists()
    assert list((tmp_path / "cache" / ".tmp").iterdir()) == []

    assert store.remove("m", 1) == [v1]
    assert [x.ref for x in store.list()] == ["m@3"]
    assert store.add("m", src, schema=schema).version == 4


def test_memory_backend_bad_adapter_writes_nothing(tmp_path, schema, memory_url):
    import fsspec

    fs, base = fsspec.core.url_to_fs(memory_url)
    src = lora(tmp_path, schema)
    (src / "adapter_model.safetensors").write_bytes(b"junk")
    with pytest.raises(AdapterError):
        AdapterStore(memory_url, cache_dir=tmp_path / "cache").add("m", src, schema=schema)
    assert not fs.exists(base) or fs.find(base) == []


def _upload(src: Path, url: str) -> None:
    """src's files into the folder at the fsspec URL `url`."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    for f in src.iterdir():
        fs.pipe_file(f"{path}/{f.name}", f.read_bytes())


def test_add_from_a_url_fetches_the_adapter_files_only(tmp_path, schema, memory_url, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    src = lora(tmp_path, schema, head="SEQ_CLS", num_labels=3)
    (src / "README.md").write_text("not stored")
    url = memory_url.replace("/store", "/source/cls")
    _upload(src, url)
    store = AdapterStore(tmp_path / "store")
    v1 = store.add("cls", url, schema=schema, labels=["a", "b", "c"])
    assert v1.labels == ("a", "b", "c") and v1.task == "seq_cls"
    stored = sorted(p.name for p in v1.path.iterdir())
    assert stored == ["adapter_config.json", "adapter_model.safetensors", "polyhead.json"]
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        assert sha256_of(v1.path / f) == sha256_of(src / f)
    assert store.add("cls", f"file://{src}", schema=schema).sha256 == v1.sha256  # file:// is a local path
    assert list((tmp_path / "tmp").iterdir()) == []  # the downloaded copy is gone


@pytest.mark.parametrize("case", ["pickle", "no_folder", "a_file", "no_adapter_files", "bad_weights",
                                  "unknown_protocol", "refused_connection", "filesystem_error"])
def test_bad_url_sources_are_refused_naming_the_url(tmp_path, schema, memory_url, case):
    src = lora(tmp_path, schema)
    url = memory_url.replace("/store", "/source/x")
    if case == "pickle":
        (src / "pytorch_model.bin").write_bytes(b"\x80\x04")
    elif case == "no_adapter_files":
        for f in list(src.iterdir()):
            f.rename(src / (f.name + ".old"))
    elif case == "bad_weights":
        (src / "adapter_model.safetensors").write_bytes(b"junk")
    _upload(src, url)
    source = {"no_folder": url + "-nowhere", "a_file": url + "/adapter_config.json",
              "unknown_protocol": "nosuchfs://bucket/x", "refused_connection": "http://127.0.0.1:1/adapters/x/",
              "filesystem_error": "zip://x"}.get(case, url)
    message = {"pickle": "pickle-based", "no_folder": "no such folder", "a_file": "no such folder",
               "no_adapter_files": "no adapter files", "bad_weights": "adapter_model.safetensors",
               "unknown_protocol": "cannot open this URL", "refused_connection": "cannot list this folder",
               "filesystem_error": "cannot open this URL"}[case]
    store = AdapterStore(tmp_path / "store")
    with pytest.raises(AdapterError, match=message) as caught:
        store.add("x", source, schema=schema)
    assert source[:40] in str(caught.value) and "polyhead-source-" not in str(caught.value)
    assert store.list() == [] and not (tmp_path / "store").exists()


def test_a_url_source_over_the_file_limit_is_refused(tmp_path, schema, memory_url):
    import fsspec

    from adapters_store import FileLimits
    from adapters_store.sources import _download, source_folder

    src = lora(tmp_path, schema)
    url = memory_url.replace("/store", "/source/big")
    _upload(src, url)
    limit = (src / "adapter_model.safetensors").stat().st_size - 1
    with pytest.raises(AdapterError, match="over the .*-byte limit"):
        with source_folder(url, frozenset({"adapter_model.safetensors"}), FileLimits(max_file_bytes=limit)):
            pass
    fs, path = fsspec.core.url_to_fs(url)  # a listing's size is not trusted: the copy stops at the limit
    with pytest.raises(AdapterError, match="over the .*-byte limit"):
        _download(fs, f"{path}/adapter_model.safetensors", tmp_path / "copy", limit, "x")


CHILD = r"""
import json, sys, time
from adapters_store import AdapterStore, BaseSchema, LinearShape
from adapters_store import store as store_module

fields = json.loads(open(sys.argv[3]).read())
schema = BaseSchema(**{**fields, "linears": {k: LinearShape(**v) for k, v in fields["linears"].items()}})

def slow_copy(src, dst, hasher, bar):
    # copy one chunk of the weights, say so, then hang until killed
    chunk = src.read(1 << 16)
    dst.write(chunk)
    dst.flush()
    if str(getattr(dst, "name", "")).endswith(".safetensors"):
        print("MID-COPY", flush=True)
        time.sleep(600)
    hasher.update(chunk)
    rest = src.read()
    dst.write(rest)
    hasher.update(rest)
    return len(chunk) + len(rest)

store_module._copy_stream = slow_copy
AdapterStore(sys.argv[1]).add("big", sys.argv[2], schema=schema, max_rank=64)
print("FINISHED", flush=True)
"""


def test_kill_mid_copy_leaves_no_partial_version(tmp_path, schema):
    root = tmp_path / "store"
    src = make_lora(tmp_path / "big", schema, seed=9, r=64, targets=("query", "key", "value", "dense"))
    size = (src / "adapter_model.safetensors").stat().st_size
    assert size > 8 * 1024**2
    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps(dataclasses.asdict(schema)))
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(root), str(src), str(schema_file)],
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = child.stdout.readline()
        assert line.strip() == "MID-COPY", child.stderr.read()
        partial = list((root / ".tmp").glob("add-*/adapter_model.safetensors"))
        assert len(partial) == 1 and 0 < partial[0].stat().st_size < size
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL

    store = AdapterStore(root)
    assert store.list() == [] and visible(root) == []
    with pytest.raises(AdapterError, match="unknown adapter 'big'"):
        store.resolve("big")
    v = store.add("big", src, schema=schema)
    assert v.version == 1 and store.resolve("big", verify=True) == v


def test_stale_staging_is_swept(tmp_path, schema):
    root = tmp_path / "store"
    stale = root / ".tmp" / "add-deadbeef"
    stale.mkdir(parents=True)
    (stale / "adapter_model.safetensors").write_bytes(b"partial")
    old = os.stat(stale).st_mtime - store_module.STALE_TMP_SECONDS - 10
    os.utime(stale, (old, old))
    AdapterStore(root).add("x", lora(tmp_path, schema), schema=schema)
    assert not stale.exists()


# ---- command line ---------------------------------------------------------------------------


def test_cli_add_list_rm(tmp_path, schema, monkeypatch, capsys):
    from serving.cli import main

    bases = []

    def from_config_dir(base):  # the bundled MiniLM, without building it again
        bases.append(Path(base))
        return schema

    monkeypatch.setattr(BaseSchema, "from_config_dir", staticmethod(from_config_dir))
    store = str(tmp_path / "store")
    src = lora(tmp_path, schema, head="SEQ_CLS", num_labels=2)
    assert main(["adapters", "add", "cli", str(src), "--labels", "neg,pos", "--store", store]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("added cli@1 sha256:") and bases == [minilm_path()]
    assert main(["adapters", "add", "cli", str(src), "--labels", "neg,pos", "--store", store,
                 "--base", str(minilm_path())]) == 0
    capsys.readouterr()
    assert AdapterStore(store).resolve("cli").labels == ("neg", "pos")

    assert main(["adapters", "list", "--store", store]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["ADAPTER", "SHA256", "CREATED", "TASK", "LABELS"]
    assert [ln.split()[0] for ln in lines[1:]] == ["cli@1", "cli@2"] and lines[1].split()[-2:] == ["seq_cls", "neg,pos"]

    assert main(["adapters", "rm", "cli@1", "--store", store]) == 0
    assert capsys.readouterr().out == "removed cli@1\n"
    assert main(["adapters", "rm", "cli", "--store", store]) == 0
    assert capsys.readouterr().out == "removed cli@2\n"
    assert AdapterStore(store).list() == []


@pytest.mark.parametrize("argv, message", [
    (["adapters", "rm", "nope"], "unknown adapter 'nope'"),
    (["adapters", "rm", "x@abc"], "positive integer"),
    (["adapters", "add", "../x", "SRC"], "invalid adapter name"),
    (["adapters", "add", "ok", "SRC", "--labels", "a,,b"], "empty label name"),
    (["adapters", "add", "ok", "SRC", "--base", "/nonexistent"], "no such model folder"),
    (["adapters", "add", "ok", "/nonexistent"], "not an adapter folder"),
    (["adapters", "frobnicate"], "invalid choice"),
    (["adapters", "list", "--bogus"], "unrecognized arguments"),
])
def test_cli_errors_are_one_line_and_exit_1(tmp_path, schema, monkeypatch, capsys, argv, message):
    from serving.cli import main

    monkeypatch.setattr(BaseSchema, "from_config_dir", staticmethod(lambda base: schema))
    src = lora(tmp_path, schema)
    argv = [str(src) if a == "SRC" else a for a in argv]
    try:
        rc = main([*argv, "--store", str(tmp_path / "store")])
    except SystemExit as exc:  # argparse's own usage errors
        rc = exc.code
    err = capsys.readouterr().err
    assert rc == 1 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_cli_subprocess_error_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "serving.cli", "adapters", "rm", "../x", "--store", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.startswith("polyhead adapters rm: error: invalid adapter name") and "Traceback" not in proc.stderr
