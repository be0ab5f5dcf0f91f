"""Build of the native extensions; the package metadata lives in pyproject.toml.

pymerge._C      CPU kernels: every csrc/cpu/*.cpp, pybind11, C++17, std::thread.
pymerge._C_cuda CUDA kernels from csrc/cuda/**/*.cu, nvcc + static cudart (see cuda_extensions()).

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
from setuptools import Extension, find_packages, setup

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
# CUDA: pymerge._C_cuda from csrc/cuda/**/*.cu
# Built when PYMERGE_CUDA=1, or when PYMERGE_CUDA is unset, torch is a CUDA
# build and nvcc is found; PYMERGE_CUDA=0 never builds it. A CPU install never
# compiles or links CUDA. PYMERGE_CUDA_ONLY=1 builds this extension alone
# (e.g. `PYMERGE_CUDA=1 PYMERGE_CUDA_ONLY=1 python setup.py build_ext --inplace`).
#
# nvcc compiles each .cu (host code through the host compiler, device code for
# sm_80 and sm_90 plus compute_90 PTX for newer GPUs); the host C++ compiler
# links the objects with the static CUDA runtime, so the module needs only the
# driver at run time and imports without a GPU. No torch headers.
# --------------------------------------------------------------------------
CUDA_GENCODE = (
    "arch=compute_80,code=sm_80",
    "arch=compute_90,code=sm_90",
    "arch=compute_90,code=compute_90",
)


def _env_flag(name: str) -> bool | None:
    flag = os.environ.get(name, "").strip().lower()
    if flag in ("0", "false", "no", "off"):
        return False
    if flag in ("1", "true", "yes", "on"):
        return True
    return None


def _find_nvcc() -> str | None:
    if os.environ.get("NVCC"):
        return os.environ["NVCC"]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc") or (
        "/usr/local/cuda/bin/nvcc" if os.path.isfile("/usr/local/cuda/bin/nvcc") else None
    )


def _cuda_requested() -> bool:
    flag = _env_flag("PYMERGE_CUDA")
    if flag is not None:
        return flag
    try:
        import torch  # only to see whether this is a CUDA build of torch
    except Exception:
        return False
    return getattr(torch.version, "cuda", None) is not None and _find_nvcc() is not None


def _cuda_library_dirs(nvcc: str) -> list[str]:
    """Where libcudart_static.a is: nvcc's own -L paths (it may be a wrapper script), else CUDA_HOME."""
    dirs: list[str] = []
    try:
        probe = subprocess.run([nvcc, "--dryrun", "-c", "x.cu", "-o", "x.o"], capture_output=True, text=True, timeout=60)
        for line in (probe.stdout + probe.stderr).splitlines():
            if "LIBRARIES=" in line:
                for tok in line.split("LIBRARIES=", 1)[1].split():
                    tok = tok.strip('"')
                    if tok.startswith("-L") and not tok.rstrip("/").endswith("stubs"):
                        dirs.append(os.path.normpath(tok[2:]))
    except (OSError, subprocess.SubprocessError):
        pass
    home = os.environ.get("CUDA_HOME") or os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    for sub in ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib"), os.path.join("targets", "sbsa-linux", "lib")):
        d = os.path.join(home, sub)
        if os.path.isdir(d) and d not in dirs:
            dirs.append(d)
    return dirs


class CudaExtension(Extension):
    """Marks the extension whose .cu sources the build_ext below hands to nvcc."""


def cuda_extensions() -> list:
    sources = _rel(glob(os.path.join(HERE, "csrc", "cuda", "**", "*.cu"), recursive=True))
    if not sources or not _cuda_requested():
        return []
    headers = _rel(
        glob(os.path.join(HERE, "csrc", "common", "*.h"))
        + glob(os.path.join(HERE, "csrc", "cuda", "**", "*.cuh"), recursive=True)
    )
    return [CudaExtension("pymerge._C_cuda", sources, include_dirs=["csrc"], depends=headers)]


class BuildExt(build_ext):
    """pybind11's build_ext, plus the nvcc rule for CudaExtension."""

    def build_extension(self, ext):
        if not isinstance(ext, CudaExtension):
            return super().build_extension(ext)
        import pybind11
        import sysconfig

        nvcc = _find_nvcc()
        if nvcc is None:
            raise RuntimeError("pymerge._C_cuda: nvcc not found (set NVCC or CUDA_HOME, or PYMERGE_CUDA=0)")
        includes = [os.path.join(HERE, d) for d in ext.include_dirs] + [
            pybind11.get_include(),
            sysconfig.get_paths()["include"],
        ]
        flags = ["-O3", "-std=c++17", "--fmad=false", "-DPYMERGE_CUDA_EXTENSION=1",
                 "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden"]
        for g in CUDA_GENCODE:
            flags += ["-gencode", g]
        flags += [f"-I{d}" for d in includes]
        temp = os.path.join(self.build_temp, "cuda")
        os.makedirs(temp, exist_ok=True)
        headers = [os.path.join(HERE, h) for h in ext.depends]
        objects, commands = [], []
        for src in ext.sources:
            path = os.path.join(HERE, src)
            obj = os.path.join(temp, src.replace(os.sep, "_") + ".o")
            objects.append(obj)
            if self.force or not os.path.exists(obj) or any(
                os.path.getmtime(d) > os.path.getmtime(obj) for d in [path, *headers]
            ):
                commands.append([nvcc, "-c", path, "-o", obj, *flags])
        # nvcc runs one file per process: PYMERGE_BUILD_JOBS of them at once (default: all cores).
        jobs = int(os.environ.get("PYMERGE_BUILD_JOBS", "0") or 0) or os.cpu_count() or 1
        from concurrent.futures import ThreadPoolExecutor

        def run(cmd):
            print(" ".join(cmd), flush=True)
            subprocess.check_call(cmd)

        with ThreadPoolExecutor(max_workers=max(1, min(jobs, len(commands) or 1))) as pool:
            list(pool.map(run, commands))
        out = self.get_ext_fullpath(ext.name)
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        self.compiler.link_shared_object(
            objects,
            out,
            libraries=["cudart_static", "rt", "dl", "pthread"],
            library_dirs=_cuda_library_dirs(nvcc),
            extra_postargs=["-Wl,--as-needed"] if sys.platform.startswith("linux") else [],
            target_lang="c++",
        )


def ext_modules() -> list:
    cuda = cuda_extensions()
    if _env_flag("PYMERGE_CUDA_ONLY"):
        return cuda
    return [cpu_extension(), *cuda]


ParallelCompile("PYMERGE_BUILD_JOBS", default=0).install()

setup(
    # triton_kernels/ lives at the top of the tree (one folder per layer) but
    # installs inside the package, mapped in pyproject's package-dir.
    packages=find_packages(include=["pymerge", "pymerge.*"]) + ["pymerge.triton_kernels"],
    ext_modules=ext_modules(),
    cmdclass={"build_ext": BuildExt},
    zip_safe=False,
)
