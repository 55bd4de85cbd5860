"""Second-moment statistics of rewrite-module inputs, shared by every editing method."""

from factedit.stats.corpus import TextCorpus, open_corpus
from factedit.stats.second_moment import load_second_moment, second_moments

__all__ = ["TextCorpus", "open_corpus", "load_second_moment", "second_moments"]
