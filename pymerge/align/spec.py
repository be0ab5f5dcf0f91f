"""Permutation specs: which hidden space each axis of each tensor lives in.

A spec maps every tensor name to one entry per axis: None (the axis is not
permuted), a plain permutation name, or ``"<group>:<role>"`` for an attention
block whose heads move as units (role q, k, v, o or qkv for a fused Q|K|V
axis). Axes carrying the same hidden space carry the same name; the inverse
(name -> list of (tensor, axis)) is derived here, never written by hand.

A permutation *set* is a dict of int64 tensors keyed by the spec's variables:
each plain permutation name, and for every head group ``G`` the components

    G.heads        [KV]      KV-head map sigma (whole heads move)
    G.q_in_group   [KV, g]   query heads inside their KV group (GQA, g = H/KV > 1)
    G.qk_within    [KV, dh]  within-head order of Q and K (absent under RoPE)
    G.vo_within    [KV, dh]  within-head order of V, reused by the O columns

indexed by the *new* position (the reference model's unit). An index array
``p`` means "new index i takes old index p[i]"; -1 (partial maps only) means
"no unit here", read as zero.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping, Sequence

import torch

__all__ = [
    "HeadGroup",
    "PermutationSpec",
    "SpecBuilder",
    "RopeWithinHeadError",
    "mlp_spec",
    "llama_spec",
    "gpt2_spec",
    "bert_spec",
    "spec_from_config",
]

ROLES = ("q", "k", "v", "o", "qkv")
COMPONENTS = ("heads", "q_in_group", "qk_within", "vo_within")
ROLE_SEP = ":"


class RopeWithinHeadError(ValueError):
    """A within-head Q/K permutation was given for a rotary (RoPE) attention block."""


@dataclass(frozen=True)
class HeadGroup:
    """Shape of one attention block whose heads move as units."""

    n_heads: int
    n_kv_heads: int
    head_dim: int
    qk_within: bool = True  # False under RoPE: rotary pairs fix the order inside a Q/K head
    vo_within: bool = True

    def __post_init__(self):
        if min(self.n_heads, self.n_kv_heads, self.head_dim) <= 0:
            raise ValueError(f"HeadGroup sizes must be positive, got {self}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")

    @property
    def group_size(self) -> int:
        return self.n_heads // self.n_kv_heads

    def role_size(self, role: str) -> int:
        q, kv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        return {"q": q, "o": q, "k": kv, "v": kv, "qkv": q + 2 * kv}[role]

    def component_shapes(self) -> dict[str, tuple[int, ...]]:
        kv, g, dh = self.n_kv_heads, self.group_size, self.head_dim
        shapes: dict[str, tuple[int, ...]] = {"heads": (kv,)}
        if g > 1:
            shapes["q_in_group"] = (kv, g)
        if self.qk_within:
            shapes["qk_within"] = (kv, dh)
        if self.vo_within:
            shapes["vo_within"] = (kv, dh)
        return shapes

    def resized(self, n_kv_heads: int) -> "HeadGroup":
        """The same block with another number of KV heads (and query heads, same group size)."""
        return HeadGroup(n_kv_heads * self.group_size, n_kv_heads, self.head_dim, self.qk_within, self.vo_within)


def _split_ref(ref: str) -> tuple[str, str | None]:
    if ROLE_SEP in ref:
        group, role = ref.rsplit(ROLE_SEP, 1)
        return group, role
    return ref, None


def _is_identity(x: torch.Tensor) -> bool:
    n = x.shape[-1]
    return bool(torch.equal(x, torch.arange(n, dtype=x.dtype).expand_as(x)))


def _check_perm_rows(name: str, x: torch.Tensor, n: int, partial: bool) -> None:
    """Each row of x is a permutation of range(n) (partial: distinct entries, or -1)."""
    rows = x.reshape(-1, x.shape[-1])
    for r, row in enumerate(rows):
        where = f"{name}" + (f" row {r}" if x.dim() > 1 else "")
        if partial:
            if row.numel() and int(row.min()) < -1:
                raise ValueError(f"permutation {where}: entries below -1")
            valid = row[row >= 0]
            if valid.unique().numel() != valid.numel():
                raise ValueError(f"permutation {where}: a source unit is used twice")
        else:
            if not torch.equal(torch.sort(row).values, torch.arange(n, dtype=row.dtype)):
                raise ValueError(f"permutation {where}: not a permutation of range({n})")


class PermutationSpec:
    """Tensor name -> per-axis permutation reference, plus the head groups.

    axes: {tensor: (ref or None, ...)} with one entry per tensor axis.
    heads: {group name: HeadGroup} for the ``"group:role"`` references.
    sizes: optional {plain permutation: size} (checked against shapes).
    global_perms: permutations that touch the whole model (the residual
    stream); the streaming schedule updates them after the layer-local ones.
    """

    def __init__(
        self,
        axes: Mapping[str, Sequence[str | None]],
        heads: Mapping[str, HeadGroup] | None = None,
        *,
        sizes: Mapping[str, int] | None = None,
        global_perms: Iterable[str] = (),
    ):
        self.axes: dict[str, tuple[str | None, ...]] = {t: tuple(a) for t, a in axes.items()}
        self.heads: dict[str, HeadGroup] = dict(heads or {})
        self.sizes: dict[str, int] = dict(sizes or {})
        self.global_perms: tuple[str, ...] = tuple(global_perms)
        self.perm_axes: dict[str, list[tuple[str, int]]] = {}
        self.group_axes: dict[str, list[tuple[str, int, str]]] = {g: [] for g in self.heads}
        for tensor, refs in self.axes.items():
            for axis, ref in enumerate(refs):
                if ref is None:
                    continue
                group, role = _split_ref(ref)
                if role is None:
                    if group in self.heads:
                        raise ValueError(f"{tensor} axis {axis}: {ref!r} is a head group; name a role ({', '.join(ROLES)})")
                    self.perm_axes.setdefault(group, []).append((tensor, axis))
                else:
                    if group not in self.heads:
                        raise ValueError(f"{tensor} axis {axis}: unknown head group {group!r}")
                    if role not in ROLES:
                        raise ValueError(f"{tensor} axis {axis}: unknown role {role!r} (one of {', '.join(ROLES)})")
                    self.group_axes[group].append((tensor, axis, role))
        clash = set(self.perm_axes) & {f"{g}.{c}" for g in self.heads for c in COMPONENTS}
        if clash:
            raise ValueError(f"permutation names clash with head-group components: {sorted(clash)}")
        unknown = set(self.sizes) - set(self.perm_axes)
        if unknown:
            raise ValueError(f"sizes given for permutations no tensor uses: {sorted(unknown)}")
        unknown = set(self.global_perms) - set(self.perm_axes)
        if unknown:
            raise ValueError(f"global permutations no tensor uses: {sorted(unknown)}")

    # -- names -----------------------------------------------------------------------------

    @property
    def perm_names(self) -> list[str]:
        """Plain permutation names, in first-use order."""
        return list(self.perm_axes)

    def variables(self) -> dict[str, tuple[int, ...] | None]:
        """Every key a permutation set may hold -> its shape (None: plain, size from the tensors)."""
        out: dict[str, tuple[int, ...] | None] = {p: ((self.sizes[p],) if p in self.sizes else None) for p in self.perm_axes}
        for g, hg in self.heads.items():
            for comp, shape in hg.component_shapes().items():
                out[f"{g}.{comp}"] = shape
        return out

    def tensors_of(self, var: str) -> list[str]:
        """Tensors touched by a plain permutation or a head group."""
        if var in self.perm_axes:
            return list(dict.fromkeys(t for t, _ in self.perm_axes[var]))
        if var in self.group_axes:
            return list(dict.fromkeys(t for t, _, _ in self.group_axes[var]))
        raise KeyError(f"{var!r} is neither a permutation nor a head group of this spec")

    # -- shapes ----------------------------------------------------------------------------

    def axis_size(self, ref: str, heads: Mapping[str, HeadGroup] | None = None) -> int | None:
        group, role = _split_ref(ref)
        if role is None:
            return self.sizes.get(group)
        return (heads or self.heads).get(group, self.heads[group]).role_size(role)

    def infer_sizes(self, shapes: Mapping[str, Sequence[int]], heads: Mapping[str, HeadGroup] | None = None) -> dict[str, int]:
        """Plain permutation sizes read from tensor shapes; raises on any inconsistency.

        Tensors of the spec absent from ``shapes`` are skipped (a spec may name
        optional tensors, e.g. a tied head).
        """
        found: dict[str, tuple[int, str]] = {}
        for tensor, refs in self.axes.items():
            if tensor not in shapes:
                continue
            shape = tuple(shapes[tensor])
            if len(shape) != len(refs):
                raise ValueError(f"spec gives {len(refs)} axes for {tensor} but it has shape {shape}")
            for axis, ref in enumerate(refs):
                if ref is None:
                    continue
                group, role = _split_ref(ref)
                if role is not None:
                    want = (heads or {}).get(group, self.heads[group]).role_size(role)
                    if shape[axis] != want:
                        raise ValueError(f"{tensor} axis {axis} ({ref}) has size {shape[axis]}, head group needs {want}")
                    continue
                if group in found and found[group][0] != shape[axis]:
                    raise ValueError(
                        f"permutation {group!r}: {tensor} axis {axis} has size {shape[axis]} but "
                        f"{found[group][1]} has {found[group][0]}"
                    )
                found.setdefault(group, (shape[axis], f"{tensor} axis {axis}"))
        sizes = {p: n for p, (n, _) in found.items()}
        for p, n in self.sizes.items():
            if p in sizes and sizes[p] != n and heads is None:
                raise ValueError(f"permutation {p!r}: the tensors have size {sizes[p]}, the spec says {n}")
        return sizes

    def missing(self, names: Iterable[str]) -> list[str]:
        """Spec tensors not among ``names``."""
        names = set(names)
        return [t for t in self.axes if t not in names]

    def unknown(self, names: Iterable[str]) -> list[str]:
        """``names`` the spec does not describe (left unpermuted by every function here)."""
        return [n for n in names if n not in self.axes]

    # -- permutation sets ------------------------------------------------------------------

    def identity(self, sizes: Mapping[str, int] | None = None) -> dict[str, torch.Tensor]:
        sizes = {**self.sizes, **(sizes or {})}
        out = {}
        for p in self.perm_axes:
            if p not in sizes:
                raise ValueError(f"size of permutation {p!r} unknown: pass sizes (see infer_sizes)")
            out[p] = torch.arange(sizes[p])
        for g, hg in self.heads.items():
            for comp, shape in hg.component_shapes().items():
                out[f"{g}.{comp}"] = torch.arange(shape[-1]).expand(shape).clone()
        return out

    def random(self, sizes: Mapping[str, int] | None = None, *, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """A random valid (function-preserving) permutation set."""
        out = self.identity(sizes)
        for k, v in out.items():
            rows = v.reshape(-1, v.shape[-1])
            out[k] = torch.stack([torch.randperm(v.shape[-1], generator=generator) for _ in rows]).reshape(v.shape)
        return out

    def validate(self, perms: Mapping[str, torch.Tensor], *, sizes: Mapping[str, int] | None = None,
                 partial: bool = False, complete: bool = False) -> None:
        """Raise ValueError unless ``perms`` is a valid set for this spec.

        Every key must be a variable of the spec; each array must be a permutation
        (``partial``: distinct entries or -1, a map of a possibly narrower donor).
        A non-identity within-head Q/K permutation of a RoPE block raises
        RopeWithinHeadError. ``complete`` also requires every variable present.
        """
        variables = self.variables()
        sizes = {**self.sizes, **(sizes or {})}
        for key, x in perms.items():
            if key not in variables:
                group, comp = key.rsplit(".", 1) if "." in key else (key, "")
                if comp == "qk_within" and group in self.heads and not self.heads[group].qk_within:
                    if isinstance(x, torch.Tensor) and _is_identity(x):
                        continue
                    raise RopeWithinHeadError(
                        f"{key}: a within-head Q/K permutation is not function-preserving in {group!r} "
                        "(rotary position embedding pairs fixed dimensions of each Q/K head); only whole "
                        "heads may move there (V/O within-head permutations remain valid)"
                    )
                raise ValueError(f"{key!r} is not a permutation of this spec (known: {', '.join(sorted(variables))})")
            if not isinstance(x, torch.Tensor) or x.dtype not in (torch.int32, torch.int64):
                raise ValueError(f"permutation {key}: expected an int32/int64 tensor, got {type(x).__name__}")
            shape = variables[key]
            if shape is None:
                if x.dim() != 1:
                    raise ValueError(f"permutation {key}: expected 1-D, got shape {tuple(x.shape)}")
                n = sizes.get(key, x.shape[0])
                if x.shape[0] != n:
                    raise ValueError(f"permutation {key}: length {x.shape[0]}, expected {n}")
                _check_perm_rows(key, x, n, partial)
            else:
                if tuple(x.shape) != shape:
                    raise ValueError(f"permutation {key}: shape {tuple(x.shape)}, expected {shape}")
                # partial maps: plain permutations and whole heads; within-head parts stay permutations
                whole_units = key.endswith(".heads") or key in self.perm_axes
                _check_perm_rows(key, x, shape[-1], partial and whole_units)
        if complete:
            absent = [k for k in variables if k not in perms]
            if absent:
                raise ValueError(f"permutation set lacks {', '.join(absent)}")

    def invert(self, perms: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The inverse set: applying it after ``perms`` restores the original order (full permutations only)."""
        partial = [k for k, v in perms.items() if v.numel() and int(v.min()) < 0]
        if partial:
            raise ValueError(f"partial maps have no inverse: {', '.join(partial)}")
        out = {p: torch.argsort(perms[p]) for p in self.perm_axes if p in perms}
        for g, hg in self.heads.items():
            comps = self.components(perms, g)
            sigma_inv = torch.argsort(comps["heads"])
            for comp in hg.component_shapes():
                x = comps[comp]
                out[f"{g}.{comp}"] = sigma_inv.clone() if comp == "heads" else torch.argsort(x[sigma_inv], dim=1)
        return out

    # -- index maps ------------------------------------------------------------------------

    def components(self, perms: Mapping[str, torch.Tensor], group: str,
                   heads: Mapping[str, HeadGroup] | None = None) -> dict[str, torch.Tensor]:
        """A head group's components, identity where absent."""
        hg = (heads or {}).get(group, self.heads[group])
        out = {}
        for comp, shape in hg.component_shapes().items():
            x = perms.get(f"{group}.{comp}")
            out[comp] = torch.arange(shape[-1]).expand(shape).clone() if x is None else x.to(torch.int64)
        kv, g, dh = hg.n_kv_heads, hg.group_size, hg.head_dim
        out.setdefault("q_in_group", torch.arange(g).expand(kv, g).clone())
        out.setdefault("qk_within", torch.arange(dh).expand(kv, dh).clone())
        out.setdefault("vo_within", torch.arange(dh).expand(kv, dh).clone())
        return out

    def axis_map(self, perms: Mapping[str, torch.Tensor], ref: str | None, *,
                 src_heads: Mapping[str, HeadGroup] | None = None) -> torch.Tensor | None:
        """The flat int64 index array of one axis reference (None: identity).

        ``src_heads`` gives the head groups of the model the map reads from when
        they differ from the spec's (heterogeneous widths: other KV head counts).
        """
        if ref is None:
            return None
        group, role = _split_ref(ref)
        if role is None:
            p = perms.get(group)
            return None if p is None else p.to(torch.int64)
        if not any(f"{group}.{c}" in perms for c in COMPONENTS):
            return None
        dst = self.heads[group]
        src = (src_heads or {}).get(group, dst)
        return head_map(self.components(perms, group), dst, src, role)


def head_map(comps: Mapping[str, torch.Tensor], dst: HeadGroup, src: HeadGroup, role: str) -> torch.Tensor:
    """Flat index array of one role of a head group (-1 for heads with no partner).

    New query head (a*g + s) takes old head sigma[a]*g + tau[a, s]; element j of
    new KV head a takes element phi[a, j] (Q/K) or rho[a, j] (V/O) of its source.
    """
    if dst.head_dim != src.head_dim or dst.group_size != src.group_size:
        raise ValueError("head groups of different head_dim or group size cannot be mapped onto each other")
    g, dh = dst.group_size, dst.head_dim
    sigma = comps["heads"].to(torch.int64)
    tau, phi, rho = comps["q_in_group"], comps["qk_within"], comps["vo_within"]
    missing = (sigma < 0)
    s = sigma.clamp_min(0)
    if role == "qkv":
        q = head_map(comps, dst, src, "q")
        k = head_map(comps, dst, src, "k")
        v = head_map(comps, dst, src, "v")
        nq, nkv = src.role_size("q"), src.role_size("k")
        return torch.cat([q, torch.where(k < 0, k, k + nq), torch.where(v < 0, v, v + nq + nkv)])
    if role in ("q", "o"):
        within = phi if role == "q" else rho
        heads = s[:, None] * g + tau  # [KV, g]
        idx = heads[:, :, None] * dh + within[:, None, :]  # [KV, g, dh]
        idx = torch.where(missing[:, None, None], -1, idx)
    elif role in ("k", "v"):
        within = phi if role == "k" else rho
        idx = s[:, None] * dh + within
        idx = torch.where(missing[:, None], -1, idx)
    else:
        raise ValueError(f"unknown role {role!r}")
    return idx.reshape(-1)


# -- building specs ------------------------------------------------------------------------


class SpecBuilder:
    """A few lines per architecture: linear layers, norms, embeddings and attention blocks.

    Linear weights are given in torch [out, in] layout; ``conv1d=True`` marks
    GPT-2-style [in, out] weights.
    """

    def __init__(self):
        self.axes: dict[str, tuple[str | None, ...]] = {}
        self.heads: dict[str, HeadGroup] = {}
        self.sizes: dict[str, int] = {}
        self.global_perms: list[str] = []

    def tensor(self, name: str, *refs: str | None) -> "SpecBuilder":
        if name in self.axes:
            raise ValueError(f"tensor {name!r} given twice")
        self.axes[name] = tuple(refs)
        return self

    def linear(self, name: str, out: str | None, inp: str | None, *, bias: bool = False,
               conv1d: bool = False) -> "SpecBuilder":
        self.tensor(f"{name}.weight", *((inp, out) if conv1d else (out, inp)))
        if bias:
            self.tensor(f"{name}.bias", out)
        return self

    def norm(self, name: str, space: str | None, *, bias: bool = False) -> "SpecBuilder":
        self.tensor(f"{name}.weight", space)
        if bias:
            self.tensor(f"{name}.bias", space)
        return self

    def embedding(self, name: str, space: str | None) -> "SpecBuilder":
        return self.tensor(f"{name}.weight", None, space)

    def head_group(self, name: str, group: HeadGroup) -> str:
        if name in self.heads:
            raise ValueError(f"head group {name!r} given twice")
        self.heads[name] = group
        return name

    def size(self, perm: str, n: int) -> "SpecBuilder":
        self.sizes[perm] = n
        return self

    def mark_global(self, perm: str) -> "SpecBuilder":
        self.global_perms.append(perm)
        return self

    def build(self) -> PermutationSpec:
        return PermutationSpec(self.axes, self.heads, sizes=self.sizes, global_perms=self.global_perms)


def ref(group: str, role: str) -> str:
    return f"{group}{ROLE_SEP}{role}"


def mlp_spec(n_layers: int, *, prefix: str = "layers.", bias: bool = True) -> PermutationSpec:
    """A plain MLP of ``n_layers`` linear layers named ``{prefix}{i}.weight`` / ``.bias``.

    Layer i maps hidden space ``h{i-1}`` to ``h{i}``; the input and output are not
    permuted. A module holding ``self.layers = nn.ModuleList([nn.Linear, ...])``
    (activations elsewhere) has exactly these names.
    """
    if n_layers < 1:
        raise ValueError("an MLP needs at least one layer")
    b = SpecBuilder()
    for i in range(n_layers):
        out = f"h{i}" if i < n_layers - 1 else None
        inp = f"h{i - 1}" if i > 0 else None
        b.linear(f"{prefix}{i}", out, inp, bias=bias)
    return b.build()


def llama_spec(layers: int, hidden: int, heads: int, kv_heads: int | None = None, intermediate: int | None = None, *,
               head_dim: int | None = None, prefix: str = "model.", lm_head: bool = True, attention_bias: bool = False,
               mlp_bias: bool = False, rope: bool = True) -> PermutationSpec:
    """Llama / Mistral / Qwen2-style decoder in Hugging Face names (``LlamaForCausalLM``).

    One residual permutation ``residual``; ``layers.{l}.mlp`` on each intermediate
    axis (gate and up rows, down columns); head group ``layers.{l}.attn`` (GQA:
    KV heads move as units, query heads within their group). Under RoPE no
    within-head Q/K permutation exists. ``prefix=""`` for a bare ``LlamaModel``;
    ``attention_bias=True`` for Qwen2-style q/k/v biases.
    """
    kv_heads = heads if kv_heads is None else kv_heads
    head_dim = hidden // heads if head_dim is None else head_dim
    b = SpecBuilder()
    res = "residual"
    b.size(res, hidden).mark_global(res)
    b.embedding(f"{prefix}embed_tokens", res)
    for layer in range(layers):
        p = f"{prefix}layers.{layer}."
        g = b.head_group(f"layers.{layer}.attn", HeadGroup(heads, kv_heads, head_dim, qk_within=not rope))
        ffn = f"layers.{layer}.mlp"
        if intermediate is not None:
            b.size(ffn, intermediate)
        b.norm(p + "input_layernorm", res)
        b.linear(p + "self_attn.q_proj", ref(g, "q"), res, bias=attention_bias)
        b.linear(p + "self_attn.k_proj", ref(g, "k"), res, bias=attention_bias)
        b.linear(p + "self_attn.v_proj", ref(g, "v"), res, bias=attention_bias)
        b.linear(p + "self_attn.o_proj", res, ref(g, "o"), bias=attention_bias)
        b.norm(p + "post_attention_layernorm", res)
        b.linear(p + "mlp.gate_proj", ffn, res, bias=mlp_bias)
        b.linear(p + "mlp.up_proj", ffn, res, bias=mlp_bias)
        b.linear(p + "mlp.down_proj", res, ffn, bias=mlp_bias)
    b.norm(f"{prefix}norm", res)
    if lm_head:
        b.linear("lm_head", None, res)
    return b.build()


def gpt2_spec(layers: int, hidden: int, heads: int, intermediate: int | None = None, *, prefix: str = "transformer.",
              lm_head: bool = True) -> PermutationSpec:
    """GPT-2 in Hugging Face names (``GPT2LMHeadModel``; Conv1D weights are [in, out]).

    ``c_attn`` holds Q|K|V side by side on its output axis (role qkv). Positions are
    learned, so Q/K within-head permutations are valid. ``lm_head`` is tied to ``wte``
    (both carry the residual on axis 1, so tying is respected).
    """
    intermediate = 4 * hidden if intermediate is None else intermediate
    b = SpecBuilder()
    res = "residual"
    b.size(res, hidden).mark_global(res)
    b.embedding(f"{prefix}wte", res)
    b.embedding(f"{prefix}wpe", res)
    for layer in range(layers):
        p = f"{prefix}h.{layer}."
        g = b.head_group(f"layers.{layer}.attn", HeadGroup(heads, heads, hidden // heads))
        ffn = f"layers.{layer}.mlp"
        b.size(ffn, intermediate)
        b.norm(p + "ln_1", res, bias=True)
        b.linear(p + "attn.c_attn", ref(g, "qkv"), res, bias=True, conv1d=True)
        b.linear(p + "attn.c_proj", res, ref(g, "o"), bias=True, conv1d=True)
        b.norm(p + "ln_2", res, bias=True)
        b.linear(p + "mlp.c_fc", ffn, res, bias=True, conv1d=True)
        b.linear(p + "mlp.c_proj", res, ffn, bias=True, conv1d=True)
    b.norm(f"{prefix}ln_f", res, bias=True)
    if lm_head:
        b.linear("lm_head", None, res)
    return b.build()


def bert_spec(layers: int, hidden: int, heads: int, intermediate: int | None = None, *, prefix: str = "bert.",
              head: str | None = "mlm", pooler: bool = False) -> PermutationSpec:
    """BERT in Hugging Face names.

    head: "mlm" (``BertForMaskedLM``: the transform keeps the residual space
    because its decoder is tied to the word embeddings), "classifier"
    (``BertForSequenceClassification``: pooler + classifier, the pooler keeping
    its own, unpermuted space) or None (``BertModel``; ``pooler`` adds its pooler).
    """
    intermediate = 4 * hidden if intermediate is None else intermediate
    b = SpecBuilder()
    res = "residual"
    b.size(res, hidden).mark_global(res)
    e = f"{prefix}embeddings."
    for emb in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        b.embedding(e + emb, res)
    b.norm(e + "LayerNorm", res, bias=True)
    for layer in range(layers):
        p = f"{prefix}encoder.layer.{layer}."
        g = b.head_group(f"layers.{layer}.attn", HeadGroup(heads, heads, hidden // heads))
        ffn = f"layers.{layer}.mlp"
        b.size(ffn, intermediate)
        b.linear(p + "attention.self.query", ref(g, "q"), res, bias=True)
        b.linear(p + "attention.self.key", ref(g, "k"), res, bias=True)
        b.linear(p + "attention.self.value", ref(g, "v"), res, bias=True)
        b.linear(p + "attention.output.dense", res, ref(g, "o"), bias=True)
        b.norm(p + "attention.output.LayerNorm", res, bias=True)
        b.linear(p + "intermediate.dense", ffn, res, bias=True)
        b.linear(p + "output.dense", res, ffn, bias=True)
        b.norm(p + "output.LayerNorm", res, bias=True)
    if head == "mlm":
        c = "cls.predictions."
        b.linear(c + "transform.dense", res, res, bias=True)
        b.norm(c + "transform.LayerNorm", res, bias=True)
        b.linear(c + "decoder", None, res, bias=True)
        b.tensor(c + "bias", None)
    elif head == "classifier" or pooler:
        b.linear(f"{prefix}pooler.dense", None, res, bias=True)
    elif head is not None:
        raise ValueError(f"head must be 'mlm', 'classifier' or None, not {head!r}")
    return b.build()


def spec_from_config(config: Mapping[str, Any] | Any, arch: str | None = None, **options: Any) -> PermutationSpec:
    """The spec of a Hugging Face config (a config.json dict or a PretrainedConfig).

    ``arch``: "llama" (also mistral, qwen2), "gpt2" or "bert"; default: the
    config's ``model_type``. Extra options go to the builder.
    """
    cfg = config if isinstance(config, Mapping) else config.to_dict()
    kind = (arch or cfg.get("model_type") or "").lower()
    if kind in ("llama", "mistral", "qwen2"):
        heads = cfg["num_attention_heads"]
        # a tied lm_head carries the residual on axis 1 like embed_tokens, so one spec fits both
        return llama_spec(
            cfg["num_hidden_layers"], cfg["hidden_size"], heads, cfg.get("num_key_value_heads") or heads,
            cfg.get("intermediate_size"), head_dim=cfg.get("head_dim"),
            attention_bias=cfg.get("attention_bias", kind == "qwen2"), mlp_bias=cfg.get("mlp_bias", False),
            **options,
        )
    if kind == "gpt2":
        return gpt2_spec(cfg["n_layer"], cfg["n_embd"], cfg["n_head"], cfg.get("n_inner"), **options)
    if kind == "bert":
        return bert_spec(cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"],
                         cfg.get("intermediate_size"), **options)
    raise ValueError(f"no permutation spec for architecture {kind or '(unknown)'!r} (known: llama, mistral, qwen2, gpt2, bert)")


# -- serialisation -------------------------------------------------------------------------


def spec_to_dict(spec: PermutationSpec) -> dict[str, Any]:
    return {
        "axes": {t: list(a) for t, a in spec.axes.items()},
        "heads": {g: asdict(h) for g, h in spec.heads.items()},
        "sizes": dict(spec.sizes),
        "global_perms": list(spec.global_perms),
    }


def spec_from_dict(d: Mapping[str, Any]) -> PermutationSpec:
    return PermutationSpec(
        d["axes"], {g: HeadGroup(**h) for g, h in d.get("heads", {}).items()},
        sizes=d.get("sizes"), global_perms=d.get("global_perms", ()),
    )


def spec_to_json(spec: PermutationSpec) -> str:
    return json.dumps(spec_to_dict(spec), separators=(",", ":"))
