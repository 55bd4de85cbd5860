"""Second-moment statistics of rewrite-module inputs, shared by every editing method.

Statistics of float32 weights also serve the same weights cast to bfloat16 or float16 (never the
other way); see :mod:`factedit.stats.second_moment` and docs/integrity.md.
"""

from factedit.stats.corpus import TextCorpus, open_corpus
from factedit.stats.second_moment import load_second_moment, second_moments

__all__ = ["TextCorpus", "open_corpus", "load_second_moment", "second_moments"]
