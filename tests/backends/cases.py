"""What the kernel tests of the cpu, triton and cuda backends share: backend handles,
input builders and case tables.

Test modules import it relatively (``from .cases import ...``). A test body that is
the same for several backends takes a `Backend` as its first parameter; `over` and
`on` build the parameter lists, each backend's cases carrying its skip marks.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

from pymerge.backends import cpu as _cpu
from pymerge.backends import cuda as _cuda
from pymerge.backends import triton as _triton
from pymerge.ops import reference
from pymerge.testing import assert_bits_equal

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# ---------------------------------------------------------------- backends


class Backend:
    """One backend under test: its module, the device its inputs live on, its skip marks."""

    def __init__(self, name: str, device: str, marks: list):
        self.name, self.device, self.marks = name, device, marks

    def __repr__(self) -> str:
        return self.name

    @property
    def mod(self):
        return {"cpu": _cpu, "triton": _triton, "cuda": _cuda}[self.name]

    def put(self, base, ts=None):
        """base (and the list ts) on this backend's device."""
        if ts is None:
            return None if base is None else base.to(self.device)
        return (None if base is None else base.to(self.device)), [t.to(self.device) for t in ts]

    def check(self, got: torch.Tensor, ref: torch.Tensor) -> None:
        """got is on this backend's device and has ref's bits."""
        assert got.device.type == torch.device(self.device).type
        assert_bits_equal(got.cpu(), ref)

    def runs(self, fn):
        """fn()'s results: under every kernel clone on the cpu backend, once elsewhere."""
        return each_isa(fn) if self.name == "cpu" else [fn()]


# CI builds the extension, so there a missing build fails instead of skipping.
NEEDS_CPU = pytest.mark.skipif(not _cpu.available() and not os.environ.get("CI"),
                               reason="pymerge._C is not built (run `pip install -e .`)")
CPU = Backend("cpu", "cpu", [NEEDS_CPU])
TRITON = Backend("triton", "cpu" if _triton.interpreted() else "cuda", [
    pytest.mark.skipif(not _triton.available(), reason="needs triton, and a GPU or TRITON_INTERPRET=1"),
    # the interpreter evaluates IEEE arithmetic with numpy, which warns on inf / NaN results
    pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning"),
])
CUDA = Backend("cuda", "cuda", [
    pytest.mark.gpu,
    pytest.mark.skipif(not _cuda.available(), reason="needs pymerge._C_cuda and a GPU"),
])
BACKENDS = {"cpu": CPU, "triton": TRITON, "cuda": CUDA}


def over(**tables):
    """Parameters (backend, *case) for every case of every backend named: over(cpu=[...], cuda=[...]).
    A case that is not a tuple is one value."""
    params = []
    for name, cases in tables.items():
        bk = BACKENDS[name]
        for case in cases:
            case = case if isinstance(case, tuple) else (case,)
            label = "-".join([name] + [str(v).replace("torch.", "").replace(" ", "") for v in case])
            params.append(pytest.param(bk, *case, marks=bk.marks, id=label))
    return params


def on(*names):
    """Parameters for a test without cases of its own, once per backend named."""
    return [pytest.param(BACKENDS[n], marks=BACKENDS[n].marks, id=n) for n in names]


ISAS = ("generic", "avx2", "avx512")  # the cpu kernel clone levels (csrc/cpu/isa.h)


def isas():
    """The cpu kernel clone levels this machine runs: the baseline one always, then AVX2 and
    AVX-512 where present."""
    from pymerge import _C

    _C._set_max_isa(ISAS[-1])
    return list(ISAS[: ISAS.index(_C._kernel_isa()) + 1])


@contextlib.contextmanager
def kernel_isa(name):
    """The cpu kernels run no clone above this level inside the block."""
    from pymerge import _C

    before = _C._set_max_isa(name)
    try:
        assert _C._kernel_isa() == name
        yield
    finally:
        _C._set_max_isa(before)


def each_isa(fn):
    """fn() under every kernel clone level this machine runs."""
    out = []
    for isa in isas():
        with kernel_isa(isa):
            out.append(fn())
    return out


@contextlib.contextmanager
def torch_on_one_thread():
    """The torch reference on one thread: its OpenMP workers spin-wait and crawl on a busy
    2-core machine. The comparisons hold for any count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------- inputs


def models(size, dtypes, gen, *, base_dtype=None, tiny=False, scale=0.01, steps=2):
    """(base, tensors) on the CPU: fine-tunes near a base. tiny: every value from a small exact set
    (tau in quarters, within +-steps of them), so |tau| takes a handful of values and the index
    tie-break decides most of a trim."""
    base_dtype = base_dtype or dtypes[0]
    if tiny:
        base = torch.randint(-8, 9, (size,), generator=gen).float() / 4
        ts = [base + torch.randint(-steps, steps + 1, (size,), generator=gen).float() / 4 for _ in dtypes]
    else:
        base = torch.randn(size, generator=gen)
        ts = [base + scale * torch.randn(size, generator=gen) for _ in dtypes]
    return base.to(base_dtype), [t.to(dt) for t, dt in zip(ts, dtypes)]


def shaped_models(shape, in_dtypes, base_dtype, tiny, seed, steps=2):
    """models() of the given shape, far from the base (scale 0.3): for the property tests."""
    gen = torch.Generator().manual_seed(seed)
    size = 1
    for d in shape:
        size *= d
    base, ts = models(size, in_dtypes, gen, base_dtype=base_dtype, tiny=tiny, scale=0.3, steps=steps)
    return base.reshape(shape), [t.reshape(shape) for t in ts]


def thresholds_for(base, ts, quantile):
    """Per-model thresholds near the given quantile of |tau| (from a sample: any value will do;
    below 4000 elements every element)."""
    tau = [(t.float() - base.float()).abs().reshape(-1) for t in ts]
    return [float(x[:: max(1, x.numel() // 2000)].quantile(quantile)) if x.numel() else 0.0 for x in tau]


def special_pairs():
    """(base, a, b): every pair of special values (signed zeros, infinities, NaN, subnormals, huge)."""
    specials = [0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-45, -1e-40, 3e38, -3e38, 1.0]
    vals = torch.tensor(specials, dtype=torch.float32)
    base = vals.repeat(len(specials) * 2)
    a = vals.repeat_interleave(len(specials)).repeat(2)
    b = torch.cat([vals.flip(0).repeat(len(specials)), vals.repeat(len(specials))])
    return base, a, b


def special_grid():
    """(base, a, b), 100 elements: each of ten special values against each other."""
    specials = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-45, 3e38, -1.0, 0.5, 2.0])
    return specials.repeat(10), specials.repeat_interleave(10), specials.flip(0).repeat(10)


# specs/methods.md worked example for the whole-model TIES: three task vectors, the
# thresholds of density 0.4 and the merged result.
WORKED_TAU = [
    [0.30, -0.10, 0.05, 0, -0.40, 0.20, 0.01, -0.02, 0.50, -0.30],
    [-0.20, -0.30, 0.10, 0, 0.40, -0.10, 0.02, 0.03, 0.10, 0.20],
    [0.10, 0.20, -0.60, 0, -0.10, 0.30, 0, -0.05, 0.20, -0.10],
]
WORKED_MERGED = [0.2, -0.3, -0.6, 0, -0.25, 0.25, 0, 0, 0.8 / 3, -0.2]


def worked_example():
    """(zero base, task vectors, thresholds) of the worked example, on the CPU."""
    tau = torch.tensor(WORKED_TAU)
    return torch.zeros(10), list(tau), [reference.ties.ties_model_threshold(t.abs(), 0.4) for t in tau]


# ---------------------------------------------------------------- argument errors


def ties_error_cases(x, other):
    """ties_merge arguments the reference and every backend reject: x four elements, other five."""
    return [
        dict(base=None, tensors=[x]),
        dict(base=x, tensors=[]),
        dict(base=x, tensors=[other]),
        dict(base=x, tensors=[x], consensus="median"),
        dict(base=x, tensors=[x], trim_ties="loose"),
        dict(base=x, tensors=[x, x], weights=[1.0]),
        dict(base=x, tensors=[x], densities=float("nan")),
        dict(base=x, tensors=[x], weights=[float("inf")]),
        dict(base=x, tensors=[x], lam=float("nan")),
        dict(base=x, tensors=[x], out_dtype=torch.int32),
        dict(base=x, tensors=[x.double()]),
    ]


# ties_sign_sum / ties_merge_model calls (module, x) the reference and every backend reject
TIES_MODEL_SCOPE_ERRORS = [
    lambda m, x: m.ties_sign_sum(None, [x], [0.0]),
    lambda m, x: m.ties_sign_sum(x, [x], [-1.0]),
    lambda m, x: m.ties_sign_sum(x, [x, x], [0.0]),
    lambda m, x: m.ties_merge_model(x, [x], [0.0], 1, merge="mean"),
    lambda m, x: m.ties_merge_model(x, [x], [0.0], True),
    lambda m, x: m.ties_merge_model(x, [x], [float("nan")], 1),
    lambda m, x: m.ties_merge_model(x, [x], [0.0], 1, lam=float("inf")),
]


def breadcrumbs_error_cases(x):
    """breadcrumbs_merge arguments the reference and every backend reject."""
    return [
        dict(base=None, tensors=[x]),
        dict(base=x, tensors=[x], combine="x"),
        dict(base=x, tensors=[x], consensus="x"),
        dict(base=x, tensors=[x], densities=float("nan")),
        dict(base=x, tensors=[x], gammas=float("nan")),
        dict(base=x, tensors=[x, x], gammas=[0.1]),
        dict(base=x, tensors=[x, x], weights=[1.0, -1.0], normalize=True),
        dict(base=x, tensors=[x], lam=float("nan"), combine="ties"),
        dict(base=x, tensors=[x], out_dtype=torch.float64),
    ]


def pcb_error_cases(x, other):
    """(call(pcb_merge), message) pairs every implementation rejects with a ValueError."""
    return [
        (lambda f: f(x, [x], density=1.5), "density"),
        (lambda f: f(x, [x], clip_ratio=-0.1), "clip_ratio"),
        (lambda f: f(x, [x], lam=2.0, lambdas=[1.0]), "either lam or lambdas"),
        (lambda f: f(x, [x, x], lambdas=[1.0]), "lambdas"),
        (lambda f: f(x, [other]), "shape"),
        (lambda f: f(x, [x.double()]), "dtype"),
        (lambda f: f(x, []), "at least one"),
    ]


def pcb_stats_length_errors(mod, x):
    """pcb_scores / pcb_merge_with_stats with statistics of the wrong length, and no base."""
    with pytest.raises(ValueError, match="lo: 1 values for 2"):
        mod.pcb_scores(x, [x, x], [0.0], [1.0, 1.0])
    with pytest.raises(ValueError, match="M: 3 values for 2"):
        mod.pcb_merge_with_stats(x, [x, x], [0.0] * 2, [1.0] * 2, [0.0] * 2, [1.0] * 3)
    with pytest.raises(TypeError, match="base"):
        mod.pcb_merge(None, [x])


# ---------------------------------------------------------------- PCB


_torch_exp, _torch_tanh = torch.exp, torch.tanh


@contextlib.contextmanager
def exact_math():
    """The reference with correctly rounded fp32 exp/tanh (double, rounded once)."""
    torch.exp = lambda x: _torch_exp(x.double()).float()
    torch.tanh = lambda x: _torch_tanh(x.double()).float()
    try:
        yield
    finally:
        torch.exp, torch.tanh = _torch_exp, _torch_tanh


def assert_same_bits(actual: torch.Tensor, ref: torch.Tensor) -> None:
    """Same dtype, shape and bits, NaN payloads and signs included (stricter than assert_bits_equal)."""
    assert actual.dtype == ref.dtype and actual.shape == ref.shape
    bits = {torch.float64: torch.int64, torch.float32: torch.int32, torch.int32: torch.int32}.get(ref.dtype, torch.int16)
    assert torch.equal(actual.view(bits), ref.view(bits)), f"{int((actual.view(bits) != ref.view(bits)).sum())} differ"


def assert_bits_equal_on_cpu(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """assert_bits_equal of the two tensors' CPU copies."""
    assert_bits_equal(actual.cpu(), expected.cpu())


def exact_exp(x):
    return _torch_exp(x.double()).float()


def exact_tanh(x):
    return _torch_tanh(x.double()).float()


def exp_tanh_inputs(n):
    """2n + 18 fp32 values for exp / tanh: intra's exponent range (N <= 8), wide heavy-tailed
    values, and the edges of both functions (NaN last)."""
    gen = torch.Generator().manual_seed(0)
    return torch.cat([
        -8 * torch.rand(n, generator=gen),
        torch.randn(n, generator=gen) * torch.exp(4 * torch.randn(n, generator=gen)),
        torch.tensor([0.0, -0.0, 1e-45, -1e-45, 1e-38, 88.72, 88.73, -103.9, -104.0, -150.0, 9.0, 9.1, -9.1,
                      float("inf"), float("-inf"), 3e38, -3e38, float("nan")]),
    ])


def bits(t: torch.Tensor) -> torch.Tensor:
    t = t.cpu()
    return t.view({torch.float32: torch.int32, torch.float64: torch.int64}.get(t.dtype, torch.int16))


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in ulps of their dtype (distance of the ordered bit patterns; +0 == -0)."""
    ia, ib = bits(a).long(), bits(b).long()
    top = 1 << (8 * a.element_size() - 1)
    ka = torch.where(ia < 0, -(ia + top), ia)
    kb = torch.where(ib < 0, -(ib + top), ib)
    return (ka - kb).abs()


def pcb_models(size, n, dtypes, gen, base_dtype=None, spread=0.01):
    """A base and n fine-tunes close to it (CPU tensors), with heavy-tailed task vectors."""
    base = torch.randn(size, generator=gen)
    ts = []
    for i in range(n):
        tau = spread * torch.randn(size, generator=gen) * torch.exp(torch.randn(size, generator=gen))
        ts.append((base + tau).to(dtypes[i % len(dtypes)]))
    return base.to(base_dtype or dtypes[0]), ts


def pcb_ref_stats(base, ts, density, clip_ratio):
    """The reference's (lo, hi, q, M) for the given density and clip ratio."""
    ref = reference.pcb
    tau = torch.stack([t.float().reshape(-1) - base.float().reshape(-1) for t in ts])
    lo, hi = ref.pcb_clip_bounds(tau.abs(), clip_ratio)
    beta = ref.pcb_scores(base, ts, lo, hi)
    q, m = ref.pcb_score_stats(beta, density)
    return lo, hi, q, m


def pcb_property_inputs(shape, in_dtypes, base_dtype, quantized, seed):
    """(base, tensors) for the PCB property tests; quantized: many equal magnitudes and scores,
    ties at every quantile."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen)
    ts = []
    for dt in in_dtypes:
        tau = 0.1 * torch.randn(shape, generator=gen)
        if quantized:
            tau = torch.round(tau * 20) / 20
        ts.append((base + tau).to(dt))
    return base.to(base_dtype), ts


# ---------------------------------------------------------------- histograms


def hist_tensors(size, base_dtype, dtype, gen, specials=True):
    """A base and one fine-tune with heavy-tailed |tau|; specials: infinities, signed zeros,
    subnormals, tau == 0 exactly in the first eight elements."""
    base = torch.randn(size, generator=gen)
    t = base + 0.01 * torch.randn(size, generator=gen) * torch.exp(torch.randn(size, generator=gen))
    if specials and size >= 8:
        t[:8] = torch.tensor([float("inf"), float("-inf"), 0.0, -0.0, 1e-40, -1e-40, 65504.0, -3e38])
        t[2], t[3] = base[2], base[3]  # tau == 0 exactly
    return base.to(base_dtype), t.to(dtype)


def prefixes(high: torch.Tensor) -> list[int]:
    """The fullest bin, the first and last nonempty ones, and an empty one."""
    nz = high.nonzero().reshape(-1).tolist()
    out = [0x1234]
    if nz:
        out += [int(high.argmax()), nz[0], nz[-1]]
    return out
