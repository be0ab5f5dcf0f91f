"""Loss barriers between independently trained models, before and after weight matching.

Digits MLP (scikit-learn's offline digits) and a tiny GPT-2 on a synthetic copy task.
Training is short and single-threaded: two threads on a shared two-core
machine only add contention for models this small.
"""

import contextlib
import time

import pytest
import torch
import torch.nn.functional as F

from pymerge.align import (
    alpha_grid,
    barriers,
    gpt2_spec,
    interpolation_curve,
    mean_stderr,
    mlp_spec,
    permute_state_dict,
    weight_matching,
)


@contextlib.contextmanager
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def test_barrier_formulas():
    alphas = alpha_grid(5)
    assert alphas == [0.0, 0.25, 0.5, 0.75, 1.0]
    losses = [1.0, 2.0, 3.0, 2.5, 2.0]
    b1, b2 = barriers(alphas, losses)
    assert b1 == pytest.approx(3.0 - 1.5)
    assert b2 == pytest.approx(max(2.0 - 1.25, 3.0 - 1.5, 2.5 - 1.75))
    assert barriers(alphas, [1.0, 0.5, 0.2, 0.5, 1.0]) == (pytest.approx(0.0), 0.0)  # convex path: no barrier
    assert mean_stderr([1.0, 2.0, 3.0]) == (pytest.approx(2.0), pytest.approx((1.0 / 3) ** 0.5))


# -- digits MLP ----------------------------------------------------------------------------

WIDTH = 64


def _digits():
    sklearn = pytest.importorskip("sklearn")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    assert sklearn
    x, y = load_digits(return_X_y=True)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.3, random_state=0, stratify=y)
    f = lambda a: torch.tensor(a / 16.0, dtype=torch.float32)  # noqa: E731
    return f(xtr), torch.tensor(ytr), f(xte), torch.tensor(yte)


def _train_mlp(models, seed, xtr, ytr, steps=600, batch=128):
    torch.manual_seed(seed)
    m = models.mlp([64, WIDTH, WIDTH, 10])
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    step = 0
    while step < steps:
        order = torch.randperm(len(xtr), generator=g)
        for i in range(0, len(xtr), batch):
            idx = order[i:i + batch]
            loss = F.cross_entropy(m(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step == steps:
                break
    return m


def test_digits_mlp_weight_matching_removes_the_barrier(models, record_property):
    xtr, ytr, xte, yte = _digits()
    with one_thread():
        _digits_experiment(models, record_property, xtr, ytr, xte, yte)


def _digits_experiment(models, record_property, xtr, ytr, xte, yte):
    t0 = time.perf_counter()
    a, b = (_train_mlp(models, s, xtr, ytr).state_dict() for s in (0, 1))
    train_s = time.perf_counter() - t0
    net = models.mlp([64, WIDTH, WIDTH, 10])

    def evaluate(sd):
        net.load_state_dict(sd)
        with torch.no_grad():
            out = net(xte)
        return F.cross_entropy(out, yte).item(), (out.argmax(1) == yte).float().mean().item()

    spec = mlp_spec(3)
    result = weight_matching(spec, a, b, seed=0)
    assert all(y >= x for x, y in zip(result.objective_history, result.objective_history[1:]))
    naive = interpolation_curve(a, b, evaluate, 25)
    matched = interpolation_curve(a, permute_state_dict(b, spec, result.perms), evaluate, 25)
    ends = min(naive.accuracies[0], naive.accuracies[-1])
    numbers = {
        "train_s": round(train_s, 2), "endpoint_acc": (naive.accuracies[0], naive.accuracies[-1]),
        "naive_b2": naive.b2, "matched_b2": matched.b2, "naive_b1": naive.b1, "matched_b1": matched.b1,
        "naive_mid_acc": naive.midpoint_accuracy, "matched_mid_acc": matched.midpoint_accuracy,
    }
    record_property("digits", numbers)
    print("digits width 64:", numbers)
    assert ends > 0.95
    # the function is unchanged by the permutation: the matched curve ends where the naive one does
    assert matched.losses[-1] == pytest.approx(naive.losses[-1], abs=1e-5)
    assert naive.b2 > 0.2
    assert matched.b2 < naive.b2 / 5
    assert matched.midpoint_accuracy > ends - 0.05
    assert matched.midpoint_accuracy > naive.midpoint_accuracy + 0.05


# -- tiny Transformers ---------------------------------------------------------------------

VOCAB, LENGTH = 16, 16


def _copy_task(n, seed):
    """Random first half, copied into the second half: the second half needs attention."""
    half = torch.randint(0, VOCAB, (n, LENGTH // 2), generator=torch.Generator().manual_seed(seed))
    return torch.cat([half, half], 1)


def _lm_loss(model, x):
    logits = model(input_ids=x).logits[:, LENGTH // 2 - 1:-1]
    target = x[:, LENGTH // 2:]
    return F.cross_entropy(logits.reshape(-1, VOCAB), target.reshape(-1)), (logits.argmax(-1) == target).float().mean()


def _gpt2(seed):
    import transformers

    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=LENGTH,
                                  bos_token_id=0, eos_token_id=0, attn_implementation="eager",
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(cfg)


def _train_gpt2(seed, data, steps=300):
    m = _gpt2(seed).train()
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        loss, _ = _lm_loss(m, data[torch.randint(0, len(data), (32,), generator=g)])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval()


@pytest.mark.slow
def test_tiny_transformer_weight_matching_lowers_the_barrier(record_property):
    pytest.importorskip("transformers")
    with one_thread():
        _transformer_experiment(record_property)


def _transformer_experiment(record_property):
    data, test = _copy_task(4096, 123), _copy_task(512, 7)
    t0 = time.perf_counter()
    a, b = (_train_gpt2(s, data).state_dict() for s in (0, 1))
    train_s = time.perf_counter() - t0
    net = _gpt2(0).eval()

    def evaluate(sd):
        net.load_state_dict(sd)
        with torch.no_grad():
            loss, acc = _lm_loss(net, test)
        return loss.item(), acc.item()

    spec = gpt2_spec(2, 64, 4)
    result = weight_matching(spec, a, b, seed=0)
    assert all(y >= x for x, y in zip(result.objective_history, result.objective_history[1:]))
    naive = interpolation_curve(a, b, evaluate, 11)
    matched = interpolation_curve(a, permute_state_dict(b, spec, result.perms), evaluate, 11)
    numbers = {
        "train_s": round(train_s, 2), "endpoint_acc": (naive.accuracies[0], naive.accuracies[-1]),
        "naive_b2": naive.b2, "matched_b2": matched.b2,
        "naive_mid_acc": naive.midpoint_accuracy, "matched_mid_acc": matched.midpoint_accuracy,
    }
    record_property("gpt2_copy", numbers)
    print("tiny GPT-2 copy task:", numbers)
    assert min(naive.accuracies[0], naive.accuracies[-1]) > 0.99
    assert matched.losses[-1] == pytest.approx(naive.losses[-1], abs=1e-4)
    # Transformers keep part of their barrier after permutation (the residual stream has no
    # privileged basis), but matching must clearly lower it.
    assert matched.b2 < 0.85 * naive.b2
    assert matched.midpoint_accuracy > naive.midpoint_accuracy + 0.1
