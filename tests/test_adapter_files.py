"""Every read of an adapter file is bounded: a cap on the bytes read whatever the file claims, regular files
inside the adapter's folder only, and JSON nested too deeply is a clear AdapterError (never a RecursionError)."""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import resource

from adapters_store import AdapterError, BaseSchema, FileLimits, load_adapter_dir
from adapters_store.files import read_bounded
from tests.adapter_factory import make_lora
from tests.conftest import minilm_path

WEIGHTS = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def schema() -> BaseSchema:
    return BaseSchema.from_config_dir(minilm_path())


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_a_weights_symlink_to_a_huge_sparse_file_outside_the_folder_is_refused_unread(tmp_path, schema):
    folder = make_lora(tmp_path / "a", schema, seed=1)
    sparse = tmp_path / "sparse.bin"
    with sparse.open("wb") as f:
        f.truncate(2 * 1024**3)  # 2 GiB of holes: reading it whole took 2 GiB of memory
    (folder / WEIGHTS).unlink()
    (folder / WEIGHTS).symlink_to(sparse)
    before = _max_rss_mb()
    with pytest.raises(AdapterError, match="symlink that leaves the adapter folder"):
        load_adapter_dir(folder, schema)
    assert _max_rss_mb() - before < 100


def test_a_symlink_inside_the_folder_is_read(tmp_path, schema):
    folder = make_lora(tmp_path / "a", schema, seed=1)
    (folder / WEIGHTS).rename(folder / "real.safetensors")
    (folder / WEIGHTS).symlink_to("real.safetensors")
    spec = load_adapter_dir(folder, schema)
    assert spec.lora


def test_a_large_file_inside_the_folder_is_refused_by_its_cap_without_reading_it(tmp_path, schema):
    folder = make_lora(tmp_path / "a", schema, seed=1)
    with (folder / WEIGHTS).open("r+b") as f:
        f.truncate(512 * 1024**2)  # a sparse tail: 512 MiB claimed
    before = _max_rss_mb()
    with pytest.raises(AdapterError, match=r"over the 1048576-byte limit for an adapter file"):
        load_adapter_dir(folder, schema, limits=FileLimits(max_file_bytes=1024**2))
    assert _max_rss_mb() - before < 100


def test_a_file_that_reports_size_zero_is_still_capped():
    """/proc files report 0 bytes (/proc/kallsyms as adapter_config.json bypassed the config size limit)."""
    path = Path("/proc/self/smaps")
    if not path.exists():
        pytest.fail("this test needs Linux /proc")
    assert path.stat().st_size == 0
    with pytest.raises(AdapterError, match="over the 1000-byte limit for a config file"):
        read_bounded(path, 1000, "a config file")


def test_special_files_are_refused_without_blocking(tmp_path, schema):
    folder = make_lora(tmp_path / "a", schema, seed=1)
    (folder / "adapter_config.json").unlink()
    os.mkfifo(folder / "adapter_config.json")  # opened for reading, a FIFO would wait for a writer forever
    with pytest.raises(AdapterError, match="not a regular file"):
        load_adapter_dir(folder, schema)


def test_a_config_symlinked_to_a_system_file_is_refused(tmp_path, schema):
    folder = make_lora(tmp_path / "a", schema, seed=1)
    (folder / "adapter_config.json").unlink()
    (folder / "adapter_config.json").symlink_to("/etc/passwd")
    with pytest.raises(AdapterError, match="symlink that leaves the adapter folder"):
        load_adapter_dir(folder, schema)


def test_deeply_nested_json_is_an_adapter_error(tmp_path, schema):
    folder = make_lora(tmp_path / "a", schema, seed=1)
    (folder / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(AdapterError, match="nested too deeply"):
        load_adapter_dir(folder, schema)

    folder = make_lora(tmp_path / "b", schema, seed=1)
    header = ('{"a":' * 200_000 + "1" + "}" * 200_000).encode()
    (folder / WEIGHTS).write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(AdapterError, match="nested too deeply"):
        load_adapter_dir(folder, schema)
    assert json.loads((folder / "adapter_config.json").read_text())  # the config itself was fine
