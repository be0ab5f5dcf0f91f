"""pymerge: compiled-kernel accelerated model merging."""

__version__ = "0.1.0"
