import os

# The Triton tests run the kernels in Triton's interpreter on CPU tensors (CI has no GPU).
# Triton reads this when the kernels are decorated, so it is set before any test module
# imports them. TRITON_INTERPRET=0 in the environment runs the same tests on a GPU.
os.environ.setdefault("TRITON_INTERPRET", "1")
