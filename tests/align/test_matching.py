"""Weight matching and activation matching: exact recovery, monotone objective, head-structured LAPs."""

import itertools

import numpy as np
import pytest
import torch

from pymerge.align import (
    CorrelationStats,
    HeadGroup,
    activation_matching,
    activation_sites,
    bert_spec,
    collect_activations,
    gpt2_spec,
    lap,
    llama_spec,
    match_objective,
    mlp_spec,
    permute_state_dict,
    weight_matching,
)
from pymerge.align.matching import solve_heads


def _shapes(sd):
    return {k: v.shape for k, v in sd.items()}


def _monotone(history):
    return all(b >= a for a, b in zip(history, history[1:]))


def test_lap_rectangular():
    c = np.array([[1.0, 5.0, 0.0], [4.0, 0.0, 0.0]])
    assert lap(c).tolist() == [1, 0]
    assert lap(c.T).tolist() == [1, 0, -1]  # more rows than columns: one row left without a partner


@pytest.mark.parametrize("arch", ["mlp", "llama_gqa", "llama_g3", "gpt2", "bert"])
def test_weight_matching_recovers_a_permuted_copy(models, arch):
    if arch == "mlp":
        torch.manual_seed(0)
        sd = models.mlp([6, 9, 8, 4]).state_dict()
        spec = mlp_spec(3)
    elif arch.startswith("llama"):
        heads, hidden = (4, 32) if arch == "llama_gqa" else (6, 48)
        cfg = models.llama(heads=heads, kv_heads=2, hidden=hidden).config
        sd = models.llama(heads=heads, kv_heads=2, hidden=hidden).state_dict()
        spec = llama_spec(cfg.num_hidden_layers, hidden, heads, 2, cfg.intermediate_size)
    elif arch == "gpt2":
        sd = models.gpt2().state_dict()
        spec = gpt2_spec(2, 32, 4)
    else:
        sd = models.bert().state_dict()
        spec = bert_spec(2, 32, 4, 48)
    perms = spec.random(spec.infer_sizes(_shapes(sd)), generator=torch.Generator().manual_seed(3))
    permuted = permute_state_dict(sd, spec, perms)
    result = weight_matching(spec, sd, permuted, seed=0)
    truth = spec.invert(perms)
    assert set(result.perms) == set(truth)
    for k in truth:
        assert torch.equal(result.perms[k], truth[k]), k
    assert _monotone(result.objective_history)
    assert result.converged
    assert result.objective_history[-1] == pytest.approx(match_objective(spec, sd, sd), rel=1e-12)


def test_weight_matching_objective_never_decreases_and_stops(models):
    # two unrelated models: many sweeps of real work
    torch.manual_seed(0)
    a, b = models.llama(seed=1).state_dict(), models.llama(seed=2).state_dict()
    spec = llama_spec(2, 32, 4, 2, 48)
    seen = []
    result = weight_matching(spec, a, b, seed=7, callback=lambda sweep, obj: seen.append(obj))
    assert _monotone(result.objective_history)
    assert result.objective_history[-1] > result.objective_history[0]
    assert seen == result.objective_history[1:]
    assert result.sweeps <= 100
    assert result.objective_history[-1] == pytest.approx(match_objective(spec, a, b, result.perms), rel=1e-12)
    spec.validate(result.perms, complete=True)
    # the random visiting order is seeded: the same seed gives the same answer
    again = weight_matching(spec, a, b, seed=7)
    assert all(torch.equal(again.perms[k], result.perms[k]) for k in result.perms)
    capped = weight_matching(spec, a, b, seed=7, max_sweeps=1)
    assert capped.sweeps == 1 and len(capped.objective_history) == 2
    streaming = weight_matching(spec, a, b, order="streaming")
    assert _monotone(streaming.objective_history)


def test_weight_matching_from_checkpoint_readers(models, tmp_path):
    from safetensors.torch import save_file

    from pymerge.io import CheckpointReader

    a, b = models.gpt2(seed=1).state_dict(), models.gpt2(seed=2).state_dict()
    spec = gpt2_spec(2, 32, 4)
    for name, sd in (("a", a), ("b", b)):
        (tmp_path / name).mkdir()
        # tied lm_head is not stored, as transformers saves it
        save_file({k: v.contiguous() for k, v in sd.items() if k != "lm_head.weight"},
                  str(tmp_path / name / "model.safetensors"))
    in_memory = weight_matching(spec, {k: v for k, v in a.items() if k != "lm_head.weight"},
                                {k: v for k, v in b.items() if k != "lm_head.weight"})
    with CheckpointReader(tmp_path / "a") as ra, CheckpointReader(tmp_path / "b") as rb:
        streamed = weight_matching(spec, ra, rb)
    assert streamed.objective_history == in_memory.objective_history
    assert all(torch.equal(streamed.perms[k], in_memory.perms[k]) for k in in_memory.perms)


def _brute_force_heads(costs, hg):
    """max over head maps and within-head orders (MHA, tiny sizes)."""
    h, dh = hg.n_heads, hg.head_dim
    q = costs["q"].reshape(h, dh, h, dh) + costs["k"].reshape(h, dh, h, dh)
    o = costs["v"].reshape(h, dh, h, dh) + costs["o"].reshape(h, dh, h, dh)
    best = -np.inf
    within = list(itertools.permutations(range(dh)))
    for sigma in itertools.permutations(range(h)):
        total = 0.0
        for a, b in enumerate(sigma):
            qk = max(sum(q[a, i, b, p[i]] for i in range(dh)) for p in within) if hg.qk_within else \
                sum(q[a, i, b, i] for i in range(dh))
            vo = max(sum(o[a, i, b, p[i]] for i in range(dh)) for p in within)
            total += qk + vo
        best = max(best, total)
    return best


@pytest.mark.parametrize("qk_within", [True, False])
def test_solve_heads_is_exact_for_mha(qk_within):
    rng = np.random.default_rng(0)
    hg = HeadGroup(3, 3, 3, qk_within=qk_within)
    costs = {r: rng.standard_normal((9, 9)) for r in "qkvo"}
    comps, value = solve_heads(costs, hg, hg)
    assert value == pytest.approx(_brute_force_heads(costs, hg), rel=1e-12)
    if not qk_within:
        assert (comps["qk_within"] == np.arange(3)).all()


def test_solve_heads_gqa_never_below_current():
    rng = np.random.default_rng(1)
    hg = HeadGroup(6, 2, 4, qk_within=False)
    costs = {"q": rng.standard_normal((24, 24)), "k": rng.standard_normal((8, 8)),
             "v": rng.standard_normal((8, 8)), "o": rng.standard_normal((24, 24))}
    from pymerge.align.spec import head_map

    def value(c):
        comps = {k: torch.from_numpy(np.asarray(v)) for k, v in c.items()}
        return sum(costs[r][np.arange(costs[r].shape[0]), head_map(comps, hg, hg, r).numpy()].sum() for r in "qkvo")

    current = {"heads": np.array([1, 0]), "q_in_group": np.array([[2, 0, 1], [0, 2, 1]]),
               "qk_within": np.tile(np.arange(4), (2, 1)), "vo_within": np.array([[3, 2, 1, 0], [0, 1, 2, 3]])}
    comps, v = solve_heads(costs, hg, hg, current)
    assert v == pytest.approx(value(comps), rel=1e-12)
    assert v >= value(current)


def test_correlation_stats_match_numpy():
    g = torch.Generator().manual_seed(0)
    xa, xb = torch.randn(500, 4, generator=g), torch.randn(500, 3, generator=g)
    xb[:, 0] = 2 * xa[:, 2] + 0.1 * xb[:, 0]
    st = CorrelationStats()
    for i in range(0, 500, 128):
        st.update(xa[i:i + 128], xb[i:i + 128])
    full = np.corrcoef(np.concatenate([xa.numpy(), xb.numpy()], 1).T)[:4, 4:]
    np.testing.assert_allclose(st.correlation().numpy(), full, atol=1e-12)


def test_activation_matching_mlp_recovers_permutation(models):
    torch.manual_seed(0)
    a = models.mlp([5, 16, 12, 3])
    spec = mlp_spec(3)
    perms = spec.random(spec.infer_sizes(_shapes(a.state_dict())), generator=torch.Generator().manual_seed(1))
    b = models.mlp([5, 16, 12, 3])
    b.load_state_dict(permute_state_dict(a.state_dict(), spec, perms))
    batches = [torch.randn(64, 5, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    sites = {"h0": ("layers.1", "input"), "h1": ("layers.2", "input")}
    result = activation_matching(collect_activations(a, b, batches, sites), spec)
    truth = spec.invert(perms)
    for k in truth:
        assert torch.equal(result.perms[k], truth[k])
    assert all(v == pytest.approx(1.0) for v in result.mean_correlation.values())


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_activation_matching_transformers_recovers_heads(models, arch):
    model = getattr(models, arch)()
    cfg = model.config
    spec = {"llama": lambda: llama_spec(2, 32, 4, 2, 48), "gpt2": lambda: gpt2_spec(2, 32, 4),
            "bert": lambda: bert_spec(2, 32, 4, 48)}[arch]()
    sd = model.state_dict()
    perms = spec.random(spec.infer_sizes(_shapes(sd)), generator=torch.Generator().manual_seed(2))
    other = models.load(model, permute_state_dict(sd, spec, perms))
    batches = [torch.randint(0, cfg.vocab_size, (4, 12), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    stats = collect_activations(model, other, batches, activation_sites(arch, 2),
                                forward=lambda m, ids: m(input_ids=ids))
    result = activation_matching(stats, spec)
    truth = spec.invert(perms)
    for k in truth:
        assert torch.equal(result.perms[k], truth[k]), k
    assert min(result.mean_correlation.values()) > 1 - 1e-6
