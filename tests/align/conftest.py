"""Tiny models for the alignment tests: Hugging Face Transformers from small configs, and an MLP."""

import logging

import pytest
import torch

logging.getLogger("transformers").setLevel(logging.ERROR)


def _transformers():
    return pytest.importorskip("transformers")


class MLP(torch.nn.Module):
    """Linear layers in ``layers`` (names layers.{i}.weight/bias, as mlp_spec expects), ReLU between."""

    def __init__(self, sizes):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x


def _rescale(model, seed):
    """Weights at a scale where a wrong permutation changes the logits far beyond the tolerance."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and ("norm" in name.lower() or "ln_" in name):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g) if name.endswith("weight") else
                        0.2 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p.shape[-1] if p.dim() > 1 else 1
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() == 1 else fan_in ** -0.5))
    return model.eval()


def tiny_llama(seed=0, *, hidden=32, heads=4, kv_heads=2, layers=2, intermediate=48, vocab=40, head_dim=None,
               rescale=True):
    transformers = _transformers()
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                                   num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                                   head_dim=head_dim or hidden // heads, max_position_embeddings=64,
                                   attn_implementation="eager", tie_word_embeddings=False)
    torch.manual_seed(seed)
    m = transformers.LlamaForCausalLM(cfg)
    return _rescale(m, seed) if rescale else m.eval()


def tiny_gpt2(seed=0, *, hidden=32, heads=4, layers=2, vocab=40, rescale=True):
    transformers = _transformers()
    cfg = transformers.GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=64,
                                  bos_token_id=0, eos_token_id=0, attn_implementation="eager")
    torch.manual_seed(seed)
    m = transformers.GPT2LMHeadModel(cfg)
    return _rescale(m, seed) if rescale else m.eval()


def tiny_bert(seed=0, *, hidden=32, heads=4, layers=2, intermediate=48, vocab=40, rescale=True):
    transformers = _transformers()
    cfg = transformers.BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                                  num_attention_heads=heads, intermediate_size=intermediate,
                                  max_position_embeddings=64, attn_implementation="eager")
    torch.manual_seed(seed)
    m = transformers.BertForMaskedLM(cfg)
    return _rescale(m, seed) if rescale else m.eval()


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def load(model, state_dict):
    """A copy of ``model`` holding ``state_dict``."""
    clone = type(model)(model.config).eval()
    clone.load_state_dict(state_dict)
    return clone


@pytest.fixture
def models():
    class M:
        llama = staticmethod(tiny_llama)
        gpt2 = staticmethod(tiny_gpt2)
        bert = staticmethod(tiny_bert)
        mlp = MLP
        logits = staticmethod(logits)
        load = staticmethod(load)

    return M
