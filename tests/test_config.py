import math

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from pymerge.config import (
    MERGE_METHODS,
    MergeConfig,
    ModelEntry,
    layer_index,
    layer_position,
    load_config,
    parse_size,
)
from pymerge.errors import ConfigError

# --- configurations as mergekit users write them -----------------------------------------

LINEAR = """
models:
  - model: psmathur/orca_mini_v3_13b
    parameters:
      weight: 1.0
  - model: WizardLM/WizardLM-13B-V1.2
    parameters:
      weight: 0.3
  - model: garage-bAInd/Platypus2-13B
    parameters:
      weight: 0.5
merge_method: linear
dtype: float16
"""

TASK_ARITHMETIC = """
models:
  - model: meta-llama/Llama-2-7b-hf
  - model: codellama/CodeLlama-7b-Instruct-hf
    parameters:
      weight: 0.6
  - model: lmsys/vicuna-7b-v1.5
    parameters:
      weight: 0.4
merge_method: task_arithmetic
base_model: meta-llama/Llama-2-7b-hf
parameters:
  normalize: true
  lambda: 0.9
dtype: bfloat16
"""

TIES = """
models:
  - model: psmathur/orca_mini_v3_13b
    parameters:
      density: [1, 0.7, 0.1] # density gradient
      weight: 1.0
  - model: garage-bAInd/Platypus2-13B
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1] # weight gradient
  - model: WizardLM/WizardMath-13B-V1.0
    parameters:
      density: 0.33
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
merge_method: ties
base_model: TheBloke/Llama-2-13B-fp16
parameters:
  normalize: true
  int8_mask: true
dtype: float16
"""

TIES_BASE_LISTED = """
models:
  - model: mistralai/Mistral-7B-v0.1
    # no parameters necessary for base model
  - model: OpenPipe/mistral-ft-optimized-1218
    parameters:
      density: 0.5
      weight: 0.5
  - model: mlabonne/NeuralHermes-2.5-Mistral-7B
    parameters:
      density: 0.5
      weight: 0.3
merge_method: ties
base_model: mistralai/Mistral-7B-v0.1
parameters:
  normalize: true
  int8_mask: true
dtype: bfloat16
"""

DARE_TIES = """
models:
  - model: mistralai/Mistral-7B-v0.1
  - model: samir-fama/SamirGPT-v1
    parameters:
      density: 0.53
      weight: 0.4
  - model: abacusai/Slerp-CM-mist-dpo
    parameters:
      density: 0.53
      weight: 0.3
  - model: EmbeddedLLM/Mistral-7B-Merge-14-v0.2
    parameters:
      density: 0.53
      weight: 0.3
merge_method: dare_ties
base_model: mistralai/Mistral-7B-v0.1
parameters:
  int8_mask: true
dtype: bfloat16
"""

DARE_LINEAR = """
models:
  - model: NousResearch/Llama-2-7b-hf
  - model: lmsys/vicuna-7b-v1.5
    parameters:
      weight: 0.5
      density: 0.6
  - model: WizardLM/WizardMath-7B-V1.0
    parameters:
      weight: 0.5
      density: 0.6
merge_method: dare_linear
base_model: NousResearch/Llama-2-7b-hf
parameters:
  rescale: inverse_density
  int8_mask: true
dtype: float16
"""

BREADCRUMBS = """
models:
  - model: mistralai/Mistral-7B-v0.1
  - model: teknium/OpenHermes-2.5-Mistral-7B
    parameters:
      weight: 0.5
      density: 0.9
      gamma: 0.01
  - model: HuggingFaceH4/zephyr-7b-beta
    parameters:
      weight: 0.5
merge_method: breadcrumbs_ties
base_model: mistralai/Mistral-7B-v0.1
parameters:
  density: 0.8
  gamma: 0.02
  normalize: false
dtype: bfloat16
"""

SLERP = """
models:
  - model: OpenPipe/mistral-ft-optimized-1218
  - model: mlabonne/NeuralHermes-2.5-Mistral-7B
merge_method: slerp
base_model: OpenPipe/mistral-ft-optimized-1218
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5 # fallback for rest of tensors
dtype: bfloat16
"""

EMR = """
merge_method: emr
base_model: ./base
models:
  - ./task_a
  - ./task_b
  - ./task_c
parameters:
  zero_sign: zero
  rescale_scope: model
"""

PCB = """
merge_method: pcb
base_model: ./base
models:
  - model: ./base
  - model: ./task_a
  - model: ./task_b
parameters:
  density: 0.2
  clip_ratio: 0.05
  lambdas: [0.8, 1.2]
out_dtype: bf16
seed: 7
backend: cpu
device: cuda:1
out_shard_size: 1.5GiB
allow_nonfinite: true
"""

ALL_EXAMPLES = [LINEAR, TASK_ARITHMETIC, TIES, TIES_BASE_LISTED, DARE_TIES, DARE_LINEAR, BREADCRUMBS, SLERP, EMR, PCB]


def cfg(text: str) -> MergeConfig:
    return MergeConfig.from_dict(yaml.safe_load(text))


def err(data, *needles):
    with pytest.raises(ConfigError) as info:
        MergeConfig.from_dict(data if isinstance(data, dict) else yaml.safe_load(data))
    msg = str(info.value)
    for n in needles:
        assert n in msg, msg
    return msg


def ties(**over):
    d = {
        "merge_method": "ties",
        "base_model": "base",
        "models": [{"model": "base"}, {"model": "a", "parameters": {"density": 0.5}}, {"model": "b"}],
    }
    d.update(over)
    return d


# --- the examples ------------------------------------------------------------------------


def test_linear_example():
    c = cfg(LINEAR)
    assert c.merge_method == "linear" and c.base_model is None and not c.needs_base
    assert [m.model for m in c.models][0] == "psmathur/orca_mini_v3_13b"
    assert c.out_dtype is torch.float16
    p = c.tensor_params("model.layers.0.self_attn.q_proj.weight", 40)
    assert p.per_model == [{"weight": 1.0}, {"weight": 0.3}, {"weight": 0.5}]
    assert p.options == {"normalize": True}
    assert c.model_paths() == [m.model for m in c.models]


def test_task_arithmetic_example_removes_the_base():
    c = cfg(TASK_ARITHMETIC)
    assert [m.model for m in c.models] == ["codellama/CodeLlama-7b-Instruct-hf", "lmsys/vicuna-7b-v1.5"]
    assert len(c.models_raw) == 3
    p = c.tensor_params("model.norm.weight", 32)
    assert p.per_model == [{"weight": 0.6}, {"weight": 0.4}]
    assert p.options == {"normalize": True, "lambda": 0.9}
    assert c.model_paths() == ["meta-llama/Llama-2-7b-hf", "codellama/CodeLlama-7b-Instruct-hf", "lmsys/vicuna-7b-v1.5"]
    assert c.out_dtype is torch.bfloat16


def test_ties_example_gradients_and_filters():
    c = cfg(TIES)
    assert c.base_model == "TheBloke/Llama-2-13B-fp16" and c.needs_base
    assert c.scope == "tensor" and c.model_scope_passes == ()
    # 41 layers: position = layer / 40
    p = c.tensor_params("model.layers.20.mlp.up_proj.weight", 41)
    assert p.layer == 20 and p.position == 0.5
    assert p.per_model[0] == {"weight": 1.0, "density": pytest.approx(0.7)}
    assert p.per_model[1] == {"weight": pytest.approx(0.5), "density": 0.5}  # 0.3 + 0.5 * (0.7 - 0.3)
    assert p.per_model[2] == {"weight": 0.5, "density": 0.33}
    assert p.options == {
        "normalize": True,
        "lambda": 1.0,
        "consensus": "sum",
        "trim_ties": "exact",
        "scope": "tensor",
        "merge": "dis-mean",
    }
    q = c.tensor_params("model.layers.40.self_attn.o_proj.weight", 41)
    assert q.per_model[0]["density"] == pytest.approx(0.1)
    assert q.per_model[1]["weight"] == 1.0
    assert q.per_model[2]["weight"] == 0.0  # the filter's default entry


def test_ties_base_listed_without_parameters():
    c = cfg(TIES_BASE_LISTED)
    assert [m.model for m in c.models] == ["OpenPipe/mistral-ft-optimized-1218", "mlabonne/NeuralHermes-2.5-Mistral-7B"]
    assert c.models_raw[0] == ModelEntry("mistralai/Mistral-7B-v0.1", {})
    p = c.tensor_params("model.embed_tokens.weight", 32)
    assert p.per_model == [{"weight": 0.5, "density": 0.5}, {"weight": 0.3, "density": 0.5}]
    assert "int8_mask" not in p.options  # accepted, ignored


def test_dare_examples():
    c = cfg(DARE_TIES)
    p = c.tensor_params("model.layers.5.mlp.down_proj.weight", 32)
    assert [m["density"] for m in p.per_model] == [0.53, 0.53, 0.53]
    assert p.options == {"normalize": False, "lambda": 1.0, "rescale": True, "consensus": "sum"}
    c = cfg(DARE_LINEAR)
    p = c.tensor_params("lm_head.weight", 32)
    assert p.options == {"normalize": False, "lambda": 1.0, "rescale": "inverse_density"}
    assert p.per_model == [{"weight": 0.5, "density": 0.6}] * 2
    no_rescale = yaml.safe_load(DARE_LINEAR)
    no_rescale["parameters"]["rescale"] = False
    assert MergeConfig.from_dict(no_rescale).tensor_params("x", 1).options["rescale"] is False


def test_breadcrumbs_per_model_overrides_global_default():
    c = cfg(BREADCRUMBS)
    p = c.tensor_params("model.layers.1.self_attn.v_proj.weight", 32)
    assert p.per_model == [
        {"weight": 0.5, "density": 0.9, "gamma": 0.01},
        {"weight": 0.5, "density": 0.8, "gamma": 0.02},
    ]
    assert p.options == {"normalize": False, "lambda": 1.0, "consensus": "sum"}
    plain = yaml.safe_load(BREADCRUMBS)
    plain["merge_method"] = "breadcrumbs"
    del plain["parameters"]
    p = MergeConfig.from_dict(plain).tensor_params("model.layers.1.mlp.up_proj.weight", 32)
    assert p.per_model[1] == {"weight": 0.5, "density": 1.0, "gamma": 0.01}  # method defaults
    assert p.options == {"normalize": False, "lambda": 1.0}


def test_slerp_example():
    c = cfg(SLERP)
    assert [m.model for m in c.models] == ["mlabonne/NeuralHermes-2.5-Mistral-7B"]
    assert c.model_paths() == ["OpenPipe/mistral-ft-optimized-1218", "mlabonne/NeuralHermes-2.5-Mistral-7B"]
    # 32 layers; layer 31 is the last gradient point, layer 0 the first
    assert c.tensor_params("model.layers.0.self_attn.q_proj.weight", 32).options["t"] == 0.0
    assert c.tensor_params("model.layers.31.self_attn.q_proj.weight", 32).options["t"] == 1.0
    assert c.tensor_params("model.layers.31.mlp.gate_proj.weight", 32).options["t"] == 0.0
    assert c.tensor_params("model.layers.7.input_layernorm.weight", 32).options["t"] == 0.5
    assert c.tensor_params("model.embed_tokens.weight", 32).options["t"] == 0.5
    assert c.tensor_params("model.layers.3.mlp.up_proj.weight", 32).per_model == [{}]


def test_emr_and_pcb_examples():
    c = cfg(EMR)
    assert len(c.models) == 3 and c.scope == "tensor" and c.model_scope_passes == ()
    p = c.tensor_params("encoder.layer.11.output.dense.weight", 12)
    assert p.options == {"zero_sign": "zero", "rescale_scope": "model"}
    assert p.per_model == [{"weight": 1.0}] * 3

    c = cfg(PCB)
    assert [m.model for m in c.models] == ["./task_a", "./task_b"]
    assert c.scope == "model" and c.model_scope_passes == ("clip_bounds", "score_threshold")
    p = c.tensor_params("transformer.h.0.attn.c_attn.weight", 12)
    assert p.options == {"density": 0.2, "clip_ratio": 0.05, "lambda": 1.0, "lambdas": [0.8, 1.2], "scope": "model"}
    assert c.out_dtype is torch.bfloat16 and c.dtype is None
    assert (c.seed, c.backend, c.device, c.allow_nonfinite) == (7, "cpu", "cuda:1", True)
    assert c.out_shard_size == 3 * 2**29


def test_runtime_defaults():
    c = cfg(TIES)
    assert (c.seed, c.backend, c.device, c.out_shard_size, c.allow_nonfinite) == (0, "auto", "cpu", 5 * 10**9, False)
    assert c.tokenizer_source is None
    pcb = MergeConfig.from_dict({"merge_method": "pcb", "base_model": "b", "models": ["a"]})
    assert pcb.tensor_params("w", 1).options == {
        "density": 0.1, "clip_ratio": 0.01, "lambda": 1.0, "lambdas": None, "scope": "model"
    }


@pytest.mark.parametrize("text", ALL_EXAMPLES)
def test_to_dict_round_trip(text):
    c = cfg(text)
    d = c.to_dict()
    assert MergeConfig.from_dict(d) == c
    assert MergeConfig.from_dict(yaml.safe_load(c.to_yaml())) == c
    names = ["model.layers.3.self_attn.q_proj.weight", "model.layers.3.mlp.up_proj.weight", "model.norm.weight"]
    again = MergeConfig.from_dict(d)
    for n in names:
        assert again.tensor_params(n, 8) == c.tensor_params(n, 8)


# --- gradients, filters, layers ----------------------------------------------------------


def test_gradient_interpolation_at_several_layers():
    c = MergeConfig.from_dict(
        {"merge_method": "slerp", "base_model": "a", "models": ["a", "b"], "parameters": {"t": [0, 0.5, 0.3, 0.7, 1]}}
    )
    t = lambda layer, n: c.tensor_params(f"model.layers.{layer}.mlp.up_proj.weight", n).options["t"]  # noqa: E731
    # five layers: one gradient point each
    assert [t(i, 5) for i in range(5)] == [0, 0.5, 0.3, 0.7, 1]
    # nine layers: halfway between the points at the odd layers
    assert [t(i, 9) for i in range(9)] == pytest.approx([0, 0.25, 0.5, 0.4, 0.3, 0.5, 0.7, 0.85, 1])
    # 32 layers, layer 8: position 8/31, x = 32/31, between 0.5 and 0.3
    assert t(8, 32) == pytest.approx(0.5 + (32 / 31 - 1) * (0.3 - 0.5))
    # one layer: mergekit puts it at position 1
    assert t(0, 1) == 1
    # no layer index: position 0, the first value
    assert c.tensor_params("lm_head.weight", 32).options["t"] == 0
    assert c.tensor_params("model.embed_tokens.weight", 32).options["t"] == 0
    # an index past the stack is clamped to the last point
    assert t(40, 32) == 1


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.floats(-10, 10, allow_nan=False), min_size=1, max_size=8),
    layers=st.integers(1, 80),
    data=st.data(),
)
def test_gradient_stays_between_neighbouring_points(values, layers, data):
    layer = data.draw(st.integers(0, layers - 1))
    c = MergeConfig.from_dict({"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": values}}]})
    w = c.tensor_params(f"model.layers.{layer}.mlp.weight", layers).per_model[0]["weight"]
    pos = layer_position(f"model.layers.{layer}.x", layers)
    x = pos * (len(values) - 1)
    lo, hi = values[int(x)], values[min(int(x) + 1, len(values) - 1)]
    assert min(lo, hi) - 1e-9 <= w <= max(lo, hi) + 1e-9
    if layer == layers - 1:
        assert w == pytest.approx(values[-1])
    if layer == 0 and layers > 1:
        assert w == values[0]


def test_layer_index():
    assert layer_index("model.layers.3.mlp.up_proj.weight") == 3
    assert layer_index("transformer.h.0.attn.c_attn.weight") == 0
    assert layer_index("encoder.layer.11.attention.self.query.weight") == 11
    assert layer_index("vision.blocks.4.attn.qkv.weight") == 4
    assert layer_index("decoder.block.2.layer.1.DenseReluDense.wi.weight") == 2  # the first one wins
    assert layer_index("model.layers.3.block_sparse_moe.experts.5.w1.weight") == 3
    assert layer_index("model.embed_tokens.weight") is None
    assert layer_index("lm_head.weight") is None
    assert layer_index("model.hidden.3.weight") is None  # 'hidden' is not 'h'
    assert layer_position("model.norm.weight", 32) == 0.0
    assert layer_position("model.layers.31.x", 32) == 1.0


def test_filter_list_with_default_and_fallback_to_global():
    d = ties(
        parameters={"density": [{"filter": "mlp", "value": 0.2}, {"value": 0.6}], "weight": 0.5},
        models=[
            {"model": "base"},
            {"model": "a", "parameters": {"density": [{"filter": "self_attn", "value": [0.1, 0.3]}]}},
            {"model": "b", "parameters": {"weight": {"filter": "lm_head", "value": 2}}},
        ],
    )
    c = MergeConfig.from_dict(d)
    p = c.tensor_params("model.layers.1.self_attn.k_proj.weight", 3)  # position 0.5
    assert p.per_model[0] == {"weight": 0.5, "density": pytest.approx(0.2)}
    assert p.per_model[1] == {"weight": 0.5, "density": 0.6}
    p = c.tensor_params("model.layers.1.mlp.up_proj.weight", 3)
    # no filter of model a matches: the top-level setting answers
    assert p.per_model[0]["density"] == 0.2 and p.per_model[1]["density"] == 0.2
    p = c.tensor_params("lm_head.weight", 3)
    assert p.per_model[1] == {"weight": 2.0, "density": 0.6}


def test_filter_without_any_match_falls_back_to_the_default():
    c = MergeConfig.from_dict(ties(parameters={"lambda": [{"filter": "mlp", "value": 0.5}]}))
    assert c.tensor_params("model.layers.0.mlp.w", 2).options["lambda"] == 0.5
    assert c.tensor_params("model.layers.0.attn.w", 2).options["lambda"] == 1.0


def test_required_t_without_matching_filter():
    c = MergeConfig.from_dict(
        {"merge_method": "slerp", "base_model": "a", "models": ["a", "b"], "parameters": {"t": [{"filter": "mlp", "value": 0.3}]}}
    )
    assert c.tensor_params("model.layers.0.mlp.w", 2).options["t"] == 0.3
    with pytest.raises(ConfigError, match=r"parameters\.t: no value for tensor 'model\.norm\.weight'"):
        c.tensor_params("model.norm.weight", 2)


def test_filter_entry_errors():
    err(ties(parameters={"density": [{"value": 0.5}, {"filter": "mlp", "value": 0.2}]}), "parameters.density[1]", "default entry last")
    err(ties(parameters={"density": [{"filtr": "mlp", "value": 0.2}]}), "parameters.density[0].filtr", "did you mean 'filter'")
    err(ties(parameters={"density": [{"filter": "mlp"}]}), "parameters.density[0]", "'value'")
    err(ties(parameters={"density": [{"filter": "mlp", "value": 2}]}), "parameters.density[0].value", "out of range [0, 1]")
    err(ties(parameters={"density": [0.5, {"value": 1}]}), "parameters.density[0]", "filter list")
    err(ties(parameters={"density": []}), "parameters.density", "at least one")


# --- errors ------------------------------------------------------------------------------


def test_unknown_top_level_key_with_suggestion():
    msg = err(ties(merge_methd="ties"), "merge_methd", "did you mean 'merge_method'", "merge_method, base_model")
    assert "unknown key" in msg
    err(ties(out_dtyp="bf16"), "did you mean 'out_dtype'")
    err(ties(slices=[]), "slices", "passthrough, not ties")
    err(ties(tokenizer={"source": "base"}), "tokenizer", "not supported")


def test_unknown_parameter():
    msg = err(ties(parameters={"densty": 0.5}), "parameters.densty", "did you mean 'density'")
    assert "weight, density, normalize, lambda, consensus, trim_ties, scope, merge, int8_mask" in msg
    err(
        ties(models=["base", {"model": "a", "parameters": {"wieght": 1}}]),
        "models[1].parameters.wieght",
        "did you mean 'weight'",
        "weight, density",
    )
    err({"merge_method": "linear", "models": ["a"], "parameters": {"int8_mask": True}}, "parameters.int8_mask", "normalize")
    err({"merge_method": "linear", "models": [{"model": "a", "parameters": {"density": 0.5}}]}, "models[0].parameters.density")
    err({"merge_method": "slerp", "base_model": "a", "models": ["a", "b"], "parameters": {"t": 0.5, "weight": 1}}, "parameters.weight", "t")
    err(ties(models=["base", {"model": "a", "parameters": {"normalize": True}}]), "models[1].parameters.normalize", "top-level parameters")
    err({"merge_method": "pcb", "base_model": "b", "models": [{"model": "a", "parameters": {"density": 0.3}}]},
        "models[0].parameters.density", "top-level parameters")
    err(ties(models=["base", {"model": "a", "layer_range": [0, 32]}]), "models[1].layer_range", "go under slices")
    err(ties(models=["base", {"model": "a", "parameter": {}}]), "models[1].parameter", "did you mean 'parameters'")


def test_unknown_method():
    err(ties(merge_method="tie"), "merge_method", "did you mean 'ties'", ", ".join(MERGE_METHODS))
    err(ties(merge_method="della"), "merge_method", "della", "linear, task_arithmetic, ties")
    err({"models": ["a"]}, "merge_method", "required")


@pytest.mark.parametrize(
    "key,value,allowed",
    [
        ("consensus", "majority", "sum, count"),
        ("trim_ties", "strict", "exact, inclusive"),
        ("scope", "global", "tensor, model"),
    ],
)
def test_invalid_enum_lists_allowed(key, value, allowed):
    err(ties(parameters={key: value}), f"parameters.{key}", repr(value), f"allowed values: {allowed}")


def test_invalid_enums_elsewhere():
    err({"merge_method": "dare_linear", "base_model": "b", "models": ["a"], "parameters": {"rescale": "l2"}},
        "parameters.rescale", "allowed values: true, false, inverse_density")
    err({"merge_method": "emr", "base_model": "b", "models": ["a"], "parameters": {"zero_sign": "pos"}}, "neg, zero")
    err({"merge_method": "emr", "base_model": "b", "models": ["a"], "parameters": {"rescale_scope": "x"}},
        "tensor_mean_sum, model")
    err(ties(dtype="int8"), "dtype", "float32", "bf16")
    err(ties(out_dtype="fp8"), "out_dtype", "allowed values")
    err(ties(backend="metal"), "backend", "auto, torch, cpu, cuda, triton")
    err(ties(device="gpu"), "device", "cpu, cuda, cuda:N")
    err(ties(parameters={"normalize": "yes"}), "parameters.normalize", "true or false")


def test_out_of_range_values():
    err(ties(models=["base", {"model": "a"}, {"model": "b", "parameters": {"density": 1.5}}]),
        "models[2].parameters.density", "1.5", "[0, 1]")
    err(ties(models=["base", {"model": "a", "parameters": {"density": [0.5, -0.1]}}]), "models[1].parameters.density[1]")
    err({"merge_method": "breadcrumbs", "base_model": "b", "models": ["a"], "parameters": {"gamma": 2}}, "parameters.gamma")
    err({"merge_method": "slerp", "base_model": "a", "models": ["a", "b"], "parameters": {"t": 1.2}}, "parameters.t", "[0, 1]")
    err({"merge_method": "pcb", "base_model": "b", "models": ["a"], "parameters": {"clip_ratio": 0.5}}, "parameters.clip_ratio", "[0, 0.5)")
    err(ties(parameters={"weight": "heavy"}), "parameters.weight", "expected a number")
    err(ties(parameters={"weight": True}), "parameters.weight", "expected a number")
    err(ties(parameters={"lambda": float("inf")}), "parameters.lambda", "finite")
    # weight and lambda take any real
    c = MergeConfig.from_dict(ties(parameters={"lambda": -2.5}, models=["base", {"model": "a", "parameters": {"weight": -3}}]))
    assert c.tensor_params("x", 1).per_model[0]["weight"] == -3.0
    assert c.tensor_params("x", 1).options["lambda"] == -2.5


def test_slerp_needs_exactly_two_models():
    base = {"merge_method": "slerp", "base_model": "a", "parameters": {"t": 0.5}}
    err({**base, "models": ["a", "b", "c"]}, "models", "exactly two", "got 2 other model(s): b, c")
    err({**base, "models": ["a"]}, "models", "exactly two", "got 0")
    err({**base, "base_model": None, "models": ["a", "b"]}, "base_model", "required for slerp")
    err({"merge_method": "slerp", "base_model": "a", "models": ["a", "b"]}, "parameters.t", "required")
    # the base need not be listed
    c = MergeConfig.from_dict({**base, "models": ["b"]})
    assert c.model_paths() == ["a", "b"]


def test_missing_base_and_models():
    err({"merge_method": "ties", "models": ["a", "b"]}, "base_model", "required for ties")
    err({"merge_method": "task_arithmetic", "base_model": "b", "models": ["b"]}, "models", "besides base_model")
    err({"merge_method": "linear", "models": []}, "models", "at least one")
    err({"merge_method": "linear"}, "models", "at least one")
    err(ties(models=["base", "a", "./a/"]), "models[2].model", "listed twice")
    err(ties(models=["base", {"parameters": {}}]), "models[1].model", "required")
    err(ties(models="a"), "models")


def test_linear_keeps_a_listed_base():
    c = MergeConfig.from_dict({"merge_method": "linear", "base_model": "a", "models": ["a", "b"]})
    assert [m.model for m in c.models] == ["a", "b"]
    assert c.model_paths() == ["a", "b"]


def test_pcb_and_ties_scope_rules():
    pcb = {"merge_method": "pcb", "base_model": "b", "models": ["x", "y"]}
    err({**pcb, "parameters": {"lambdas": [1.0]}}, "parameters.lambdas", "1 values for 2")
    err({**pcb, "parameters": {"lambdas": [1.0, 2.0], "lambda": 0.5}}, "parameters.lambdas", "not both")
    err({**pcb, "parameters": {"density": [0.1, 0.2]}}, "parameters.density", "scope: model")
    c = MergeConfig.from_dict({**pcb, "parameters": {"density": [0.1, 0.3], "scope": "tensor"}})
    assert c.scope == "tensor" and c.model_scope_passes == ()
    assert c.tensor_params("model.layers.1.w", 3).options["density"] == pytest.approx(0.2)

    c = MergeConfig.from_dict(ties(parameters={"scope": "model", "merge": "dis-sum"}))
    assert c.scope == "model" and c.model_scope_passes == ("trim_threshold",)
    assert c.tensor_params("w", 1).options["trim_ties"] == "inclusive"
    assert c.tensor_params("w", 1).options["merge"] == "dis-sum"
    err(ties(parameters={"merge": "dis-sum"}), "parameters.merge", "scope: model")
    err(ties(parameters={"scope": "model", "trim_ties": "exact"}), "parameters.trim_ties", "inclusive")
    err(ties(parameters={"scope": "model"}, models=["base", {"model": "a", "parameters": {"density": [0.1, 0.2]}}]),
        "models[1].parameters.density", "scope: model")
    err(ties(parameters={"scope": "model", "weight": 0.5}), "parameters.weight", "scope: tensor")


def test_tokenizer_source():
    assert MergeConfig.from_dict(ties(tokenizer_source="base")).tokenizer_source == "base"
    assert MergeConfig.from_dict(ties(tokenizer_source="a")).tokenizer_source == "a"
    err(ties(tokenizer_source="union"), "tokenizer_source", "union", "not supported")
    err(ties(tokenizer_source="c"), "tokenizer_source", "allowed values: base, or one of the models: base, a, b")
    err({"merge_method": "linear", "models": ["a"], "tokenizer_source": "base"}, "tokenizer_source", "base_model")


def test_runtime_key_errors():
    err(ties(seed=-1), "seed", ">= 0")
    err(ties(seed=1.5), "seed")
    err(ties(out_shard_size="5 parsecs"), "out_shard_size", "5GB")
    err(ties(out_shard_size=0), "out_shard_size", "at least 1 byte")
    err(ties(allow_nonfinite="no"), "allow_nonfinite", "true or false")
    assert MergeConfig.from_dict(ties(out_shard_size=123)).out_shard_size == 123


def test_dtype_aliases():
    for name, dt in [("float32", torch.float32), ("fp32", torch.float32), ("float", torch.float32),
                     ("float16", torch.float16), ("fp16", torch.float16), ("half", torch.float16),
                     ("bfloat16", torch.bfloat16), ("bf16", torch.bfloat16)]:
        assert MergeConfig.from_dict(ties(dtype=name)).out_dtype is dt
    c = MergeConfig.from_dict(ties(dtype="float32", out_dtype="bf16"))
    assert c.out_dtype is torch.bfloat16 and c.dtype is torch.float32
    assert MergeConfig.from_dict(ties()).out_dtype is None


# --- sizes -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,n",
    [
        ("5GB", 5 * 10**9),
        ("500MB", 500 * 10**6),
        ("1.5GiB", 1610612736),
        ("2 KiB", 2048),
        ("10kb", 10_000),
        ("3MiB", 3 * 2**20),
        ("1TB", 10**12),
        ("123", 123),
        ("64B", 64),
        (4096, 4096),
        ("1.5KB", 1500),
    ],
)
def test_parse_size(text, n):
    assert parse_size(text) == n


@pytest.mark.parametrize("bad", ["", "GB", "5 XB", "-1GB", "1e3", 0, -5, 1.5, True, None])
def test_parse_size_rejects(bad):
    with pytest.raises(ConfigError):
        parse_size(bad)


# --- loading -----------------------------------------------------------------------------


def test_load_from_yaml_file(tmp_path):
    f = tmp_path / "ties.yml"
    f.write_text(TIES_BASE_LISTED)
    c = load_config(f)
    assert c == cfg(TIES_BASE_LISTED)
    assert load_config(str(f)) == c
    assert load_config(yaml.safe_load(TIES_BASE_LISTED)) == c
    assert load_config(c) is c


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="no such configuration file"):
        load_config(str(tmp_path / "missing.yml"))
    with pytest.raises(ConfigError, match="no such configuration file"):
        load_config(TIES)  # YAML text is not a path
    bad = tmp_path / "bad.yml"
    bad.write_text("merge_method: ties\nmodels: [a\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)
    empty = tmp_path / "empty.yml"
    empty.write_text("")
    with pytest.raises(ConfigError, match="empty"):
        load_config(empty)
    dup = tmp_path / "dup.yml"
    dup.write_text("merge_method: ties\nmerge_method: linear\nmodels: [a]\n")
    with pytest.raises(ConfigError, match=r"merge_method: duplicate key \(lines 1 and 2\)"):
        load_config(dup)
    typo = tmp_path / "typo.yml"
    typo.write_text(TIES_BASE_LISTED.replace("density: 0.5\n      weight: 0.3", "density: 0.5\n      weigth: 0.3"))
    with pytest.raises(ConfigError) as info:
        load_config(typo)
    assert str(typo) in str(info.value) and "models[2].parameters.weigth" in str(info.value)
    lst = tmp_path / "list.yml"
    lst.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(lst)
    with pytest.raises(ConfigError):
        load_config(42)


def test_yaml_exponent_without_dot_is_a_float(tmp_path):
    f = tmp_path / "c.yml"
    f.write_text("merge_method: task_arithmetic\nbase_model: b\nmodels: [a]\nparameters:\n  lambda: 5e-1\n")
    assert load_config(f).tensor_params("w", 1).options["lambda"] == 0.5


def test_tensor_params_structure():
    c = cfg(TIES)
    p = c.tensor_params("model.layers.2.mlp.up_proj.weight", 41)
    assert isinstance(p.per_model, list) and len(p.per_model) == len(c.models)
    for d in p.per_model:
        assert set(d) == {"weight", "density"}
        assert all(isinstance(v, float) and math.isfinite(v) for v in d.values())
    assert set(p.options) == set(c.options_defaults)
