"""Errors raised by pymerge. Every message names the offending file, tensor or key."""


class MergeError(Exception):
    """Base class of every error pymerge raises on bad input or a failed merge."""


class ConfigError(MergeError, ValueError):
    """An invalid merge configuration: unknown key, invalid value, missing model."""


class CheckpointError(MergeError):
    """A checkpoint that cannot be read: missing file, corrupt header, truncated shard."""


class InputMismatchError(MergeError):
    """Input models that do not fit together: missing tensors, shape or dtype mismatch."""


class NonFiniteError(MergeError):
    """A NaN or Inf in an input tensor (pass --allow-nonfinite to merge them anyway)."""


class OutputError(MergeError):
    """The output could not be written (disk full, permission denied, ...)."""
