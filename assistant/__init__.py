"""bedside: a clinical assistant that answers from cited guideline text."""

__version__ = "0.1.0"
