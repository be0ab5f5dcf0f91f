"""Checkpoint I/O: a validating, memory-mapped reader and a streaming, atomic, resumable writer."""

from pymerge.io.reader import (
    SAFETENSORS_DTYPES,
    TORCH_TO_SAFETENSORS,
    CheckpointReader,
    TensorInfo,
    dtype_from_safetensors,
    dtype_to_safetensors,
    read_safetensors_header,
)
from pymerge.io.writer import PARTIAL_DIR, PROGRESS_FILE, CheckpointWriter, plan_hash, shard_plan

__all__ = [
    "CheckpointReader",
    "CheckpointWriter",
    "PARTIAL_DIR",
    "PROGRESS_FILE",
    "SAFETENSORS_DTYPES",
    "TORCH_TO_SAFETENSORS",
    "TensorInfo",
    "dtype_from_safetensors",
    "dtype_to_safetensors",
    "plan_hash",
    "read_safetensors_header",
    "shard_plan",
]
