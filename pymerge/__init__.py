"""pymerge: compiled-kernel accelerated model merging.

    import pymerge
    report = pymerge.merge("config.yml", "out/")      # or a dict, or a MergeConfig
    merged = pymerge.ops.ties_merge(base, [a, b], densities=0.3)
"""

__version__ = "0.1.0"

from pymerge import emr, ops  # noqa: E402
from pymerge.engine import MergeReport, merge  # noqa: E402

__all__ = ["merge", "MergeReport", "ops", "emr", "__version__"]
