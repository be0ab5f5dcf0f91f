"""Analysis of model families and merges: task-vector statistics, interpolation curves, merge quality.

- inspect_models: per-layer and overall task-vector norms, cosines, sign conflicts, trim
  densities, EMR masks and rescalers, streamed tensor by tensor (`pymerge inspect`)
- interpolate: the loss/accuracy curve between two checkpoints and its barriers
  (over pymerge.align.interpolate)
- quality: the multi-task digits benchmark that merges real checkpoints with every
  method through the engine (`pymerge quality`)
"""

from pymerge.analysis.inspect_models import GroupStats, InspectReport, inspect_models
from pymerge.analysis.interpolate import InterpolationResult, interpolate, load_state_dict
from pymerge.analysis.quality import QualityConfig, QualityResult, default_config, quick_config, run_quality

__all__ = [
    "GroupStats",
    "InspectReport",
    "inspect_models",
    "InterpolationResult",
    "interpolate",
    "load_state_dict",
    "QualityConfig",
    "QualityResult",
    "default_config",
    "quick_config",
    "run_quality",
]
