"""Every spec preserves the function: a random valid permutation set leaves the logits unchanged."""

import pytest
import torch

from pymerge.align import (
    HeadGroup,
    PermutationSpec,
    RopeWithinHeadError,
    SpecBuilder,
    bert_spec,
    gpt2_spec,
    llama_spec,
    mlp_spec,
    permute_state_dict,
    spec_from_config,
)

ATOL = 1e-5


def _ids(vocab, seed=0, batch=3, length=11):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def _check_preserved(models, model, spec, seed=1):
    sd = model.state_dict()
    assert spec.missing(sd) == [], "the spec names tensors the model lacks"
    assert spec.unknown(sd) == [], "the model has tensors the spec does not describe"
    perms = spec.random(spec.infer_sizes({k: v.shape for k, v in sd.items()}),
                        generator=torch.Generator().manual_seed(seed))
    spec.validate(perms, complete=True)
    permuted = permute_state_dict(sd, spec, perms)
    changed = [k for k in spec.axes if not torch.equal(sd[k], permuted[k])]
    assert len(changed) > len(spec.axes) // 2, "the random permutation set barely moved anything"
    ids = _ids(model.config.vocab_size)
    ref = models.logits(model, ids)
    out = models.logits(models.load(model, permuted), ids)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=1e-5)
    # and the inverse set restores the original weights exactly
    back = permute_state_dict(permuted, spec, spec.invert(perms))
    for k in sd:
        assert torch.equal(back[k], sd[k]), k
    return perms


def test_mlp_spec_preserves_function(models):
    torch.manual_seed(0)
    mlp = models.mlp([5, 7, 6, 3])
    spec = mlp_spec(3)
    assert spec.perm_names == ["h0", "h1"]
    sd = mlp.state_dict()
    perms = spec.random(spec.infer_sizes({k: v.shape for k, v in sd.items()}), generator=torch.Generator().manual_seed(0))
    other = models.mlp([5, 7, 6, 3])
    other.load_state_dict(permute_state_dict(sd, spec, perms))
    x = torch.randn(10, 5)
    torch.testing.assert_close(other(x), mlp(x), atol=ATOL, rtol=0)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 2), (4, 1)])
def test_llama_spec_preserves_function(models, heads, kv_heads):
    model = models.llama(heads=heads, kv_heads=kv_heads, hidden=48 if heads == 6 else 32)
    cfg = model.config
    spec = llama_spec(cfg.num_hidden_layers, cfg.hidden_size, heads, kv_heads, cfg.intermediate_size)
    perms = _check_preserved(models, model, spec)
    assert "layers.0.attn.qk_within" not in perms  # RoPE: no within-head Q/K order
    assert ("layers.0.attn.q_in_group" in perms) == (heads > kv_heads)


def test_gpt2_spec_preserves_function(models):
    model = models.gpt2()
    cfg = model.config
    spec = gpt2_spec(cfg.n_layer, cfg.n_embd, cfg.n_head)
    perms = _check_preserved(models, model, spec)
    assert "layers.1.attn.qk_within" in perms  # learned positions: within-head Q/K moves are valid


def test_bert_spec_preserves_function(models):
    model = models.bert()
    cfg = model.config
    spec = bert_spec(cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size)
    _check_preserved(models, model, spec)


def test_spec_from_config_matches_builders(models):
    for model, builder in ((models.llama(), llama_spec), (models.gpt2(), gpt2_spec), (models.bert(), bert_spec)):
        spec = spec_from_config(model.config.to_dict())
        assert spec.missing(model.state_dict()) == []
        assert set(spec.heads) == {f"layers.{i}.attn" for i in range(model.config.num_hidden_layers)}
    with pytest.raises(ValueError, match="no permutation spec"):
        spec_from_config({"model_type": "t5"})


def test_rope_rejects_within_head_qk_permutation(models):
    model = models.llama(heads=4, kv_heads=2)
    cfg = model.config
    spec = llama_spec(cfg.num_hidden_layers, cfg.hidden_size, 4, 2, cfg.intermediate_size)
    dh = cfg.hidden_size // 4
    within = torch.stack([torch.randperm(dh, generator=torch.Generator().manual_seed(k)) for k in range(2)])
    with pytest.raises(RopeWithinHeadError, match="within-head Q/K permutation"):
        spec.validate({"layers.0.attn.qk_within": within})
    spec.validate({"layers.0.attn.qk_within": torch.arange(dh).expand(2, dh)})  # identity is harmless
    spec.validate({"layers.0.attn.vo_within": within})  # V/O within-head stays valid

    # The rule is real: the same permutation, applied through a spec that ignores RoPE, changes the logits.
    no_rope = llama_spec(cfg.num_hidden_layers, cfg.hidden_size, 4, 2, cfg.intermediate_size, rope=False)
    permuted = permute_state_dict(model.state_dict(), no_rope, {"layers.0.attn.qk_within": within})
    ids = _ids(cfg.vocab_size)
    diff = (models.logits(models.load(model, permuted), ids) - models.logits(model, ids)).abs().max()
    assert diff > 1e-3


def test_validate_rejects_bad_sets():
    spec = llama_spec(1, 16, 4, 2, 24)
    with pytest.raises(ValueError, match="not a permutation of range"):
        spec.validate({"residual": torch.tensor([0, 0] + list(range(2, 16)))})
    with pytest.raises(ValueError, match="not a permutation of this spec"):
        spec.validate({"layers.0.attn:q": torch.arange(16)})
    with pytest.raises(ValueError, match="shape"):
        spec.validate({"layers.0.attn.heads": torch.arange(4)})
    with pytest.raises(ValueError, match="row 1"):
        spec.validate({"layers.0.attn.q_in_group": torch.tensor([[0, 1], [1, 1]])})
    with pytest.raises(ValueError, match="lacks"):
        spec.validate({}, complete=True)


def test_spec_inverse_is_derived():
    spec = mlp_spec(3)
    assert spec.perm_axes["h0"] == [("layers.0.weight", 0), ("layers.0.bias", 0), ("layers.1.weight", 1)]
    lspec = llama_spec(1, 16, 4, 2, 24)
    assert ("model.layers.0.self_attn.o_proj.weight", 1, "o") in lspec.group_axes["layers.0.attn"]
    assert len(lspec.perm_axes["residual"]) == 1 + 9 + 1 + 1  # embed, 9 per layer, final norm, lm_head
    with pytest.raises(ValueError, match="has size 17"):
        lspec.infer_sizes({"model.embed_tokens.weight": (10, 16), "lm_head.weight": (10, 17)})


def test_new_architecture_in_a_few_lines():
    # A pre-LN block with a fused QKV in torch layout and a SwiGLU MLP: a few builder calls.
    b = SpecBuilder()
    b.embedding("tok", "res")
    g = b.head_group("attn0", HeadGroup(n_heads=2, n_kv_heads=2, head_dim=4))
    b.norm("ln0", "res", bias=True)
    b.linear("qkv", f"{g}:qkv", "res")
    b.linear("proj", "res", f"{g}:o")
    b.linear("w1", "ffn0", "res").linear("w3", "ffn0", "res").linear("w2", "res", "ffn0")
    spec = b.build()
    assert isinstance(spec, PermutationSpec)
    assert set(spec.variables()) == {"res", "ffn0", "attn0.heads", "attn0.qk_within", "attn0.vo_within"}
