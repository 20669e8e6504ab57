"""Source documents: one loader per format, each returning `Document`s."""

from assistant.corpus.document import Document, Section
from assistant.corpus.loaders import LOADERS, load_corpus, load_file

__all__ = ["Document", "Section", "LOADERS", "load_corpus", "load_file"]
