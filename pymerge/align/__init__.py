"""Alignment: permutation specs, weight/activation matching, aligned merges, widths, barriers.

See docs/alignment.md. The submodules:

- spec: PermutationSpec and the builders (mlp, llama, gpt2, bert, from a HF config)
- matching: weight matching, head-structured assignment, activation matching
- apply: permuted state dicts, aligned_average through ops.permute_average, permutation files
- widths: partial maps, width merges, exact zero-padding
- interpolate: interpolation curves and barriers
- checkpoint: align two checkpoints, merge with saved permutations
"""

# The names load with their submodule on first use: the engine imports align.apply for
# every merge and must not pay for matching, interpolation and the rest.
_SUBMODULES = {
    "apply": (
        "PermutationFile",
        "aligned_average",
        "aligned_tensor",
        "iter_aligned_average",
        "load_permutation_file",
        "load_permutations",
        "permute_state_dict",
        "permuted_tensor",
        "save_permutations",
        "tensor_maps",
    ),
    "checkpoint": (
        "align_checkpoints",
        "merge_with_permutations",
    ),
    "interpolate": (
        "InterpolationCurve",
        "alpha_grid",
        "barriers",
        "interpolate",
        "interpolation_curve",
        "mean_stderr",
        "recompute_batchnorm",
    ),
    "matching": (
        "ActivationMatchResult",
        "CorrelationStats",
        "MatchResult",
        "activation_matching",
        "activation_sites",
        "collect_activations",
        "lap",
        "match_objective",
        "weight_matching",
    ),
    "spec": (
        "HeadGroup",
        "PermutationSpec",
        "RopeWithinHeadError",
        "SpecBuilder",
        "bert_spec",
        "gpt2_spec",
        "llama_spec",
        "mlp_spec",
        "spec_from_config",
    ),
    "widths": (
        "infer_heads",
        "match_widths",
        "merge_widths",
        "pad_heads",
        "pad_width",
        "partial_assignment",
        "renamed",
    ),
}
_LAZY = {name: module for module, names in _SUBMODULES.items() for name in names}

# A name that is also a submodule's name is bound now: importing the submodule later
# would set the package attribute to the module, and __getattr__ would never be asked.
from pymerge.align.interpolate import interpolate  # noqa: E402

__all__ = sorted(_LAZY)


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pymerge.align' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"pymerge.align.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
