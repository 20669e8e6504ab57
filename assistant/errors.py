"""The product's own error type.

Every failure a user can cause (bad input, a missing index, a wrong model) is raised as a
`BedsideError` whose message names the input and the fix; the CLI prints it as one line on
stderr and exits non-zero. Anything else escaping is a bug.
"""

from __future__ import annotations


class BedsideError(Exception):
    """A user-facing failure with a message that names the input and the fix."""


class CorpusError(BedsideError):
    """A source document that cannot be read or parsed."""


class IndexStoreError(BedsideError):
    """A missing, corrupt or incompatible index."""


class ModelError(BedsideError):
    """A base model, embedder or adapter that cannot be loaded or does not match."""
