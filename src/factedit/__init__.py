"""factedit: locate and edit factual knowledge in transformer language models."""

__version__ = "0.1.0"

from factedit.editing.hparams import ROMEHyperParams  # noqa: E402
from factedit.editing.patch import Patch  # noqa: E402
from factedit.editing.requests import EditRequest  # noqa: E402
from factedit.editing.rome import apply_rome, compute_rome  # noqa: E402
from factedit.errors import FactEditError  # noqa: E402
from factedit.models import arch_for, load_model  # noqa: E402
from factedit.stats import second_moments  # noqa: E402

__all__ = [
    "__version__", "ROMEHyperParams", "Patch", "EditRequest", "apply_rome", "compute_rome", "FactEditError",
    "arch_for", "load_model", "second_moments",
]
