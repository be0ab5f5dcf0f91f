import os

# Triton picks interpreting or compiling when it is first imported: decide before
# any test imports it. CI has no GPU; on a GPU machine run with TRITON_INTERPRET=0.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from pymerge.synthetic import llama_family


@pytest.fixture(scope="session")
def family(tmp_path_factory):
    """A small sharded bf16 Llama-shaped base and three fine-tunes (odd sizes on purpose)."""
    root = tmp_path_factory.mktemp("family")
    return llama_family(root, n_models=3, layers=2, hidden=32, intermediate=44, heads=4, kv_heads=2, vocab=50,
                        dtype=torch.bfloat16, shards=3, seed=1)
