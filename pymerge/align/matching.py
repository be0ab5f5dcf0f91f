"""Finding permutations: weight matching (data-free) and activation matching (data).

Weight matching maximises  sum_t <W_A[t], pi(W_B[t])>  over the spec's
permutations by block coordinate ascent: all permutations but one fixed, the
free one solved exactly as a linear assignment problem (LAP). Attention heads
move as units: for every (A head, B head) pair the best within-head orders are
found first (small LAPs), their values form the head cost, and one LAP over
heads picks the head map. The objective never decreases.

Activation matching correlates unit activations of both models on the same
inputs (fp64 sums) and solves one LAP per site on the signed correlations.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch

from pymerge.align.apply import take
from pymerge.align.spec import HeadGroup, PermutationSpec, _split_ref

__all__ = [
    "lap",
    "weight_matching",
    "match_objective",
    "MatchResult",
    "solve_heads",
    "CorrelationStats",
    "activation_matching",
    "ActivationMatchResult",
    "collect_activations",
    "activation_sites",
]

log = logging.getLogger("pymerge.align")


def lap(cost: np.ndarray) -> np.ndarray:
    """Row i -> column assigned to it, maximising the total; -1 where rows outnumber columns."""
    cost = np.asarray(cost, dtype=np.float64)
    out = np.full(cost.shape[0], -1, dtype=np.int64)
    if cost.size == 0:
        return out
    from scipy.optimize import linear_sum_assignment  # here: scipy takes ~0.4 s to import, merges rarely need it

    rows, cols = linear_sum_assignment(cost, maximize=True)
    out[rows] = cols
    return out


def _assigned_value(cost: np.ndarray, p: np.ndarray) -> float:
    ok = p >= 0
    return float(cost[np.nonzero(ok)[0], p[ok]].sum())


def _initial_map(n: int, m: int) -> torch.Tensor:
    """Identity, truncated (m > n: the first n donor units) or padded with -1 (m < n)."""
    p = torch.full((n,), -1, dtype=torch.int64)
    k = min(n, m)
    p[:k] = torch.arange(k)
    return p


# -- tensor sources ------------------------------------------------------------------------


class _Source:
    """Tensors of one model as float tensors on the compute device, cached or streamed."""

    def __init__(self, src: Any, dtype: torch.dtype, device: torch.device | str, cache: bool | None):
        self.src = src
        self.is_reader = hasattr(src, "names") and callable(src.names)
        self.dtype = dtype
        self.device = device
        self.cache = (not self.is_reader) if cache is None else cache
        self._cache: dict[str, torch.Tensor] = {}

    def names(self) -> list[str]:
        return self.src.names() if self.is_reader else list(self.src)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.src.shape(name)) if self.is_reader else tuple(self.src[name].shape)

    def get(self, name: str) -> torch.Tensor:
        x = self._cache.get(name)
        if x is None:
            x = self.src.get(name) if self.is_reader else self.src[name]
            x = x.detach().to(device=self.device, dtype=self.dtype)
            if self.cache:
                self._cache[name] = x
        return x


def _to_np(x: torch.Tensor) -> np.ndarray:
    return x.detach().to("cpu", torch.float64).numpy()


def _front(x: torch.Tensor, axis: int) -> torch.Tensor:
    return torch.movedim(x, axis, 0).reshape(x.shape[axis], -1)


def _split_qkv(x: torch.Tensor, hg: HeadGroup) -> dict[str, torch.Tensor]:
    """Rows of a fused Q|K|V axis (moved to the front) split by role."""
    nq, nkv = hg.role_size("q"), hg.role_size("k")
    return {"q": x[:nq], "k": x[nq:nq + nkv], "v": x[nq + nkv:]}


# -- head-structured assignment ------------------------------------------------------------


def solve_heads(costs: Mapping[str, np.ndarray], dst: HeadGroup, src: HeadGroup,
                current: Mapping[str, np.ndarray] | None = None, *, max_inner: int = 20) -> tuple[dict[str, np.ndarray], float]:
    """Best head map and within-head orders of one attention block given role costs.

    costs: role ("q", "k", "v", "o") -> [dst units, src units] cost on that role's flat
    axis (missing roles count as zero). current: the components now in use (the
    search starts from them, so the value never drops below theirs).
    Returns (components, value) with components "heads", "q_in_group", "qk_within",
    "vo_within" as numpy int64 arrays (-1 in "heads" where dst has more heads).
    """
    if dst.head_dim != src.head_dim or dst.group_size != src.group_size:
        raise ValueError("head groups of different head_dim or group size cannot be matched")
    kva, kvb, g, dh = dst.n_kv_heads, src.n_kv_heads, dst.group_size, dst.head_dim
    allow_qk, allow_vo = dst.qk_within, dst.vo_within
    eye_dh = np.arange(dh)
    cur_tau = np.tile(np.arange(g), (kva, 1)) if current is None or "q_in_group" not in current else np.asarray(current["q_in_group"])
    cur_phi = np.tile(eye_dh, (kva, 1)) if current is None or "qk_within" not in current else np.asarray(current["qk_within"])
    cur_rho = np.tile(eye_dh, (kva, 1)) if current is None or "vo_within" not in current else np.asarray(current["vo_within"])

    def grouped(role):  # [a, s, i, b, t, j]
        c = costs.get(role)
        return None if c is None else np.asarray(c, dtype=np.float64).reshape(kva, g, dh, kvb, g, dh)

    def single(role):  # [a, i, b, j]
        c = costs.get(role)
        return None if c is None else np.asarray(c, dtype=np.float64).reshape(kva, dh, kvb, dh)

    q6, o6, k4, v4 = grouped("q"), grouped("o"), single("k"), single("v")
    if q6 is None and k4 is None:
        allow_qk = False  # nothing to decide Q/K orders with: keep the current ones
    if o6 is None and v4 is None:
        allow_vo = False

    value = np.zeros((kva, kvb))
    best: dict[tuple[int, int], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for a in range(kva):
        for b in range(kvb):
            qab = None if q6 is None else q6[a, :, :, b, :, :]  # [s, i, t, j]
            oab = None if o6 is None else o6[a, :, :, b, :, :]
            kab = None if k4 is None else k4[a, :, b, :]
            vab = None if v4 is None else v4[a, :, b, :]
            tau, phi, rho = cur_tau[a].copy(), cur_phi[a].copy(), cur_rho[a].copy()

            def role_matrix(base, grp, tau):
                m = np.zeros((dh, dh)) if base is None else base.copy()
                if grp is not None:
                    m += grp[np.arange(g), :, tau, :].sum(axis=0)
                return m

            best_val, best_sol, prev = -np.inf, None, -np.inf
            for it in range(max_inner):
                if g > 1:
                    t_cost = np.zeros((g, g))
                    if qab is not None:
                        t_cost += qab.transpose(1, 3, 0, 2)[eye_dh, phi].sum(axis=0)
                    if oab is not None:
                        t_cost += oab.transpose(1, 3, 0, 2)[eye_dh, rho].sum(axis=0)
                    tau = lap(t_cost)
                qk = role_matrix(kab, qab, tau)
                if allow_qk:
                    phi = lap(qk)
                vo = role_matrix(vab, oab, tau)
                if allow_vo:
                    rho = lap(vo)
                val = qk[eye_dh, phi].sum() + vo[eye_dh, rho].sum()
                if val > best_val:
                    best_val, best_sol = val, (tau.copy(), phi.copy(), rho.copy())
                # with one query head per KV head the Q/K and V/O orders are independent: one pass is exact
                if g == 1 or val <= prev + 1e-12 * abs(prev):
                    break
                prev = val
            value[a, b] = best_val
            best[a, b] = best_sol
    sigma = lap(value)
    comps = {
        "heads": sigma,
        "q_in_group": np.tile(np.arange(g), (kva, 1)),
        "qk_within": np.tile(eye_dh, (kva, 1)),
        "vo_within": np.tile(eye_dh, (kva, 1)),
    }
    for a in range(kva):
        if sigma[a] >= 0:
            comps["q_in_group"][a], comps["qk_within"][a], comps["vo_within"][a] = best[a, int(sigma[a])]
    return comps, _assigned_value(value, sigma)


# -- weight matching -----------------------------------------------------------------------


@dataclass
class MatchResult:
    perms: dict[str, torch.Tensor]
    objective_history: list[float]  # before the first sweep, then after each sweep
    sweeps: int
    converged: bool
    seconds: float = 0.0


class _WeightMatcher:
    def __init__(self, spec: PermutationSpec, a: Any, b: Any, *, dtype, device, cache, src_heads):
        self.spec = spec
        self.A = _Source(a, dtype, device, cache)
        self.B = _Source(b, dtype, device, cache)
        names_a, names_b = set(self.A.names()), set(self.B.names())
        self.tensors = [t for t in spec.axes if t in names_a and t in names_b and any(r is not None for r in spec.axes[t])]
        present = set(self.tensors)
        self.src_heads = dict(spec.heads)
        self.src_heads.update(src_heads or {})
        shapes_a = {t: self.A.shape(t) for t in self.tensors}
        shapes_b = {t: self.B.shape(t) for t in self.tensors}
        self.size_a = spec.infer_sizes(shapes_a)
        self.size_b = spec.infer_sizes(shapes_b, heads=self.src_heads)
        self.plain = [p for p in spec.perm_axes if any(t in present for t, _ in spec.perm_axes[p])]
        self.groups = [g for g in spec.heads if any(t in present for t, _, _ in spec.group_axes[g])]
        # a permutation on two axes of one tensor makes the objective quadratic in it
        self.quadratic = {p for p in self.plain
                          if any(sum(1 for r in spec.axes[t] if r == p) > 1 for t in spec.tensors_of(p) if t in present)}

    def b_mapped(self, perms, name: str, skip: int | None = None) -> torch.Tensor:
        x = self.B.get(name)
        for axis, r in enumerate(self.spec.axes[name]):
            if axis != skip and r is not None:
                x = take(x, axis, self.spec.axis_map(perms, r, src_heads=self.src_heads))
        return x

    def objective(self, perms, tensors: Iterable[str] | None = None) -> float:
        total = 0.0
        for t in (self.tensors if tensors is None else tensors):
            total += float((self.A.get(t) * self.b_mapped(perms, t)).sum(dtype=torch.float64))
        return total

    def update_plain(self, perms, p: str) -> None:
        cost = None
        for t, ax in self.spec.perm_axes[p]:
            if t not in self.tensors:
                continue
            c = _front(self.A.get(t), ax) @ _front(self.b_mapped(perms, t, skip=ax), ax).T
            cost = c if cost is None else cost + c
        if cost is None:
            return
        new = torch.from_numpy(lap(_to_np(cost)))
        if p in self.quadratic:
            touched = [t for t in self.spec.tensors_of(p) if t in self.tensors]
            before = self.objective(perms, touched)
            old = perms[p]
            perms[p] = new
            if self.objective(perms, touched) < before:
                perms[p] = old  # the linearised step overshot: keep the old one
            return
        perms[p] = new

    def update_group(self, perms, g: str) -> None:
        dst, src = self.spec.heads[g], self.src_heads[g]
        costs: dict[str, torch.Tensor] = {}
        for t, ax, role in self.spec.group_axes[g]:
            if t not in self.tensors:
                continue
            fa = _front(self.A.get(t), ax)
            fb = _front(self.b_mapped(perms, t, skip=ax), ax)
            parts = zip(_split_qkv(fa, dst).items(), _split_qkv(fb, src).values()) if role == "qkv" else [((role, fa), fb)]
            for (r, xa), xb in parts:
                c = xa @ xb.T
                costs[r] = c if r not in costs else costs[r] + c
        if not costs:
            return
        current = {k: perms[f"{g}.{k}"].numpy() for k in ("q_in_group", "qk_within", "vo_within") if f"{g}.{k}" in perms}
        comps, _ = solve_heads({r: _to_np(c) for r, c in costs.items()}, dst, src, current)
        for comp in dst.component_shapes():
            perms[f"{g}.{comp}"] = torch.from_numpy(np.ascontiguousarray(comps[comp]))

    def initial(self, init: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        perms: dict[str, torch.Tensor] = {}
        for p in self.plain:
            perms[p] = _initial_map(self.size_a[p], self.size_b[p])
        for g in self.groups:
            dst, src = self.spec.heads[g], self.src_heads[g]
            for comp, shape in dst.component_shapes().items():
                perms[f"{g}.{comp}"] = (_initial_map(dst.n_kv_heads, src.n_kv_heads) if comp == "heads"
                                        else torch.arange(shape[-1]).expand(shape).clone())
        for k, v in (init or {}).items():
            if k not in perms:
                raise ValueError(f"initial permutation {k!r} is not a variable of this matching")
            perms[k] = v.to(torch.int64).clone()
        return perms


def weight_matching(
    spec: PermutationSpec,
    a: Any,
    b: Any,
    *,
    init: Mapping[str, torch.Tensor] | None = None,
    max_sweeps: int = 100,
    tol: float = 1e-12,
    seed: int = 0,
    order: str = "random",
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
    cache: bool | None = None,
    src_heads: Mapping[str, HeadGroup] | None = None,
    callback: Callable[[int, float], None] | None = None,
) -> MatchResult:
    """Permutations putting model B in model A's coordinates (git re-basin weight matching).

    a, b: state dicts or CheckpointReaders (readers are streamed, tensor by
    tensor, unless ``cache=True``). B may be wider or narrower than A on any plain
    permutation or in KV heads (``src_heads``): its maps are then partial (-1).
    order: "random" (a seeded random order of all permutations each sweep) or
    "streaming" (layer-local permutations first, then the global ones such as
    the residual stream: two passes over the checkpoints per sweep).
    Stops when a sweep improves the objective by at most ``tol`` (relative) or
    after ``max_sweeps``. The objective history never decreases.
    init: the starting set (identity where absent). On Transformers, starting from
    ``activation_matching(...).perms`` can reach much better optima than the identity.
    """
    if order not in ("random", "streaming"):
        raise ValueError(f"order must be 'random' or 'streaming', not {order!r}")
    t0 = time.perf_counter()
    m = _WeightMatcher(spec, a, b, dtype=dtype, device=device, cache=cache, src_heads=src_heads)
    perms = m.initial(init)
    variables = [("p", p) for p in m.plain] + [("g", g) for g in m.groups]
    rng = np.random.default_rng(seed)
    history = [m.objective(perms)]
    converged = False
    sweeps = 0
    for sweep in range(max_sweeps):
        if order == "random":
            visit = [variables[i] for i in rng.permutation(len(variables))]
        else:
            local = [v for v in variables if v[1] not in spec.global_perms]
            glob = [v for v in variables if v[1] in spec.global_perms]
            visit = [local[i] for i in rng.permutation(len(local))] + [glob[i] for i in rng.permutation(len(glob))]
        before = dict(perms)
        for kind, name in visit:
            (m.update_plain if kind == "p" else m.update_group)(perms, name)
        obj = m.objective(perms)
        sweeps = sweep + 1
        prev = history[-1]
        if obj < prev:
            # only rounding can do this: keep the better set and stop
            perms = before
            converged = True
            break
        history.append(obj)
        if callback is not None:
            callback(sweeps, obj)
        log.debug("weight matching sweep %d: objective %.10g", sweeps, obj)
        if obj - prev <= tol * max(abs(prev), np.finfo(np.float64).tiny):
            converged = True
            break
    return MatchResult(perms, history, sweeps, converged, time.perf_counter() - t0)


def match_objective(spec: PermutationSpec, a: Any, b: Any, perms: Mapping[str, torch.Tensor] | None = None, *,
                    src_heads: Mapping[str, HeadGroup] | None = None) -> float:
    """sum_t <A[t], pi(B[t])> over the spec's permuted tensors (fp64)."""
    m = _WeightMatcher(spec, a, b, dtype=torch.float64, device="cpu", cache=False, src_heads=src_heads)
    return m.objective(dict(perms or {}))


# -- activation matching -------------------------------------------------------------------


class CorrelationStats:
    """fp64 running sums for the Pearson correlation between A's and B's units at one site."""

    def __init__(self):
        self.count = 0
        self.sum_a = self.sum_b = self.sq_a = self.sq_b = self.cross = None

    def update(self, xa: torch.Tensor, xb: torch.Tensor) -> None:
        xa = xa.detach().reshape(-1, xa.shape[-1]).to(torch.float64)
        xb = xb.detach().reshape(-1, xb.shape[-1]).to(torch.float64)
        if xa.shape[0] != xb.shape[0]:
            raise ValueError(f"activation counts differ: {xa.shape[0]} vs {xb.shape[0]} (same inputs needed)")
        if self.count == 0:
            self.sum_a, self.sum_b = xa.sum(0), xb.sum(0)
            self.sq_a, self.sq_b = (xa * xa).sum(0), (xb * xb).sum(0)
            self.cross = xa.T @ xb
        else:
            if xa.shape[1] != self.sum_a.shape[0] or xb.shape[1] != self.sum_b.shape[0]:
                raise ValueError("activation widths changed between batches")
            self.sum_a += xa.sum(0)
            self.sum_b += xb.sum(0)
            self.sq_a += (xa * xa).sum(0)
            self.sq_b += (xb * xb).sum(0)
            self.cross += xa.T @ xb
        self.count += xa.shape[0]

    def correlation(self) -> torch.Tensor:
        """[units of A, units of B] Pearson correlations (0 for a constant unit)."""
        if self.count == 0:
            raise ValueError("no activations collected")
        n = self.count
        ma, mb = self.sum_a / n, self.sum_b / n
        cov = self.cross / n - torch.outer(ma, mb)
        sa = (self.sq_a / n - ma * ma).clamp_min(0).sqrt()
        sb = (self.sq_b / n - mb * mb).clamp_min(0).sqrt()
        denom = torch.outer(sa, sb)
        return torch.where(denom > 0, cov / torch.where(denom > 0, denom, 1.0), 0.0)


@dataclass
class ActivationMatchResult:
    perms: dict[str, torch.Tensor]
    mean_correlation: dict[str, float] = field(default_factory=dict)  # per site, over matched units


def activation_matching(stats: Mapping[str, CorrelationStats], spec: PermutationSpec | None = None, *,
                        src_heads: Mapping[str, HeadGroup] | None = None) -> ActivationMatchResult:
    """One LAP per site on the signed correlation block.

    Keys of ``stats``: plain permutation names, or ``"group:role"`` (role q, k, v,
    o or qkv) for a head group of ``spec``; the roles of one group are combined
    into one head-structured assignment (whole heads, within-head where allowed).
    """
    perms: dict[str, torch.Tensor] = {}
    mean_corr: dict[str, float] = {}
    groups: dict[str, dict[str, torch.Tensor]] = {}
    corr_of = {}
    for site, st in stats.items():
        corr = st.correlation()
        corr_of[site] = corr
        group, role = _split_ref(site)
        if role is None:
            p = lap(corr.numpy())
            perms[site] = torch.from_numpy(p)
            ok = p >= 0
            mean_corr[site] = float(corr.numpy()[np.nonzero(ok)[0], p[ok]].mean()) if ok.any() else 0.0
        else:
            if spec is None or group not in spec.heads:
                raise ValueError(f"site {site!r} names a head group but no spec with group {group!r} was given")
            groups.setdefault(group, {})[role] = corr
    for group, roles in groups.items():
        dst = spec.heads[group]
        src = (src_heads or {}).get(group, dst)
        costs: dict[str, np.ndarray] = {}
        for role, corr in roles.items():
            c = corr.numpy()
            blocks = {role: c}
            if role == "qkv":
                nq, nkv, mq, mkv = dst.role_size("q"), dst.role_size("k"), src.role_size("q"), src.role_size("k")
                blocks = {"q": c[:nq, :mq], "k": c[nq:nq + nkv, mq:mq + mkv], "v": c[nq + nkv:, mq + mkv:]}
            for r, blk in blocks.items():
                costs[r] = blk if r not in costs else costs[r] + blk
        comps, _ = solve_heads(costs, dst, src)
        for comp in dst.component_shapes():
            perms[f"{group}.{comp}"] = torch.from_numpy(np.ascontiguousarray(comps[comp]))
        for role, corr in roles.items():
            idx = spec.axis_map(perms, f"{group}:{role}", src_heads=src_heads).numpy()
            ok = idx >= 0
            mean_corr[f"{group}:{role}"] = float(corr.numpy()[np.nonzero(ok)[0], idx[ok]].mean()) if ok.any() else 0.0
    return ActivationMatchResult(perms, mean_corr)


def _hook_points(points) -> list[tuple[str, str]]:
    if isinstance(points, (str, tuple)) and not (isinstance(points, tuple) and points and isinstance(points[0], tuple)):
        points = [points]
    out = []
    for p in points:
        if isinstance(p, str):
            out.append((p, "output"))
        else:
            module, use = p
            if use not in ("input", "output"):
                raise ValueError(f"hook point {p!r}: use must be 'input' or 'output'")
            out.append((module, use))
    return out


def _default_forward(model, batch):
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    return model(batch)


@torch.no_grad()
def collect_activations(model_a: torch.nn.Module, model_b: torch.nn.Module, batches: Iterable[Any],
                        sites: Mapping[str, Any], *, forward: Callable[[torch.nn.Module, Any], Any] | None = None,
                        max_batches: int | None = None) -> dict[str, CorrelationStats]:
    """Correlation statistics at each site from both models on the same batches.

    sites: site key (a permutation name or "group:role") -> one or several hook
    points, each a module name (its output) or (module name, "input" | "output").
    Several hook points of one site (the residual stream read at every layer)
    pool their activations. The last axis is the unit axis. The models run in
    eval mode (restored afterwards); ``forward(model, batch)`` defaults to
    ``model(**batch)`` for dicts, ``model(batch[0])`` for (x, y) pairs, else ``model(batch)``.
    """
    forward = forward or _default_forward
    points = {site: _hook_points(p) for site, p in sites.items()}
    stats = {site: CorrelationStats() for site in sites}
    captured: list[dict[tuple[str, int], torch.Tensor]] = [{}, {}]
    handles = []

    def make_hook(store, key, use):
        def grab(x):
            x = x[0] if isinstance(x, (tuple, list)) else x
            store[key] = x.detach()

        if use == "input":
            return lambda mod, args: grab(args)
        return lambda mod, args, out: grab(out)

    modes = [model_a.training, model_b.training]
    try:
        for which, model in enumerate((model_a, model_b)):
            modules = dict(model.named_modules())
            for site, pts in points.items():
                for k, (name, use) in enumerate(pts):
                    if name not in modules:
                        raise ValueError(f"site {site!r}: no module {name!r} in model {'AB'[which]}")
                    hook = make_hook(captured[which], (site, k), use)
                    handles.append(modules[name].register_forward_pre_hook(hook) if use == "input"
                                   else modules[name].register_forward_hook(hook))
        model_a.eval()
        model_b.eval()
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            forward(model_a, batch)
            forward(model_b, batch)
            for site, pts in points.items():
                for k in range(len(pts)):
                    stats[site].update(captured[0].pop((site, k)), captured[1].pop((site, k)))
    finally:
        for h in handles:
            h.remove()
        model_a.train(modes[0])
        model_b.train(modes[1])
    return stats


def activation_sites(arch: str, layers: int, *, prefix: str | None = None) -> dict[str, list[tuple[str, str]]]:
    """Hook points of the Hugging Face models whose specs are built here (site keys match them).

    arch: "llama" (prefix "model."), "gpt2" ("transformer.") or "bert" ("bert.").
    """
    arch = arch.lower()
    sites: dict[str, list[tuple[str, str]]] = {"residual": []}
    if arch in ("llama", "mistral", "qwen2"):
        pre = "model." if prefix is None else prefix
        for i in range(layers):
            p = f"{pre}layers.{i}."
            sites["residual"] += [(p + "input_layernorm", "input"), (p + "post_attention_layernorm", "input")]
            sites[f"layers.{i}.mlp"] = [(p + "mlp.down_proj", "input")]
            for role, mod in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj")):
                sites[f"layers.{i}.attn:{role}"] = [(p + f"self_attn.{mod}", "output")]
            sites[f"layers.{i}.attn:o"] = [(p + "self_attn.o_proj", "input")]
        sites["residual"].append((f"{pre}norm", "input"))
    elif arch == "gpt2":
        pre = "transformer." if prefix is None else prefix
        for i in range(layers):
            p = f"{pre}h.{i}."
            sites["residual"] += [(p + "ln_1", "input"), (p + "ln_2", "input")]
            sites[f"layers.{i}.mlp"] = [(p + "mlp.c_proj", "input")]
            sites[f"layers.{i}.attn:qkv"] = [(p + "attn.c_attn", "output")]
            sites[f"layers.{i}.attn:o"] = [(p + "attn.c_proj", "input")]
        sites["residual"].append((f"{pre}ln_f", "input"))
    elif arch == "bert":
        pre = "bert." if prefix is None else prefix
        sites["residual"].append((f"{pre}embeddings.LayerNorm", "output"))
        for i in range(layers):
            p = f"{pre}encoder.layer.{i}."
            sites["residual"] += [(p + "attention.output.LayerNorm", "output"), (p + "output.LayerNorm", "output")]
            sites[f"layers.{i}.mlp"] = [(p + "output.dense", "input")]
            for role, mod in (("q", "query"), ("k", "key"), ("v", "value")):
                sites[f"layers.{i}.attn:{role}"] = [(p + f"attention.self.{mod}", "output")]
            sites[f"layers.{i}.attn:o"] = [(p + "attention.output.dense", "input")]
    else:
        raise ValueError(f"no activation sites for architecture {arch!r} (known: llama, gpt2, bert)")
    return sites
