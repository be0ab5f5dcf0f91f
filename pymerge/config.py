"""Merge configuration: mergekit-style YAML or a dict -> a validated `MergeConfig`.

The accepted keys are mergekit's (`merge_method`, `base_model`, `models`,
`parameters`, `dtype`, `out_dtype`, `tokenizer_source`) plus pymerge's own
(`seed`, `backend`, `device`, `out_shard_size`, `allow_nonfinite`). Everything
is checked when the configuration is loaded; every error names its key path.

Parameter values follow mergekit's forms:
  * a scalar: `density: 0.5`
  * a gradient: `t: [0, 0.5, 1]`, interpolated piecewise-linearly over the layer
    position p = layer / (num_layers - 1) (p = 1 when there is a single layer):
    with n values, x = p * (n - 1), value = v[i] + (x - i) * (v[i+1] - v[i]), i = int(x);
  * a filter list: `[{filter: self_attn, value: ...}, {value: ...}]`; the first
    entry whose filter is a substring of the tensor name wins; an entry without
    a filter (or with `filter: "*"`) matches every tensor. When no entry matches,
    the next level is asked (a model's own parameters, then the top-level
    `parameters`, then the method's default), as mergekit does.
Tensors without a layer index (embeddings, final norm, lm_head) take position 0,
the first value of a gradient, as mergekit has done since 0.1.2 (its planner
reads them with t=0; versions before that used t=1 for the tensors after the
layers).
"""

from __future__ import annotations

import copy
import difflib
import math
import os
import re
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Mapping

import yaml

from pymerge.errors import ConfigError

__all__ = [
    "MERGE_METHODS",
    "MergeConfig",
    "ModelEntry",
    "TensorParams",
    "layer_index",
    "layer_position",
    "load_config",
    "parse_dtype",
    "parse_size",
]

_REQUIRED = object()  # marks an option without a default

# ---------------------------------------------------------------------------------------
# Methods: the per-model parameters with their defaults, the method options with their
# defaults, and the mergekit keys accepted but ignored.
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Method:
    per_model: dict[str, Any]
    options: dict[str, Any]
    needs_base: bool = True
    # int8_mask is a memory knob of mergekit's task-arithmetic family; it changes nothing here
    ignored: tuple[str, ...] = ()


_TASK_ARITHMETIC_FAMILY = ("int8_mask",)

_METHODS: dict[str, _Method] = {
    "linear": _Method(
        needs_base=False,
        per_model={"weight": 1.0},
        options={"normalize": True},
    ),
    "task_arithmetic": _Method(
        per_model={"weight": 1.0},
        options={"normalize": False, "lambda": 1.0},
        ignored=_TASK_ARITHMETIC_FAMILY,
    ),
    "ties": _Method(
        per_model={"weight": 1.0, "density": 1.0},
        options={
            "normalize": True,
            "lambda": 1.0,
            "consensus": "sum",
            "trim_ties": "exact",  # "inclusive" under scope: model (the only rule there)
            "scope": "tensor",
            "merge": "dis-mean",  # scope: model only
        },
        ignored=_TASK_ARITHMETIC_FAMILY,
    ),
    "dare_linear": _Method(
        per_model={"weight": 1.0, "density": 1.0},
        options={"normalize": False, "lambda": 1.0, "rescale": True},
        ignored=_TASK_ARITHMETIC_FAMILY,
    ),
    "dare_ties": _Method(
        per_model={"weight": 1.0, "density": 1.0},
        options={"normalize": False, "lambda": 1.0, "rescale": True, "consensus": "sum"},
        ignored=_TASK_ARITHMETIC_FAMILY,
    ),
    "breadcrumbs": _Method(
        per_model={"weight": 1.0, "density": 1.0, "gamma": 0.01},
        options={"normalize": False, "lambda": 1.0},
        ignored=_TASK_ARITHMETIC_FAMILY,
    ),
    "breadcrumbs_ties": _Method(
        per_model={"weight": 1.0, "density": 1.0, "gamma": 0.01},
        options={"normalize": False, "lambda": 1.0, "consensus": "sum"},
        ignored=_TASK_ARITHMETIC_FAMILY,
    ),
    "slerp": _Method(
        per_model={},
        options={"t": _REQUIRED},
    ),
    "emr": _Method(
        per_model={"weight": 1.0},
        options={"zero_sign": "neg", "rescale_scope": "tensor_mean_sum"},
    ),
    # layer slices of other models, stacked (mergekit's passthrough); or one model, copied
    "passthrough": _Method(
        needs_base=False,
        per_model={},
        options={},
    ),
    "pcb": _Method(
        per_model={"weight": 1.0},
        options={
            "density": 0.1,
            "clip_ratio": 0.01,
            "lambda": 1.0,
            "lambdas": None,  # one per merged model; replaces lambda
            "scope": "model",
        },
    ),
}

MERGE_METHODS: tuple[str, ...] = tuple(_METHODS)

# ---------------------------------------------------------------------------------------
# Value kinds. A name means the same thing in every method that has it.
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Range:
    lo: float | None
    hi: float | None
    hi_open: bool = False

    def contains(self, x: float) -> bool:
        if self.lo is not None and x < self.lo:
            return False
        if self.hi is not None and (x >= self.hi if self.hi_open else x > self.hi):
            return False
        return True

    def __str__(self) -> str:
        return f"[{_num(self.lo)}, {_num(self.hi)}{')' if self.hi_open else ']'}"


_REAL = _Range(None, None)
_UNIT = _Range(0.0, 1.0)

# numeric parameters: scalar, gradient or filter list
_NUMERIC: dict[str, _Range] = {
    "weight": _REAL,
    "density": _UNIT,
    "gamma": _UNIT,
    "lambda": _REAL,
    "t": _UNIT,
    "clip_ratio": _Range(0.0, 0.5, hi_open=True),
}

# enumerations: the YAML values allowed, in the order the error message lists them
_ENUMS: dict[str, tuple[Any, ...]] = {
    "consensus": ("sum", "count"),
    "trim_ties": ("exact", "inclusive"),
    "scope": ("tensor", "model"),
    "merge": ("dis-mean", "dis-sum"),
    "rescale": (True, False, "inverse_density"),
    "zero_sign": ("neg", "zero"),
    "rescale_scope": ("tensor_mean_sum", "model"),
}

_BOOLS = ("normalize", "int8_mask")

_DTYPE_ALIASES = {
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}

_BACKENDS = ("auto", "torch", "cpu", "cuda", "triton")

_TOP_LEVEL_KEYS = (
    "merge_method",
    "base_model",
    "models",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "seed",
    "backend",
    "device",
    "out_shard_size",
    "allow_nonfinite",
    "slices",
)

# mergekit keys that have a meaning pymerge does not implement: say so instead of "unknown"
_UNSUPPORTED_MERGEKIT_KEYS = {
    "modules": "multi-module configurations are not supported; list whole models under 'models'",
    "tokenizer": "the tokenizer block is not supported; use tokenizer_source: base or a model path",
    "chat_template": "chat templates are not supported; the tokenizer files are copied unchanged",
}

_MODEL_ENTRY_KEYS = ("model", "parameters", "permutations")
_FILTER_ENTRY_KEYS = ("filter", "value")

_DEFAULT_SHARD_SIZE = 5 * 10**9

# ---------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------


def _num(x: float | None) -> str:
    if x is None:
        return "inf"
    return f"{x:g}"


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    return repr(value) if isinstance(value, str) else str(value)


def _allowed(values) -> str:
    return ", ".join(_show(v) if not isinstance(v, str) else v for v in values)


def _unknown_key(path: str, key: Any, valid, where: str) -> ConfigError:
    valid = list(valid)
    hint = ""
    if isinstance(key, str):
        close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
        if close:
            hint = f" (did you mean '{close[0]}'?)"
    listing = ", ".join(valid) if valid else "(none)"
    return ConfigError(f"{path}: unknown key '{key}'{hint}; valid keys {where}: {listing}")


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _same_model(a: str, b: str) -> bool:
    return a == b or os.path.normpath(a) == os.path.normpath(b)


# ---------------------------------------------------------------------------------------
# Parameter settings: scalar, gradient, filter list
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Gradient:
    values: tuple[float, ...]

    def at(self, position: float) -> float:
        v = self.values
        if len(v) == 1:
            return v[0]
        x = position * (len(v) - 1)
        i = min(int(x), len(v) - 1)
        j = min(i + 1, len(v) - 1)
        frac = x - i
        return (1.0 - frac) * v[i] + frac * v[j]


@dataclass(frozen=True)
class _Filtered:
    entries: tuple[tuple[str | None, float | _Gradient], ...]

    def match(self, tensor_name: str) -> float | _Gradient | None:
        for flt, value in self.entries:
            if flt is None or flt in tensor_name:
                return value
        return None


_Setting = float | _Gradient | _Filtered


def _evaluate(setting: _Setting, tensor_name: str, position: float) -> float | None:
    if isinstance(setting, _Filtered):
        setting = setting.match(tensor_name)
        if setting is None:
            return None
    if isinstance(setting, _Gradient):
        return setting.at(position)
    return setting


def _parse_number(value: Any, path: str, rng: _Range) -> float:
    if not _is_number(value):
        raise ConfigError(f"{path}: expected a number, got {_show(value)}")
    x = float(value)
    if not math.isfinite(x):
        raise ConfigError(f"{path}: must be finite, got {_show(value)}")
    if not rng.contains(x):
        raise ConfigError(f"{path}: {_show(value)} is out of range {rng}")
    return x


def _parse_scalar_or_gradient(value: Any, path: str, rng: _Range) -> float | _Gradient:
    if isinstance(value, list):
        if not value:
            raise ConfigError(f"{path}: a gradient needs at least one value")
        return _Gradient(tuple(_parse_number(v, f"{path}[{i}]", rng) for i, v in enumerate(value)))
    return _parse_number(value, path, rng)


def _parse_setting(value: Any, path: str, rng: _Range) -> _Setting:
    """A scalar, a gradient (list of numbers) or a filter list (list of {filter, value})."""
    if isinstance(value, Mapping):
        value = [value]  # a single {filter, value} entry
    if isinstance(value, list) and value and any(isinstance(v, Mapping) for v in value):
        entries = []
        catch_all = None
        for i, entry in enumerate(value):
            epath = f"{path}[{i}]"
            if not isinstance(entry, Mapping):
                raise ConfigError(
                    f"{epath}: a filter list holds only {{filter, value}} entries, got {_show(entry)}"
                )
            for k in entry:
                if k not in _FILTER_ENTRY_KEYS:
                    raise _unknown_key(_join(epath, str(k)), k, _FILTER_ENTRY_KEYS, "of a filter entry")
            if "value" not in entry:
                raise ConfigError(f"{epath}: missing key 'value'")
            flt = entry.get("filter")
            if flt is not None and not isinstance(flt, str):
                raise ConfigError(f"{epath}.filter: expected a string (a substring of tensor names)")
            if flt == "*":
                flt = None
            if catch_all is not None:
                # mergekit stops at the first match, so nothing after a catch-all is ever used
                raise ConfigError(
                    f"{epath}: unreachable; entry {catch_all} has no filter and matches every "
                    f"tensor, so put the default entry last"
                )
            if flt is None:
                catch_all = i
            entries.append((flt, _parse_scalar_or_gradient(entry["value"], f"{epath}.value", rng)))
        return _Filtered(tuple(entries))
    return _parse_scalar_or_gradient(value, path, rng)


# ---------------------------------------------------------------------------------------
# Layer index and position
# ---------------------------------------------------------------------------------------

LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|layer|blocks|block)\.(\d+)(?:\.|$)")


def layer_index(tensor_name: str) -> int | None:
    """The layer of a tensor: the number right after the first component named
    layers, h, layer, blocks or block (`model.layers.3.mlp.up_proj.weight` -> 3);
    None for tensors outside the layer stack."""
    m = LAYER_RE.search(tensor_name)
    return int(m.group(1)) if m else None


def layer_position(tensor_name: str, num_layers: int) -> float:
    """Where a tensor sits in the layer stack, in [0, 1], for gradient interpolation.

    Layer i of L sits at i / (L - 1), and at 1 when L == 1 (mergekit's rule). A tensor
    without a layer index sits at 0, as in mergekit since 0.1.2. An index beyond the
    stack (a second tower with more layers) is clamped to the last position."""
    idx = layer_index(tensor_name)
    if idx is None:
        return 0.0
    if num_layers <= 1:
        return 1.0
    return min(idx, num_layers - 1) / (num_layers - 1)


# ---------------------------------------------------------------------------------------
# Sizes and dtypes
# ---------------------------------------------------------------------------------------

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*)\s*$")


def parse_size(value: int | str) -> int:
    """Bytes from an int or a string: "5GB" (decimal: KB, MB, GB, TB), "1.5GiB"
    (binary: KiB, MiB, GiB, TiB), "123", "123B". Fractions round down to whole bytes."""
    if _is_number(value) and float(value).is_integer():
        n = int(value)
    elif isinstance(value, str):
        m = _SIZE_RE.match(value)
        unit = m.group(2).lower() if m else None
        if m is None or unit not in _SIZE_UNITS:
            raise ConfigError(
                f"invalid size {value!r}: expected a number of bytes or a number with a unit "
                f"(B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), e.g. '5GB' or '1.5GiB'"
            )
        try:
            n = int(Decimal(m.group(1)) * _SIZE_UNITS[unit])
        except InvalidOperation:  # pragma: no cover - the regex admits only decimals
            raise ConfigError(f"invalid size {value!r}") from None
    else:
        raise ConfigError(f"invalid size {_show(value)}: expected an integer or a string like '5GB'")
    if n < 1:
        raise ConfigError(f"invalid size {value!r}: must be at least 1 byte")
    return n


def parse_dtype(value: Any, path: str = "dtype"):
    """A torch dtype from float32|float16|bfloat16 or their aliases (fp32, float,
    fp16, half, bf16); None stays None (keep the inputs' dtype)."""
    if value is None:
        return None
    name = _DTYPE_ALIASES.get(value) if isinstance(value, str) else None
    if name is None:
        raise ConfigError(
            f"{path}: invalid value {_show(value)}; allowed values: {', '.join(_DTYPE_ALIASES)}"
        )
    import torch

    return getattr(torch, name)


def _dtype_name(dtype) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------------------------------
# The configuration
# ---------------------------------------------------------------------------------------


@dataclass
class ModelEntry:
    """One input model: its path (or hub id) and its own parameters, as written."""

    model: str
    parameters: dict[str, Any] = field(default_factory=dict)
    # A permutation file (`pymerge align`) that puts this model in the reference
    # model's coordinates (the base's, or the first model's without a base).
    permutations: str | None = None


@dataclass(frozen=True)
class SliceEntry:
    """Layers [start, end) of `model`, stacked after the previous slice's (passthrough)."""

    model: str
    start: int
    end: int


@dataclass
class TensorParams:
    """The parameters of one tensor.

    per_model: one dict per merged (non-base) model, in `MergeConfig.models` order,
        with every per-model parameter of the method (weight, density, gamma as the
        method has them), defaults filled, as floats.
    options: every option of the method (see `MergeConfig.options_defaults`), defaults
        filled; numeric ones (t, lambda, density and clip_ratio of pcb) resolved for this
        tensor; bools, enumeration strings, and `lambdas` (list of floats or None) as is.
    layer: the tensor's layer index or None; position: its place in [0, 1] used for
        gradients.
    """

    per_model: list[dict[str, float]]
    options: dict[str, Any]
    layer: int | None = None
    position: float = 0.0


@dataclass
class MergeConfig:
    merge_method: str
    base_model: str | None
    models: list[ModelEntry]  # the merged models; the base is removed (except for linear)
    parameters: dict[str, Any]  # top-level parameters, as written
    out_dtype: Any = None  # torch.dtype or None: the effective output dtype
    dtype: Any = None  # torch.dtype or None: `dtype` as written (out_dtype wins over it)
    tokenizer_source: str | None = None
    seed: int = 0
    backend: str = "auto"
    device: str = "cpu"
    out_shard_size: int = _DEFAULT_SHARD_SIZE
    allow_nonfinite: bool = False
    models_raw: list[ModelEntry] = field(default_factory=list)  # `models` as written
    slices: list[SliceEntry] = field(default_factory=list)  # passthrough's layer slices, in output order
    out_dtype_raw: Any = field(default=None, repr=False)  # `out_dtype` as written
    _global: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    _per_model: list[dict[str, _Setting]] = field(default_factory=list, repr=False, compare=False)

    # --- construction -----------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "MergeConfig":
        if not isinstance(data, Mapping):
            raise ConfigError(f"a merge configuration is a mapping of keys, got {type(data).__name__}")
        data = copy.deepcopy(dict(data))
        for key in data:
            if key in _UNSUPPORTED_MERGEKIT_KEYS:
                raise ConfigError(f"{key}: {_UNSUPPORTED_MERGEKIT_KEYS[key]}")
            if key not in _TOP_LEVEL_KEYS:
                raise _unknown_key(str(key), key, _TOP_LEVEL_KEYS, "at the top level")

        method_name = data.get("merge_method")
        if method_name is None:
            raise ConfigError(f"merge_method: required; allowed values: {', '.join(_METHODS)}")
        if method_name not in _METHODS:
            hint = ""
            if isinstance(method_name, str):
                close = difflib.get_close_matches(method_name, list(_METHODS), n=1, cutoff=0.6)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(
                f"merge_method: unknown method {_show(method_name)}{hint}; "
                f"allowed values: {', '.join(_METHODS)}"
            )
        method = _METHODS[method_name]

        base_model = data.get("base_model")
        if base_model is not None and (not isinstance(base_model, str) or not base_model):
            raise ConfigError(f"base_model: expected a model path or hub id, got {_show(base_model)}")

        # models, as written
        raw_models = data.get("models")
        if raw_models is None:
            raw_models = []
        if not isinstance(raw_models, list):
            raise ConfigError("models: expected a list of {model, parameters} entries")
        models_raw: list[ModelEntry] = []
        for i, item in enumerate(raw_models):
            models_raw.append(_parse_model_entry(item, f"models[{i}]"))
        for i, entry in enumerate(models_raw):
            for j in range(i):
                if _same_model(entry.model, models_raw[j].model):
                    raise ConfigError(
                        f"models[{i}].model: {entry.model!r} is listed twice (also models[{j}])"
                    )

        slices = _parse_slices(data.get("slices"), method_name, models_raw)
        if method_name == "passthrough" and not slices and len(models_raw) != 1:
            raise ConfigError(
                f"models: passthrough copies one model or stacks layer slices; got {len(models_raw)} models "
                "(list layer ranges under slices: [{sources: [{model: ..., layer_range: [0, 16]}]}, ...])"
            )

        # the merged models: mergekit lists the base among the models; it is not a task vector
        if method.needs_base:
            if base_model is None:
                what = "model A, interpolated towards the other model" if method_name == "slerp" else (
                    "the task vectors are differences from it"
                )
                raise ConfigError(f"base_model: required for {method_name} ({what})")
            kept = [(i, e) for i, e in enumerate(models_raw) if not _same_model(e.model, base_model)]
        else:
            kept = list(enumerate(models_raw))

        if method_name == "slerp":
            if len(kept) != 1:
                names = ", ".join(e.model for _, e in kept) or "none"
                raise ConfigError(
                    f"models: slerp interpolates exactly two models, base_model ({base_model}) and one "
                    f"other; got {len(kept)} other model(s): {names}"
                )
        elif not kept and not slices:
            if method.needs_base:
                raise ConfigError(
                    f"models: {method_name} needs at least one model besides base_model ({base_model})"
                )
            raise ConfigError(f"models: {method_name} needs at least one model")

        # parameters
        raw_params = data.get("parameters")
        if raw_params is None:
            raw_params = {}
        if not isinstance(raw_params, Mapping):
            raise ConfigError("parameters: expected a mapping of parameter names to values")
        raw_params = dict(raw_params)
        global_settings = _parse_global_params(method_name, method, raw_params, n_models=len(kept))

        per_model_settings = []
        for i, entry in enumerate(models_raw):
            settings = _parse_model_params(method_name, method, entry.parameters, f"models[{i}].parameters")
            # the base's own parameters are checked above but take no part in the merge
            if any(i == k for k, _ in kept):
                per_model_settings.append(settings)

        _check_scope(method_name, global_settings, per_model_settings, [k for k, _ in kept])

        # output and runtime keys
        dtype = parse_dtype(data.get("dtype"), "dtype")
        out_dtype_raw = parse_dtype(data.get("out_dtype"), "out_dtype")
        out_dtype = out_dtype_raw if out_dtype_raw is not None else dtype

        tokenizer_source = data.get("tokenizer_source")
        _check_tokenizer_source(tokenizer_source, base_model, models_raw)

        seed = data.get("seed", 0)
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ConfigError(f"seed: expected an integer >= 0, got {_show(seed)}")

        backend = data.get("backend", "auto")
        if backend not in _BACKENDS:
            raise ConfigError(f"backend: invalid value {_show(backend)}; allowed values: {', '.join(_BACKENDS)}")

        device = data.get("device", "cpu")
        if not isinstance(device, str) or not re.fullmatch(r"cpu|cuda(:[0-9]+)?", device):
            raise ConfigError(f"device: invalid value {_show(device)}; allowed values: cpu, cuda, cuda:N")

        shard = data.get("out_shard_size", _DEFAULT_SHARD_SIZE)
        try:
            out_shard_size = parse_size(shard)
        except ConfigError as e:
            raise ConfigError(f"out_shard_size: {e}") from None

        allow_nonfinite = data.get("allow_nonfinite", False)
        if not isinstance(allow_nonfinite, bool):
            raise ConfigError(f"allow_nonfinite: expected true or false, got {_show(allow_nonfinite)}")

        return cls(
            merge_method=method_name,
            base_model=base_model,
            models=[e for _, e in kept],
            parameters=raw_params,
            out_dtype=out_dtype,
            dtype=dtype,
            tokenizer_source=tokenizer_source,
            seed=seed,
            backend=backend,
            device=device,
            out_shard_size=out_shard_size,
            allow_nonfinite=allow_nonfinite,
            models_raw=models_raw,
            slices=slices,
            out_dtype_raw=out_dtype_raw,
            _global=global_settings,
            _per_model=per_model_settings,
        )

    # --- method facts -----------------------------------------------------------------
    @property
    def method(self) -> _Method:
        return _METHODS[self.merge_method]

    @property
    def needs_base(self) -> bool:
        return self.method.needs_base

    @property
    def per_model_defaults(self) -> dict[str, Any]:
        return dict(self.method.per_model)

    @property
    def options_defaults(self) -> dict[str, Any]:
        return {k: (None if v is _REQUIRED else v) for k, v in self.method.options.items()}

    def option(self, name: str) -> Any:
        """A non-numeric option (or a numeric one given as a plain scalar), defaults filled."""
        if name not in self.method.options:
            raise KeyError(f"{self.merge_method} has no option {name!r}")
        if name in self._global:
            value = self._global[name]
            return value if not isinstance(value, (_Gradient, _Filtered)) else None
        return _option_default(self.merge_method, name, self._global)

    @property
    def scope(self) -> str:
        """'model' when the method's selection statistics span the whole model (ties and
        pcb with scope: model), else 'tensor'. emr's rescalers are sums over tensors that
        the merge pass accumulates, so emr is 'tensor' whatever its rescale_scope."""
        if "scope" in self.method.options:
            return self.option("scope")
        return "tensor"

    @property
    def model_scope_passes(self) -> tuple[str, ...]:
        """The statistics a whole-model pass must gather before the merge pass."""
        if self.scope != "model":
            return ()
        if self.merge_method == "ties":
            return ("trim_threshold",)
        if self.merge_method == "pcb":
            return ("clip_bounds", "score_threshold")
        return ()  # pragma: no cover - only ties and pcb have a model scope

    # --- per-tensor resolution --------------------------------------------------------
    def tensor_params(self, tensor_name: str, num_layers: int) -> TensorParams:
        position = layer_position(tensor_name, num_layers)
        per_model = []
        for settings in self._per_model:
            values = {}
            for key, default in self.method.per_model.items():
                value = None
                if key in settings:
                    value = _evaluate(settings[key], tensor_name, position)
                if value is None and key in self._global:
                    value = _evaluate(self._global[key], tensor_name, position)
                values[key] = default if value is None else value
            per_model.append(values)

        options = {}
        for key in self.method.options:
            value = self._global.get(key)
            if isinstance(value, (_Gradient, _Filtered)) or (key in _NUMERIC and value is not None):
                value = _evaluate(value, tensor_name, position)
            if value is None:
                value = _option_default(self.merge_method, key, self._global)
                if value is _REQUIRED:
                    raise ConfigError(
                        f"parameters.{key}: no value for tensor {tensor_name!r}: no filter matches it "
                        f"and there is no default entry (one without 'filter')"
                    )
            options[key] = value
        return TensorParams(per_model=per_model, options=options, layer=layer_index(tensor_name), position=position)

    # --- models -----------------------------------------------------------------------
    def model_paths(self) -> list[str]:
        """Every model to read: the base first (if any), then the merged models, unique."""
        out: list[str] = []
        for path in ([self.base_model] if self.base_model else []) + [m.model for m in self.models]:
            if not any(_same_model(path, p) for p in out):
                out.append(path)
        return out

    # --- serialisation ----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A dict that `from_dict` turns back into an equal configuration."""
        d: dict[str, Any] = {"merge_method": self.merge_method}
        if self.base_model is not None:
            d["base_model"] = self.base_model
        models = []
        for m in self.models_raw:
            entry: dict[str, Any] = {"model": m.model}
            if m.parameters:
                entry["parameters"] = copy.deepcopy(m.parameters)
            if m.permutations:
                entry["permutations"] = m.permutations
            models.append(entry)
        d["models"] = models
        if self.slices:
            d["slices"] = [{"sources": [{"model": s.model, "layer_range": [s.start, s.end]}]} for s in self.slices]
        if self.parameters:
            d["parameters"] = copy.deepcopy(self.parameters)
        if self.dtype is not None:
            d["dtype"] = _dtype_name(self.dtype)
        if self.out_dtype_raw is not None:
            d["out_dtype"] = _dtype_name(self.out_dtype_raw)
        if self.tokenizer_source is not None:
            d["tokenizer_source"] = self.tokenizer_source
        d["seed"] = self.seed
        d["backend"] = self.backend
        d["device"] = self.device
        d["out_shard_size"] = self.out_shard_size
        d["allow_nonfinite"] = self.allow_nonfinite
        return d

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    _OVERRIDABLE = ("device", "backend", "out_shard_size", "allow_nonfinite", "seed", "out_dtype")

    def with_overrides(self, **options: Any) -> "MergeConfig":
        """A copy with run options replaced (validated like the file's own keys)."""
        d = self.to_dict()
        for key, value in options.items():
            if key not in self._OVERRIDABLE:
                raise _unknown_key("options", key, self._OVERRIDABLE, "for a run")
            d[key] = _dtype_name(value) if key == "out_dtype" and not isinstance(value, str) else value
        return MergeConfig.from_dict(d)


# ---------------------------------------------------------------------------------------
# Parsing pieces
# ---------------------------------------------------------------------------------------


def _parse_slices(raw: Any, method_name: str, models_raw: list[ModelEntry]) -> list[SliceEntry]:
    if raw is None:
        return []
    if method_name != "passthrough":
        raise ConfigError(f"slices: layer slices are stacked with merge_method: passthrough, not {method_name}")
    if models_raw:
        raise ConfigError("slices: give the models inside the slices, not also under models")
    if not isinstance(raw, list) or not raw:
        raise ConfigError("slices: expected a non-empty list of {sources: [{model, layer_range}]} entries")
    out = []
    for k, item in enumerate(raw):
        path = f"slices[{k}]"
        if not isinstance(item, Mapping):
            raise ConfigError(f"{path}: expected a mapping with sources, got {_show(item)}")
        for key in item:
            if key != "sources":
                raise _unknown_key(_join(path, str(key)), key, ("sources",), "of a slice")
        sources = item.get("sources")
        if not isinstance(sources, list) or len(sources) != 1:
            raise ConfigError(
                f"{path}.sources: passthrough takes exactly one source per slice, got "
                f"{len(sources) if isinstance(sources, list) else _show(sources)} (slices that merge several "
                "sources are not supported; merge whole models under models:)"
            )
        src, spath = sources[0], f"{path}.sources[0]"
        if not isinstance(src, Mapping):
            raise ConfigError(f"{spath}: expected {{model, layer_range}}, got {_show(src)}")
        for key in src:
            if key not in ("model", "layer_range"):
                raise _unknown_key(_join(spath, str(key)), key, ("model", "layer_range"), "of a slice source")
        model = src.get("model")
        if not isinstance(model, str) or not model:
            raise ConfigError(f"{spath}.model: expected a model path, got {_show(model)}")
        rng = src.get("layer_range")
        if (not isinstance(rng, list) or len(rng) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in rng)
                or not 0 <= rng[0] < rng[1]):
            raise ConfigError(f"{spath}.layer_range: expected [start, end] with 0 <= start < end (end excluded), "
                              f"got {_show(rng)}")
        out.append(SliceEntry(model, rng[0], rng[1]))
    return out


def _parse_model_entry(item: Any, path: str) -> ModelEntry:
    if isinstance(item, str):
        if not item:
            raise ConfigError(f"{path}: empty model path")
        return ModelEntry(model=item, parameters={})
    if not isinstance(item, Mapping):
        raise ConfigError(f"{path}: expected a model path or a {{model, parameters}} entry, got {_show(item)}")
    for k in item:
        if k not in _MODEL_ENTRY_KEYS:
            if k == "layer_range":
                raise ConfigError(f"{path}.layer_range: layer ranges go under slices: (with merge_method: passthrough)")
            raise _unknown_key(_join(path, str(k)), k, _MODEL_ENTRY_KEYS, "of a model entry")
    model = item.get("model")
    if not isinstance(model, str) or not model:
        raise ConfigError(f"{path}.model: required; a model path or hub id")
    params = item.get("parameters")
    if params is None:
        params = {}
    if not isinstance(params, Mapping):
        raise ConfigError(f"{path}.parameters: expected a mapping of parameter names to values")
    perms = item.get("permutations")
    if perms is not None and (not isinstance(perms, str) or not perms):
        raise ConfigError(f"{path}.permutations: expected the path of a permutation file from `pymerge align`")
    return ModelEntry(model=model, parameters=dict(params), permutations=perms)


def _parse_value(key: str, value: Any, path: str) -> Any:
    if key in _NUMERIC:
        return _parse_setting(value, path, _NUMERIC[key])
    if key in _BOOLS:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {_show(value)}")
        return value
    if key in _ENUMS:
        allowed = _ENUMS[key]
        # bools compare equal to 0/1: match on type as well as value
        if not any(value == a and type(value) is type(a) for a in allowed):
            raise ConfigError(f"{path}: invalid value {_show(value)}; allowed values: {_allowed(allowed)}")
        return value
    if key == "lambdas":
        if value is None:
            return None
        if not isinstance(value, list) or not value:
            raise ConfigError(f"{path}: expected a list of numbers, one per merged model")
        return [_parse_number(v, f"{path}[{i}]", _REAL) for i, v in enumerate(value)]
    raise AssertionError(f"no value kind for {key}")  # pragma: no cover - tables out of sync


def _parse_global_params(
    method_name: str, method: _Method, raw: dict[str, Any], n_models: int
) -> dict[str, Any]:
    valid = list(method.per_model) + [k for k in method.options if k not in method.per_model]
    valid += list(method.ignored)
    settings: dict[str, Any] = {}
    for key, value in raw.items():
        path = f"parameters.{key}"
        if key not in valid:
            raise _unknown_key(path, key, valid, f"in parameters for {method_name}")
        if key in method.ignored:
            _parse_value(key, value, path)  # still checked
            continue
        settings[key] = _parse_value(key, value, path)

    if "lambdas" in settings and settings["lambdas"] is not None:
        if len(settings["lambdas"]) != n_models:
            raise ConfigError(
                f"parameters.lambdas: {len(settings['lambdas'])} values for {n_models} merged model(s); "
                f"give one per model besides base_model"
            )
        if "lambda" in settings:
            raise ConfigError("parameters.lambdas: give either lambda (one scale) or lambdas (one per model), not both")

    if "t" in method.options and method.options["t"] is _REQUIRED and "t" not in settings:
        raise ConfigError(
            f"parameters.t: required for {method_name} (0 gives base_model, 1 the other model)"
        )
    return settings


def _parse_model_params(method_name: str, method: _Method, raw: dict[str, Any], path: str) -> dict[str, _Setting]:
    settings: dict[str, _Setting] = {}
    for key, value in raw.items():
        kpath = f"{path}.{key}"
        if key in method.per_model:
            settings[key] = _parse_value(key, value, kpath)
        elif key in method.options or key in method.ignored:
            raise ConfigError(
                f"{kpath}: '{key}' is an option of the whole {method_name} merge, not of one model; "
                f"set it under the top-level parameters"
            )
        else:
            raise _unknown_key(kpath, key, method.per_model, f"in a model's parameters for {method_name}")
    return settings


def _option_default(method_name: str, key: str, global_settings: dict[str, Any]) -> Any:
    default = _METHODS[method_name].options[key]
    # the TIES paper's whole-model trim keeps every |tau| >= the threshold
    if method_name == "ties" and key == "trim_ties" and global_settings.get("scope") == "model":
        return "inclusive"
    return default


def _check_scope(
    method_name: str,
    global_settings: dict[str, Any],
    per_model: list[dict[str, _Setting]],
    model_indices: list[int],
) -> None:
    scope = global_settings.get("scope", _METHODS[method_name].options.get("scope"))
    if method_name == "ties":
        if scope != "model":
            if "merge" in global_settings:
                raise ConfigError("parameters.merge: applies only with scope: model (the TIES paper's form)")
            return
        if global_settings.get("trim_ties", "inclusive") != "inclusive":
            raise ConfigError(
                "parameters.trim_ties: scope: model keeps every |tau| >= the model's threshold; "
                "allowed values with scope: model: inclusive"
            )
        constant = ("weight", "density")
    elif method_name == "pcb":
        if scope != "model":
            return
        constant = ("density", "clip_ratio")
    else:
        return

    def check(setting: Any, path: str) -> None:
        if isinstance(setting, (_Gradient, _Filtered)):
            raise ConfigError(
                f"{path}: scope: model needs one value for the whole model, not a gradient or filter list"
            )

    for key in constant:
        if key in global_settings:
            check(global_settings[key], f"parameters.{key}")
        for i, settings in zip(model_indices, per_model):
            if key in settings:
                check(settings[key], f"models[{i}].parameters.{key}")
    if method_name == "ties":
        # the paper's form elects on the unweighted trimmed deltas
        for i, settings in zip(model_indices, per_model):
            w = settings.get("weight", global_settings.get("weight", 1.0))
            if w != 1.0:
                where = f"models[{i}].parameters.weight" if "weight" in settings else "parameters.weight"
                raise ConfigError(f"{where}: ties with scope: model does not weight the models; use 1 or scope: tensor")


def _check_tokenizer_source(value: Any, base_model: str | None, models: list[ModelEntry]) -> None:
    if value is None:
        return
    if value == "union":
        raise ConfigError("tokenizer_source: 'union' (merging vocabularies) is not supported; use base or a model path")
    if not isinstance(value, str) or not value:
        raise ConfigError(f"tokenizer_source: expected base or a model path, got {_show(value)}")
    if value == "base":
        if base_model is None:
            raise ConfigError("tokenizer_source: 'base' needs base_model")
        return
    known: list[str] = []
    for k in ([base_model] if base_model else []) + [m.model for m in models]:
        if not any(_same_model(k, seen) for seen in known):
            known.append(k)
    if not any(_same_model(value, k) for k in known):
        raise ConfigError(
            f"tokenizer_source: {value!r} is not a model of this configuration; allowed values: "
            f"base, or one of the models: {', '.join(known)}"
        )


# ---------------------------------------------------------------------------------------
# YAML
# ---------------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """Safe YAML with two fixes: duplicate keys are errors (PyYAML keeps the last one
    silently), and `1e-3` is a float (YAML 1.1 wants `1.0e-3` and reads it as a string)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise ConfigError(
                    f"{key}: duplicate key (lines {seen[key] + 1} and {key_node.start_mark.line + 1})"
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_config(source: str | os.PathLike | Mapping[str, Any] | MergeConfig) -> MergeConfig:
    """A validated configuration from a YAML file path or a dict."""
    if isinstance(source, MergeConfig):
        return source
    if isinstance(source, Mapping):
        return MergeConfig.from_dict(source)
    if not isinstance(source, (str, os.PathLike)):
        raise ConfigError(f"a configuration is a YAML file path or a dict, got {type(source).__name__}")
    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"{source}: no such configuration file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read: {e}") from None
    try:
        data = yaml.load(text, Loader=_Loader)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if data is None:
        raise ConfigError(f"{path}: empty configuration; merge_method and models are required")
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: a merge configuration is a mapping of keys, got {type(data).__name__}")
    try:
        return MergeConfig.from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
