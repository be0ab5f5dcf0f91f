"""The torch backend: the reference implementation, on any device torch supports."""

from pymerge.ops.reference import *  # noqa: F401,F403  (every op of the reference)


def available() -> bool:
    return True
