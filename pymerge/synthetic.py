"""Synthetic checkpoint families: a random base and fine-tunes of it, in Hugging Face layouts.

Used by `pymerge demo`, the tests and the benchmarks: nothing is downloaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


@dataclass
class Family:
    base: Path
    models: list[Path]


def llama_tensors(*, layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int, vocab: int,
                  generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random fp32 weights in the Llama layout (initialised at roughly the usual scale)."""
    head_dim = hidden // heads

    def w(*shape):
        return torch.randn(*shape, generator=generator) * shape[-1] ** -0.5

    t = {"model.embed_tokens.weight": w(vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        t[p + "self_attn.q_proj.weight"] = w(heads * head_dim, hidden)
        t[p + "self_attn.k_proj.weight"] = w(kv_heads * head_dim, hidden)
        t[p + "self_attn.v_proj.weight"] = w(kv_heads * head_dim, hidden)
        t[p + "self_attn.o_proj.weight"] = w(hidden, heads * head_dim)
        t[p + "mlp.gate_proj.weight"] = w(intermediate, hidden)
        t[p + "mlp.up_proj.weight"] = w(intermediate, hidden)
        t[p + "mlp.down_proj.weight"] = w(hidden, intermediate)
        t[p + "input_layernorm.weight"] = 1 + 0.1 * torch.randn(hidden, generator=generator)
        t[p + "post_attention_layernorm.weight"] = 1 + 0.1 * torch.randn(hidden, generator=generator)
    t["model.norm.weight"] = 1 + 0.1 * torch.randn(hidden, generator=generator)
    t["lm_head.weight"] = w(vocab, hidden)
    return t


def llama_config(*, layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int, vocab: int,
                 dtype: torch.dtype) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": vocab,
        "max_position_embeddings": 128,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": DTYPE_NAMES[dtype],
    }


def save_checkpoint(folder: Path, tensors: dict[str, torch.Tensor], config: dict | None, *, shards: int = 1) -> Path:
    """Write tensors as `shards` safetensors files (with an index when more than one)."""
    folder.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    shards = max(1, min(shards, len(names)))
    groups = [names[i::shards] for i in range(shards)] if shards > 1 else [names]
    groups = [sorted(g, key=names.index) for g in groups]
    weight_map = {}
    for k, group in enumerate(groups):
        fname = "model.safetensors" if shards == 1 else f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n].contiguous() for n in group}, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in group})
    if shards > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def llama_family(root: str | Path, *, n_models: int = 3, layers: int = 2, hidden: int = 64, intermediate: int = 172,
                 heads: int = 4, kv_heads: int = 2, vocab: int = 320, dtype: torch.dtype = torch.bfloat16,
                 shards: int = 3, seed: int = 0, delta: float = 0.02) -> Family:
    """A Llama-shaped base and `n_models` fine-tunes of it (base + random task vectors of relative size `delta`).

    Each fine-tune's task vector mixes a component shared by all of them, one of
    its own and sparse large outliers, so that the methods give different results.
    """
    root = Path(root)
    g = torch.Generator().manual_seed(seed)
    shape = dict(layers=layers, hidden=hidden, intermediate=intermediate, heads=heads, kv_heads=kv_heads, vocab=vocab)
    base = llama_tensors(**shape, generator=g)
    config = llama_config(**shape, dtype=dtype)
    base_dir = save_checkpoint(root / "base", {n: t.to(dtype) for n, t in base.items()}, config, shards=shards)
    (base_dir / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 128}))
    shared = {n: torch.randn(t.shape, generator=g) for n, t in base.items()}
    models = []
    for m in range(n_models):
        tuned = {}
        for n, t in base.items():
            scale = delta * t.abs().mean()
            own = torch.randn(t.shape, generator=g)
            outliers = (torch.rand(t.shape, generator=g) < 0.01) * torch.randn(t.shape, generator=g) * 10
            tuned[n] = (t + scale * (0.5 * shared[n] + own + outliers)).to(dtype)
        models.append(save_checkpoint(root / f"model_{m}", tuned, config, shards=shards))
    return Family(base_dir, models)
