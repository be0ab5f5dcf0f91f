"""Build of the native extensions; the package metadata lives in pyproject.toml.

pymerge._C      CPU kernels: every csrc/cpu/*.cpp, pybind11, C++17, std::thread.
pymerge._C_cuda CUDA kernels from csrc/cuda (see cuda_extensions(): not wired yet).

Neither needs torch headers: the kernels take raw pointers and dtype tags, so
the build is independent of the torch ABI and needs only setuptools + pybind11.

    pip install -e . --no-build-isolation     # development
    python setup.py build_ext --inplace       # rebuild the extension in place
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from glob import glob

from pybind11.setup_helpers import ParallelCompile, Pybind11Extension, build_ext
from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _rel(paths):
    # setuptools wants source paths relative to setup.py, in a stable order.
    return sorted(os.path.relpath(p, HERE) for p in paths)


def _cpu_compile_args() -> list[str]:
    if sys.platform == "win32":
        return ["/O2", "/fp:precise"]
    return [
        "-O3",
        # Bit-identity with the torch reference: a*b+c must stay two roundings.
        "-ffp-contract=off",
        # No -march=native: the wheel has to run on any x86-64 / aarch64.
    ]


def cpu_extension() -> Pybind11Extension:
    sources = _rel(glob(os.path.join(HERE, "csrc", "cpu", "*.cpp")))
    headers = _rel(
        glob(os.path.join(HERE, "csrc", "common", "*.h"))
        + glob(os.path.join(HERE, "csrc", "cpu", "*.h"))
    )
    return Pybind11Extension(
        "pymerge._C",
        sources,
        include_dirs=["csrc"],
        depends=headers,  # rebuild on header changes; also puts them in the sdist
        cxx_std=17,
        extra_compile_args=_cpu_compile_args(),
        # Threads via std::thread (no OpenMP: torch bundles its own libgomp).
        extra_link_args=[] if sys.platform == "win32" else ["-pthread"],
    )


# --------------------------------------------------------------------------
# CUDA HOOK (DISABLED): pymerge._C_cuda
# Built only when PYMERGE_CUDA=1, or nvcc and a GPU are both present, and
# csrc/cuda holds .cu sources. A CPU install never compiles or links CUDA.
# The nvcc build rule is not written yet, so for now this only reports what it
# would do; flip CUDA_EXTENSION_ENABLED once it is.
# --------------------------------------------------------------------------
CUDA_EXTENSION_ENABLED = False


def _cuda_requested() -> bool:
    flag = os.environ.get("PYMERGE_CUDA", "").strip().lower()
    if flag in ("0", "false", "no", "off"):
        return False
    if flag in ("1", "true", "yes", "on"):
        return True
    if shutil.which("nvcc") is None:
        return False
    try:
        probe = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return probe.returncode == 0 and "GPU" in probe.stdout


def cuda_extensions() -> list:
    sources = _rel(glob(os.path.join(HERE, "csrc", "cuda", "**", "*.cu"), recursive=True))
    if not sources or not _cuda_requested():
        return []
    if not CUDA_EXTENSION_ENABLED:
        print(
            "pymerge: CUDA sources found but the pymerge._C_cuda build is not enabled yet; "
            "building the CPU extension only.",
            file=sys.stderr,
        )
        return []
    raise NotImplementedError("pymerge._C_cuda build rule")  # pragma: no cover


ParallelCompile("PYMERGE_BUILD_JOBS", default=0).install()

setup(
    # triton_kernels/ lives at the top of the tree (one folder per layer) but
    # installs inside the package, mapped in pyproject's package-dir.
    packages=find_packages(include=["pymerge", "pymerge.*"]) + ["pymerge.triton_kernels"],
    ext_modules=[cpu_extension(), *cuda_extensions()],
    cmdclass={"build_ext": build_ext},
    zip_safe=False,
)
