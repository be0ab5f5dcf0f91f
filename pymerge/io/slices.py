"""A model composed of layer slices of other models, read like a CheckpointReader.

`slices` (mergekit's passthrough) stacks layer ranges of one or more checkpoints:
output layer k is layer `start + j` of the slice's model, renumbered. Tensors outside
the layer stack (embeddings, final norm, head) and the config and tokenizer come
from the first slice's model. The engine streams it like any input checkpoint.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from pymerge.config import LAYER_RE, SliceEntry, layer_index
from pymerge.errors import InputMismatchError
from pymerge.io.reader import CheckpointReader

# config.json keys that count the layers, by model family
_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def renumbered(name: str, layer: int) -> str:
    """`name` with its layer index replaced by `layer`."""
    m = LAYER_RE.search(name)
    return name[: m.start(1)] + str(layer) + name[m.end(1):]


class SlicedModel:
    def __init__(self, slices: Sequence[SliceEntry]):
        self._readers: dict[str, CheckpointReader] = {}
        try:
            for s in slices:
                if s.model not in self._readers:
                    self._readers[s.model] = CheckpointReader(s.model)
            self._compose(slices)
        except BaseException:
            self.close()
            raise

    def _compose(self, slices: Sequence[SliceEntry]) -> None:
        first = self._readers[slices[0].model]
        self.path = first.path
        self._first = first
        problems = []
        layers_of: dict[str, dict[int, list[str]]] = {}
        for path, r in self._readers.items():
            by_layer: dict[int, list[str]] = defaultdict(list)
            for n in r.names():
                i = layer_index(n)
                if i is not None:
                    by_layer[i].append(n)
            layers_of[path] = by_layer
        self._src: dict[str, tuple[CheckpointReader, str]] = {}
        stack: list[str] = []  # the model of each output layer
        stack_names: list[str] = []
        for k, s in enumerate(slices):
            have = len(layers_of[s.model])
            if not 0 <= s.start < s.end <= have:
                problems.append(f"slices[{k}]: layer_range [{s.start}, {s.end}] is outside the {have} layers of {s.model}")
                continue
            for j in range(s.start, s.end):
                out_layer = len(stack)
                names = layers_of[s.model][j]
                stack.append(s.model)
                for n in names:
                    self._src[renumbered(n, out_layer)] = (self._readers[s.model], n)
                    stack_names.append(renumbered(n, out_layer))
        self.num_layers = len(stack)
        if not problems:
            problems = self._check_layers(stack, layers_of)
        if problems:
            shown = "\n  ".join(problems[:20])
            raise InputMismatchError(f"the slices do not compose one model ({len(problems)} problems):\n  {shown}")
        # The first model's order: what precedes its layer stack, the composed stack, the rest.
        head, tail, seen = [], [], False
        for n in first.names():
            if layer_index(n) is not None:
                seen = True
            else:
                (tail if seen else head).append(n)
                self._src[n] = (first, n)
        self._names = head + stack_names + tail

    def _check_layers(self, stack: list[str], layers_of) -> list[str]:
        """Every output layer must hold the tensors of the first, with the same shapes."""
        problems = []
        want = {renumbered(n, 0): self._readers[stack[0]].shape(n) for n in self._layer_names(0)}
        for k in range(1, len(stack)):
            got = {renumbered(n, 0): self.shape(n) for n in self._layer_names(k)}
            if set(got) != set(want):
                diff = sorted(set(got) ^ set(want))
                problems.append(f"layer {k} (from {stack[k]}) holds other tensors than layer 0: {', '.join(diff[:4])}")
                continue
            for n, shape in want.items():
                if tuple(got[n]) != tuple(shape):
                    problems.append(f"layer {k} (from {stack[k]}): {n} has shape {tuple(got[n])}, layer 0 {tuple(shape)}")
        return problems

    def _layer_names(self, k: int) -> list[str]:
        return [n for n in self._src if layer_index(n) == k]

    # --- the CheckpointReader interface the engine reads through -----------------------
    def names(self) -> list[str]:
        return list(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._src

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def shape(self, name: str) -> tuple[int, ...]:
        r, n = self._src[name]
        return r.shape(n)

    def dtype(self, name: str) -> torch.dtype:
        r, n = self._src[name]
        return r.dtype(n)

    def nbytes(self, name: str) -> int:
        r, n = self._src[name]
        return r.nbytes(n)

    def get(self, name: str, pin_memory: bool = False) -> torch.Tensor:
        r, n = self._src[name]
        return r.get(n, pin_memory)

    def files(self) -> list[Path]:
        return [f for r in self._readers.values() for f in r.files()]

    def config(self) -> dict[str, Any] | None:
        cfg = self._first.config()
        if cfg is None:
            return None
        cfg = dict(cfg)
        for key in _LAYER_COUNT_KEYS:
            if key in cfg:
                cfg[key] = self.num_layers
        return cfg

    def files_to_copy(self) -> list[Path]:
        return self._first.files_to_copy()

    def close(self) -> None:
        for r in self._readers.values():
            r.close()

    def __enter__(self) -> "SlicedModel":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SlicedModel({self.num_layers} layers from {', '.join(self._readers)})"
