"""Known facts (ROME's ``known_1000.json``): one loader, shared with causal tracing."""

from __future__ import annotations

from factedit.tracing.knowns import KNOWN_URL, KnownFact, known_facts_path, load_known_facts

__all__ = ["KNOWN_URL", "KnownFact", "known_facts_path", "load_known_facts"]
