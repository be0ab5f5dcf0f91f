"""Alignment: permutation specs, weight/activation matching, aligned merges, widths, barriers.

See docs/alignment.md. The submodules:

- spec: PermutationSpec and the builders (mlp, llama, gpt2, bert, from a HF config)
- matching: weight matching, head-structured assignment, activation matching
- apply: permuted state dicts, aligned_average through ops.permute_average, permutation files
- widths: partial maps, width merges, exact zero-padding
- interpolate: interpolation curves and barriers
- checkpoint: align two checkpoints, merge with saved permutations
"""

from pymerge.align.apply import (
    PermutationFile,
    aligned_average,
    aligned_tensor,
    iter_aligned_average,
    load_permutation_file,
    load_permutations,
    permute_state_dict,
    permuted_tensor,
    save_permutations,
    tensor_maps,
)
from pymerge.align.checkpoint import align_checkpoints, merge_with_permutations
from pymerge.align.interpolate import (
    InterpolationCurve,
    alpha_grid,
    barriers,
    interpolate,
    interpolation_curve,
    mean_stderr,
    recompute_batchnorm,
)
from pymerge.align.matching import (
    ActivationMatchResult,
    CorrelationStats,
    MatchResult,
    activation_matching,
    activation_sites,
    collect_activations,
    lap,
    match_objective,
    weight_matching,
)
from pymerge.align.spec import (
    HeadGroup,
    PermutationSpec,
    RopeWithinHeadError,
    SpecBuilder,
    bert_spec,
    gpt2_spec,
    llama_spec,
    mlp_spec,
    spec_from_config,
)
from pymerge.align.widths import infer_heads, match_widths, merge_widths, pad_heads, pad_width, partial_assignment, renamed

__all__ = [
    "ActivationMatchResult",
    "CorrelationStats",
    "HeadGroup",
    "InterpolationCurve",
    "MatchResult",
    "PermutationFile",
    "PermutationSpec",
    "RopeWithinHeadError",
    "SpecBuilder",
    "activation_matching",
    "activation_sites",
    "align_checkpoints",
    "aligned_average",
    "aligned_tensor",
    "alpha_grid",
    "barriers",
    "bert_spec",
    "collect_activations",
    "gpt2_spec",
    "infer_heads",
    "interpolate",
    "interpolation_curve",
    "iter_aligned_average",
    "lap",
    "llama_spec",
    "load_permutation_file",
    "load_permutations",
    "match_objective",
    "match_widths",
    "mean_stderr",
    "merge_with_permutations",
    "merge_widths",
    "mlp_spec",
    "pad_heads",
    "pad_width",
    "partial_assignment",
    "permute_state_dict",
    "permuted_tensor",
    "recompute_batchnorm",
    "renamed",
    "save_permutations",
    "spec_from_config",
    "tensor_maps",
    "weight_matching",
]
