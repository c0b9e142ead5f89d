import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from helpers import make_tiny_model  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(ROOT), "shared", "data")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A local folder holding a tiny random Llama (2 layers, d_model 16) and its word-level tokenizer."""
    return make_tiny_model(str(tmp_path_factory.mktemp("tiny-model")))


@pytest.fixture
def shared_data():
    if not os.path.isdir(SHARED_DATA):
        pytest.skip("../shared/data is not present")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _isolated_workdir(tmp_path, monkeypatch):
    monkeypatch.setenv("SSAE_WORKDIR", str(tmp_path / "ssae-work"))
    for key in list(os.environ):
        if key.startswith("SSAE_") and key not in ("SSAE_WORKDIR", "SSAE_CACHE"):
            monkeypatch.delenv(key)
    for key in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN"):
        monkeypatch.delenv(key, raising=False)
