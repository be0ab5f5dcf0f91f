"""The torch reference of every merge primitive: the oracle every backend is tested against.

One module per op family. Each public function's docstring states the math and
the exact fp32 op order, which the compiled and Triton kernels reproduce.
"""

from pymerge.ops.reference.average import weighted_sum
from pymerge.ops.reference.breadcrumbs import breadcrumbs_merge
from pymerge.ops.reference.dare import dare_merge
from pymerge.ops.reference.emr import emr_elect, emr_merge_model, emr_reconstruct, emr_rescalers, pack_bits, unpack_bits
from pymerge.ops.reference.pcb import pcb_merge, pcb_merge_model, pcb_merge_with_stats, pcb_scores
from pymerge.ops.reference.permute import permute_average
from pymerge.ops.reference.philox import dare_keep_mask, dare_key, fnv1a64, philox4x32_10
from pymerge.ops.reference.slerp import slerp
from pymerge.ops.reference.ties import ties_merge, ties_merge_model, ties_model_scope, ties_sign_sum

__all__ = [
    "weighted_sum",
    "ties_merge",
    "ties_sign_sum",
    "ties_merge_model",
    "ties_model_scope",
    "dare_merge",
    "dare_keep_mask",
    "dare_key",
    "fnv1a64",
    "philox4x32_10",
    "breadcrumbs_merge",
    "slerp",
    "emr_elect",
    "emr_reconstruct",
    "emr_rescalers",
    "emr_merge_model",
    "pack_bits",
    "unpack_bits",
    "pcb_merge",
    "pcb_scores",
    "pcb_merge_with_stats",
    "pcb_merge_model",
    "permute_average",
]
