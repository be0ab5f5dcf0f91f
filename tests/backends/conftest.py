import os

import pytest

# The Triton tests run the kernels in Triton's interpreter on CPU tensors (CI has no GPU).
# Triton reads this when the kernels are decorated, so it is set before any test module
# imports them. TRITON_INTERPRET=0 in the environment runs the same tests on a GPU.
os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _restore_cpu_threads():
    """Tests may change the CPU kernels' thread count; put it back afterwards."""
    from pymerge.backends import cpu

    before = cpu.get_num_threads() if cpu.available() else None
    yield
    if before is not None:
        cpu.set_num_threads(before)


@pytest.fixture
def torch_one_thread():
    """The torch reference on one thread for the test (see cases.torch_on_one_thread)."""
    from .cases import torch_on_one_thread

    with torch_on_one_thread():
        yield
