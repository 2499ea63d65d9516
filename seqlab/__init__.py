"""seqlab: efficient sequence models, verified."""

__version__ = "0.1.0"
