"""aligned_average through permute_average, permuted state dicts, permutation files."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pymerge import backends
from pymerge.align import (
    SpecBuilder,
    align_checkpoints,
    aligned_average,
    bert_spec,
    gpt2_spec,
    llama_spec,
    load_permutation_file,
    load_permutations,
    merge_with_permutations,
    permute_state_dict,
    save_permutations,
    spec_from_config,
)
from pymerge.io import CheckpointReader
from pymerge.synthetic import llama_family, save_checkpoint

PERMUTE_BACKENDS = [b for b in backends.available() if backends.implements(b, "permute_average")]


def _explicit_average(sds, coeffs, dtype):
    """sum_i c_i * sd_i in the op's order: fp32, acc = +0, then acc + c_i * x_i, one rounding."""
    out = {}
    for name in sds[0]:
        acc = torch.zeros(sds[0][name].shape, dtype=torch.float32)
        for c, sd in zip(coeffs, sds):
            acc = acc + torch.tensor(c, dtype=torch.float32) * sd[name].to(torch.float32)
        out[name] = acc.to(dtype)
    return out


def _random_sets(spec, sd, n, seed):
    sizes = spec.infer_sizes({k: v.shape for k, v in sd.items()})
    return [spec.random(sizes, generator=torch.Generator().manual_seed(seed + i)) for i in range(n)]


@pytest.mark.parametrize("backend", PERMUTE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_aligned_average_equals_explicitly_permuted_average(models, backend, dtype):
    sds = [{k: v.to(dtype) for k, v in models.llama(seed=s).state_dict().items()} for s in range(3)]
    spec = llama_spec(2, 32, 4, 2, 48)
    perms = _random_sets(spec, sds[0], 2, seed=10)
    coeffs = [0.5, 0.3, 0.2]
    merged = aligned_average(sds[0], sds[1:], perms, coeffs, spec=spec, backend=backend)
    explicit = _explicit_average([sds[0]] + [permute_state_dict(sd, spec, p) for sd, p in zip(sds[1:], perms)],
                                 coeffs, dtype)
    assert merged.keys() == explicit.keys()
    for k in explicit:
        assert merged[k].dtype == dtype
        assert torch.equal(merged[k], explicit[k]), k


def test_aligned_average_gpt2_fused_qkv_and_readers(models, tmp_path):
    a, b = models.gpt2(seed=1).state_dict(), models.gpt2(seed=2).state_dict()
    spec = gpt2_spec(2, 32, 4)
    (p,) = _random_sets(spec, a, 1, seed=4)
    for name, sd in (("a", a), ("b", b)):
        (tmp_path / name).mkdir()
        save_file({k: v.clone() for k, v in sd.items()}, str(tmp_path / name / "model.safetensors"))
    with CheckpointReader(tmp_path / "a") as ra, CheckpointReader(tmp_path / "b") as rb:
        from_readers = aligned_average(ra, rb, p, spec=spec)
    explicit = _explicit_average([a, permute_state_dict(b, spec, p)], [0.5, 0.5], torch.float32)
    for k in explicit:
        assert torch.equal(from_readers[k], explicit[k]), k


def test_aligned_average_of_a_permuted_copy_is_the_model(models):
    # averaging A with pi^-1(pi(A)) gives A back: the maps really undo the permutation
    a = models.bert().state_dict()
    spec = bert_spec(2, 32, 4, 48)
    (p,) = _random_sets(spec, a, 1, seed=8)
    b = permute_state_dict(a, spec, p)
    merged = aligned_average(a, b, spec.invert(p), [0.5, 0.5], spec=spec)
    for k, v in a.items():
        if v.is_floating_point():
            assert torch.equal(merged[k], v), k  # 0.5 x + 0.5 x is exact
        else:
            assert torch.equal(merged[k], v)


def test_higher_rank_tensors_and_scalars():
    # a conv kernel [out, in, kh, kw] permuted on both channel axes, plus a 0-d tensor
    b = SpecBuilder()
    b.tensor("conv.weight", "c_out", "c_in", None, None).tensor("conv.bias", "c_out").tensor("prev.weight", "c_in", None)
    b.tensor("scale")
    spec = b.build()
    g = torch.Generator().manual_seed(0)
    sds = [{"conv.weight": torch.randn(4, 3, 2, 2, generator=g), "conv.bias": torch.randn(4, generator=g),
            "prev.weight": torch.randn(3, 5, generator=g), "scale": torch.randn((), generator=g)} for _ in range(2)]
    p = {"c_out": torch.tensor([2, 0, 3, 1]), "c_in": torch.tensor([1, 2, 0])}
    merged = aligned_average(sds[0], sds[1], p, [0.25, 0.75], spec=spec)
    explicit = _explicit_average([sds[0], permute_state_dict(sds[1], spec, p)], [0.25, 0.75], torch.float32)
    for k in explicit:
        assert merged[k].shape == explicit[k].shape
        assert torch.equal(merged[k], explicit[k]), k


def test_non_float_tensors_come_from_the_base():
    spec = SpecBuilder().tensor("w", "p", None).build()
    base = {"w": torch.ones(2, 2), "steps": torch.tensor([7])}
    other = {"w": torch.zeros(2, 2), "steps": torch.tensor([9])}
    merged = aligned_average(base, other, {"p": torch.tensor([1, 0])}, spec=spec)
    assert merged["steps"].tolist() == [7]
    assert merged["w"].tolist() == [[0.5, 0.5], [0.5, 0.5]]


def test_permutation_file_round_trip(tmp_path):
    spec = llama_spec(2, 32, 4, 2, 48)
    sizes = {"residual": 32, "layers.0.mlp": 48, "layers.1.mlp": 48}
    perms = spec.random(sizes, generator=torch.Generator().manual_seed(0))
    path = save_permutations(tmp_path / "perms.safetensors", perms, spec=spec, metadata={"seed": 0, "note": "x"})
    loaded = load_permutations(path)
    assert loaded.keys() == perms.keys()
    for k in perms:
        assert loaded[k].dtype == torch.int64 and torch.equal(loaded[k], perms[k])
    f = load_permutation_file(path)
    assert f.metadata == {"seed": 0, "note": "x"}
    assert f.spec.axes == spec.axes and f.spec.heads == spec.heads and f.spec.sizes == spec.sizes
    # plain safetensors with JSON metadata: readable without pymerge, nothing pickled
    with safe_open(str(path), framework="pt") as raw:
        meta = raw.metadata()
        assert meta["format"] == "pymerge-permutations"
        assert json.loads(meta["spec"])["heads"]["layers.0.attn"]["n_kv_heads"] == 2
    assert path.read_bytes()[:1] != b"\x80"  # not a pickle stream
    # without a spec, and partial maps survive too
    p2 = save_permutations(tmp_path / "partial.safetensors", {"h0": torch.tensor([2, -1, 0], dtype=torch.int32)})
    assert load_permutations(p2)["h0"].tolist() == [2, -1, 0]
    assert load_permutation_file(p2).spec is None


def test_permutation_file_rejects_other_files(tmp_path):
    save_file({"x": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="not a pymerge permutation file"):
        load_permutations(tmp_path / "model.safetensors")


def test_align_and_merge_checkpoints_end_to_end(tmp_path):
    fam = llama_family(tmp_path / "fam", n_models=2, layers=2, hidden=32, intermediate=44, heads=4, kv_heads=2,
                       vocab=50, dtype=torch.float32, shards=2, seed=3)
    # model_1 scrambled by a random permutation: alignment must find it back
    with CheckpointReader(fam.models[0]) as r0, CheckpointReader(fam.models[1]) as r1:
        a = {n: r0.get(n) for n in r0.names()}
        b = {n: r1.get(n) for n in r1.names()}
        config = r0.config()

    spec = spec_from_config(config)
    (p,) = _random_sets(spec, b, 1, seed=2)
    save_checkpoint(tmp_path / "scrambled", permute_state_dict(b, spec, p), config, shards=2)
    result = align_checkpoints(fam.models[0], tmp_path / "scrambled", tmp_path / "perms.safetensors", order="streaming")
    assert all(torch.equal(result.perms[k], spec.invert(p)[k]) for k in result.perms)
    out = merge_with_permutations(fam.models[0], [tmp_path / "scrambled"], [tmp_path / "perms.safetensors"],
                                  tmp_path / "merged")
    with CheckpointReader(out) as rm:
        merged = {n: rm.get(n) for n in rm.names()}
    expected = aligned_average(a, b, None, spec=spec)  # the scramble undone = plain average of the originals
    assert merged.keys() == expected.keys()
    for k in expected:
        assert torch.equal(merged[k], expected[k]), k
