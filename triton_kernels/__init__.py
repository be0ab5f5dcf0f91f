"""Triton kernels, one module per op family, each kernel beside its launch wrapper.

average (weighted_sum), dare (Philox keep mask, L1 norms, merge), emr (elect,
reconstruct), permute (permute_average), slerp (row sums, combine), histogram
(radix digit histograms, exact top-k trims with the index tie-break), ties and
breadcrumbs (fused trim-elect-merge), pcb (scores, fused merge); reduce
(fixed-order fp64 sums of per-block partials) and _common (exact dtype
conversions, launch options) are shared. The launch wrappers take prepared
tensors; pymerge.backends.triton validates the op arguments and calls them.
"""
