"""Model loading, the registry of named models, and per-architecture module maps."""

from factedit.models.architectures import ARCHITECTURES, ArchSpec, arch_for
from factedit.models.fingerprint import model_fingerprint
from factedit.models.loading import load_model
from factedit.models.registry import DEFAULT_MODEL, REGISTRY

__all__ = ["ARCHITECTURES", "ArchSpec", "arch_for", "model_fingerprint", "load_model", "DEFAULT_MODEL", "REGISTRY"]
