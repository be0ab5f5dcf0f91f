"""Heterogeneous widths: exact zero-padding, partial maps, merges with narrower or wider donors."""

import pytest
import torch

from pymerge.align import (
    HeadGroup,
    infer_heads,
    llama_spec,
    match_widths,
    merge_widths,
    mlp_spec,
    pad_heads,
    pad_width,
    partial_assignment,
    permute_state_dict,
    renamed,
)


def test_partial_assignment_selects_and_pads():
    score = torch.tensor([[0.0, 9.0, 1.0, 0.0], [5.0, 0.0, 0.0, 0.0]])
    assert partial_assignment(score).tolist() == [1, 0]  # wider donor: two of four units selected
    assert partial_assignment(score.T).tolist() == [1, 0, -1, -1]  # narrower donor: two base units uncovered


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-13), (torch.float32, 1e-6)])
def test_zero_padding_mlp_width_preserves_function(models, dtype, atol):
    torch.manual_seed(0)
    mlp = models.mlp([5, 7, 6, 3]).to(dtype)
    spec = mlp_spec(3)
    padded = pad_width(pad_width(mlp.state_dict(), spec, "h0", 11), spec, "h1", 9)
    wide = models.mlp([5, 11, 9, 3]).to(dtype)
    wide.load_state_dict(padded)
    x = torch.randn(32, 5, dtype=dtype)
    # exact in real arithmetic; only the summation order of the longer dot products can differ
    torch.testing.assert_close(wide(x), mlp(x), atol=atol, rtol=0)
    assert (padded["layers.0.weight"][7:] == 0).all() and (padded["layers.1.weight"][:, 7:] == 0).all()


def test_zero_padding_llama_heads_and_intermediate_preserves_function(models):
    import transformers

    model = models.llama(heads=4, kv_heads=2, hidden=32, intermediate=48, head_dim=8)
    spec = llama_spec(2, 32, 4, 2, 48)
    # 2 -> 4 KV heads (4 -> 8 query heads); transformers wants hidden divisible by the head count
    sd, wide_spec = pad_heads(model.state_dict(), spec, n_kv_heads=4)
    for layer in range(2):
        sd = pad_width(sd, wide_spec, f"layers.{layer}.mlp", 64)
    assert wide_spec.heads["layers.0.attn"] == HeadGroup(8, 4, 8, qk_within=False)
    cfg = transformers.LlamaConfig(**{**model.config.to_dict(), "num_attention_heads": 8, "num_key_value_heads": 4,
                                      "head_dim": 8, "intermediate_size": 64})
    wide = transformers.LlamaForCausalLM(cfg).eval()
    wide.load_state_dict(sd)
    ids = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(models.logits(wide, ids), models.logits(model, ids), atol=1e-5, rtol=1e-5)
    assert infer_heads(spec, {k: v.shape for k, v in sd.items()})["layers.1.attn"].n_kv_heads == 4


def _small_pair():
    # integers and lam = 0.5 keep every product and sum exact in fp32
    base = {"layers.0.weight": torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]),
            "layers.0.bias": torch.tensor([1.0, 2.0, 3.0]),
            "layers.1.weight": torch.tensor([[10.0, 20.0, 30.0]]),
            "layers.1.bias": torch.tensor([4.0])}
    donor = {"layers.0.weight": torch.tensor([[7.0, 8.0], [9.0, 10.0]]),
             "layers.0.bias": torch.tensor([5.0, 6.0]),
             "layers.1.weight": torch.tensor([[40.0, 50.0]]),
             "layers.1.bias": torch.tensor([8.0])}
    return base, donor


def test_merge_with_a_narrower_donor_by_hand():
    base, donor = _small_pair()
    spec = mlp_spec(2)
    maps = {"h0": torch.tensor([1, -1, 0])}  # base unit 0 <- donor unit 1, base unit 1 uncovered, 2 <- 0
    shrink = merge_widths(base, donor, maps, 0.5, spec=spec, uncovered="shrink")
    assert shrink["layers.0.weight"].tolist() == [[5.0, 6.0], [1.5, 2.0], [6.0, 7.0]]
    assert shrink["layers.0.bias"].tolist() == [3.5, 1.0, 4.0]
    assert shrink["layers.1.weight"].tolist() == [[30.0, 10.0, 35.0]]
    assert shrink["layers.1.bias"].tolist() == [6.0]
    keep = merge_widths(base, donor, maps, 0.5, spec=spec, uncovered="keep")
    assert keep["layers.0.weight"].tolist() == [[5.0, 6.0], [3.0, 4.0], [6.0, 7.0]]
    assert keep["layers.0.bias"].tolist() == [3.5, 2.0, 4.0]
    assert keep["layers.1.weight"].tolist() == [[30.0, 20.0, 35.0]]
    assert keep["layers.1.bias"].tolist() == [6.0]
    with pytest.raises(ValueError, match="uncovered"):
        merge_widths(base, donor, maps, 0.5, spec=spec, uncovered="drop")


def test_match_widths_finds_the_units_a_narrower_or_wider_donor_shares(models):
    torch.manual_seed(0)
    base = models.mlp([6, 16, 12, 4]).state_dict()
    spec = mlp_spec(3)
    g = torch.Generator().manual_seed(1)
    keep0, keep1 = torch.randperm(16, generator=g)[:10], torch.randperm(12, generator=g)[:7]
    narrow = permute_state_dict(base, spec, {"h0": keep0, "h1": keep1})  # 10 and 7 of the base's units
    result, _ = match_widths(spec, base, narrow)
    for name, keep, n in (("h0", keep0, 16), ("h1", keep1, 12)):
        expected = torch.full((n,), -1)
        expected[keep] = torch.arange(len(keep))
        assert torch.equal(result.perms[name], expected)
    assert all(b >= a for a, b in zip(result.objective_history, result.objective_history[1:]))
    merged = merge_widths(base, narrow, result.perms, 0.5, spec=spec, uncovered="keep")
    for k, v in base.items():  # the donor's units are the base's own: keep gives the base back
        torch.testing.assert_close(merged[k], v, atol=0, rtol=0)

    # a wider donor: the base's units plus extra ones, shuffled; selection finds the base's
    extra = models.mlp([6, 20, 15, 4]).state_dict()
    wide = {k: v.clone() for k, v in extra.items()}
    wide["layers.0.weight"][:16], wide["layers.0.bias"][:16] = base["layers.0.weight"], base["layers.0.bias"]
    wide["layers.1.weight"][:12, :16], wide["layers.1.bias"][:12] = base["layers.1.weight"], base["layers.1.bias"]
    wide["layers.1.weight"][:12, 16:] = 0
    wide["layers.2.weight"][:, :12] = base["layers.2.weight"]
    wide["layers.2.bias"] = base["layers.2.bias"]
    shuffle = {"h0": torch.randperm(20, generator=g), "h1": torch.randperm(15, generator=g)}
    wide = permute_state_dict(wide, spec, shuffle)
    result, _ = match_widths(spec, base, wide)
    for name, n in (("h0", 16), ("h1", 12)):
        assert torch.equal(shuffle[name][result.perms[name]], torch.arange(n))


def test_match_and_merge_heads_of_a_narrower_donor(models):
    base_model = models.llama(heads=6, kv_heads=3, hidden=48, head_dim=8)
    base = base_model.state_dict()
    spec = llama_spec(2, 48, 6, 3, 48, head_dim=8)
    # the donor keeps KV groups 2 and 0 of the base (query heads follow their group)
    donor_heads = {f"layers.{i}.attn": HeadGroup(4, 2, 8, qk_within=False) for i in range(2)}
    take = {f"layers.{i}.attn.heads": torch.tensor([2, 0]) for i in range(2)}
    narrow_spec = llama_spec(2, 48, 4, 2, 48, head_dim=8)
    donor = permute_state_dict(base, narrow_spec, take, src_heads={g: spec.heads[g] for g in spec.heads})
    assert donor["model.layers.0.self_attn.k_proj.weight"].shape == (16, 48)
    result, src_heads = match_widths(spec, base, donor)
    assert src_heads == donor_heads
    for i in range(2):
        assert result.perms[f"layers.{i}.attn.heads"].tolist() == [1, -1, 0]
    merged = merge_widths(base, donor, result.perms, 0.5, spec=spec, uncovered="keep")
    for k, v in base.items():
        assert torch.equal(merged[k], v), k
    shrunk = merge_widths(base, donor, result.perms, 0.5, spec=spec, uncovered="shrink")
    q = "model.layers.1.self_attn.q_proj.weight"
    assert torch.equal(shrunk[q][16:32], 0.5 * base[q][16:32])  # KV group 1 and its query heads: no partner
    assert torch.equal(shrunk[q][:16], base[q][:16])


def test_donor_layer_from_another_depth(models):
    torch.manual_seed(0)
    base = models.mlp([4, 6, 6, 6, 2]).state_dict()
    donor = models.mlp([4, 6, 6, 6, 2]).state_dict()
    spec = mlp_spec(4)
    # the output's layer 1 takes the donor's layer 2 (both map 6 -> 6)
    view = renamed(donor, lambda n: {"layers.2.weight": "layers.1.weight", "layers.2.bias": "layers.1.bias",
                                     "layers.1.weight": None, "layers.1.bias": None}.get(n, n))
    assert torch.equal(view.get("layers.1.weight"), donor["layers.2.weight"])
    assert "layers.2.weight" not in view.names()
    merged = merge_widths({k: v for k, v in base.items() if k.startswith("layers.1.")},
                          view, {"h0": torch.arange(6), "h1": torch.arange(6)}, 0.5, spec=spec)
    assert torch.equal(merged["layers.1.weight"], 0.5 * base["layers.1.weight"] + 0.5 * donor["layers.2.weight"])
