"""Merge quality on offline data: a multi-task benchmark built from scikit-learn's digits.

The setup (everything seeded, CPU, well under two minutes on 2 cores):

1. Data: the 1797 8x8 digits, scaled to [0, 1], split once into train / validation / test.
2. Pre-training: an MLP body `layers.0` (64 -> 128, ReLU), `layers.1` (128 -> 16, ReLU) with a
   10-way head on the plain digits (light input noise as augmentation). Snapshots of the
   body at chosen steps are the bases (an early one is a weak base, the last a strong one).
3. Tasks, each a transformation of the images (and a class subset for one), each with its own
   head: rot90 (rotated 90 degrees), perm (a fixed pixel permutation), mirror (left-right),
   noise (heavy Gaussian noise) and 5-9 upside-down (digits 5-9 only, rotated 180 degrees, 5-way).
4. Per task: a linear probe on the frozen base's features (the fair lower bound), then the body
   is fine-tuned with that head frozen (the task-arithmetic papers' protocol: the heads never
   move, so a merged body can be read by every task's head).
5. Every body is written as a safetensors checkpoint; the heads are kept out of it (they differ
   per task). Mergekit-style config dicts go through `pymerge.merge`, and the merged checkpoint
   is read back and evaluated with each task's own head; for EMR each task reads its own
   reconstruction from the EMR folder (`pymerge.emr.load(out).state_dict(task)`).
6. λ is chosen on the validation split from a small sweep where the papers sweep it; the tables
   report the test split.

Two regimes at least: small task vectors (a strong base, a low fine-tuning learning rate: the
regime the papers report) and large ones (a weak base, a high learning rate).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "TASKS",
    "Regime",
    "MergeRecipe",
    "QualityConfig",
    "QualityResult",
    "RegimeResult",
    "Row",
    "default_config",
    "quick_config",
    "run_quality",
    "format_results",
    "format_overview",
    "format_seed_summary",
    "add_quality_arguments",
    "run_quality_cli",
    "main_quality",
]

IN_DIM = 64
BODY = ("layers.0", "layers.1")  # names of the merged tensors: layers.{0,1}.{weight,bias}


# ---------------------------------------------------------------------------------------
# Tasks
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    transform: Callable[[np.ndarray, np.random.Generator], np.ndarray]  # images [n, 8, 8] -> [n, 8, 8]
    classes: tuple[int, ...] = tuple(range(10))
    train_copies: int = 1  # random transforms: this many independent draws of the training images


def _rot90(x, rng):
    return np.rot90(x, 1, axes=(1, 2))


def _mirror(x, rng):
    return x[:, :, ::-1]


def _rot180(x, rng):
    return np.rot90(x, 2, axes=(1, 2))


_PERM = np.random.default_rng(12345).permutation(64)  # one fixed pixel permutation, whatever the run


def _perm(x, rng):
    return x.reshape(len(x), 64)[:, _PERM].reshape(-1, 8, 8)


def _noise(x, rng):
    return np.clip(x + rng.normal(0.0, 0.4, size=x.shape), 0.0, 1.0)


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("rot90", "rotated 90°", _rot90),
        Task("perm", "pixels permuted", _perm),
        Task("mirror", "mirrored left-right", _mirror),
        Task("noise", "Gaussian noise σ=0.4", _noise, train_copies=4),
        Task("5-9 rot180", "digits 5-9 only, upside down (5-way head)", _rot180, (5, 6, 7, 8, 9)),
    )
}


# ---------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Regime:
    name: str
    base_steps: int  # the pre-training snapshot used as base
    lr: float  # fine-tuning learning rate (Adam)
    steps: int  # fine-tuning steps
    description: str = ""


@dataclass(frozen=True)
class MergeRecipe:
    """One merge method with its hyper-parameters; `lambdas` is the sweep (None: no λ)."""

    label: str
    method: str
    per_model: dict[str, Any] = field(default_factory=dict)
    parameters: dict[str, Any] = field(default_factory=dict)
    lambdas: tuple[float, ...] | None = None
    settings: str = ""


# One grid for every method that has a λ, chosen on the validation split as the papers do (task
# arithmetic sweeps (0, 1]; TIES and PCB, whose merged vector is a mean over the agreeing tasks, sit near 1).
LAMBDAS = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.2, 1.5)


def default_recipes(ta_lambdas=LAMBDAS, norm_lambdas=LAMBDAS) -> list[MergeRecipe]:
    return [
        MergeRecipe("average", "linear", {"weight": 1.0}, {"normalize": True}, None, "mean of the fine-tunes"),
        MergeRecipe("task arithmetic", "task_arithmetic", {"weight": 1.0}, {}, tuple(ta_lambdas), "θ0 + λ Σ τ_i"),
        MergeRecipe("TIES", "ties", {"weight": 1.0, "density": 0.2},
                    {"scope": "model", "trim_ties": "inclusive", "merge": "dis-mean"}, tuple(norm_lambdas),
                    "top 20% per model, elect, disjoint mean"),
        MergeRecipe("DARE + TA", "dare_linear", {"weight": 1.0, "density": 0.1}, {"rescale": "inverse_density"},
                    tuple(ta_lambdas), "drop 90%, rescale 1/0.1"),
        MergeRecipe("DARE-TIES", "dare_ties", {"weight": 1.0, "density": 0.5}, {}, tuple(ta_lambdas),
                    "mergekit: keep 50%, L1 rescale, elect"),
        MergeRecipe("EMR", "emr", {}, {}, None, "per-task masks and rescalers"),
        MergeRecipe("PCB", "pcb", {}, {"density": 0.1, "clip_ratio": 0.01}, tuple(norm_lambdas),
                    "keep 10%, clip 1%"),
    ]


@dataclass
class QualityConfig:
    seed: int = 0
    tasks: tuple[str, ...] = tuple(TASKS)
    hidden: int = 128
    features: int = 16
    batch: int = 128
    pretrain_lr: float = 3e-3
    pretrain_noise: float = 0.1
    regimes: tuple[Regime, ...] = ()
    recipes: list[MergeRecipe] = field(default_factory=default_recipes)
    split: tuple[int, int] = (1000, 300)  # train, validation; the rest (497) is the test split
    probe_iters: int = 100
    probe_l2: float = 1e-4
    backend: str = "auto"
    threads: int = 1  # torch intra-op threads while training (tiny matmuls: more threads only add overhead)
    name: str = "full"


def default_config(**overrides) -> QualityConfig:
    """The full run: two regimes, five tasks, every method with its λ sweep."""
    regimes = (
        Regime("small task vectors", base_steps=1500, lr=3e-4, steps=600,
               description="strong base (1500 pre-training steps), fine-tuned with Adam lr 3e-4 for 600 steps"),
        Regime("large task vectors", base_steps=60, lr=3e-3, steps=600,
               description="weak base (60 pre-training steps), fine-tuned with Adam lr 3e-3 for 600 steps"),
    )
    cfg = QualityConfig(regimes=regimes)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def quick_config(**overrides) -> QualityConfig:
    """A reduced run for tests: three tasks, one regime, one λ per method."""
    regimes = (Regime("quick", base_steps=150, lr=2e-3, steps=60, description="150 pre-training steps; lr 2e-3, 60 steps"),)
    cfg = QualityConfig(tasks=("rot90", "perm", "mirror"), regimes=regimes,
                        recipes=default_recipes(ta_lambdas=(0.4,), norm_lambdas=(1.0,)), probe_iters=50, name="quick")
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


# ---------------------------------------------------------------------------------------
# Data and models
# ---------------------------------------------------------------------------------------


@dataclass
class _Split:
    x: torch.Tensor  # [n, 64] fp32
    y: torch.Tensor  # [n] int64, 0..classes-1


@dataclass
class _TaskData:
    task: Task
    train: _Split
    val: _Split
    test: _Split

    @property
    def n_classes(self) -> int:
        return len(self.task.classes)


def _load_digits(seed: int, split: tuple[int, int]):
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    images = (x / 16.0).astype(np.float32).reshape(-1, 8, 8)
    order = np.random.default_rng(seed).permutation(len(images))
    n_tr, n_va = split
    parts = {"train": order[:n_tr], "val": order[n_tr:n_tr + n_va], "test": order[n_tr + n_va:]}
    return images, y.astype(np.int64), parts


def _task_data(task: Task, images, labels, parts, seed: int) -> _TaskData:
    out = {}
    remap = {c: i for i, c in enumerate(task.classes)}
    for k, (name, idx) in enumerate(parts.items()):
        idx = idx[np.isin(labels[idx], task.classes)]
        rng = np.random.default_rng([seed, 7, k, sum(map(ord, task.name))])
        copies = task.train_copies if name == "train" else 1
        x = np.concatenate([task.transform(images[idx], rng).reshape(len(idx), IN_DIM) for _ in range(copies)])
        x = x.astype(np.float32)
        y = np.array([remap[int(c)] for c in labels[idx]] * copies, dtype=np.int64)
        out[name] = _Split(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y))
    return _TaskData(task, out["train"], out["val"], out["test"])


def _init_body(hidden: int, features: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    def linear(n_in, n_out):
        bound = n_in ** -0.5
        w = (torch.rand(n_out, n_in, generator=gen) * 2 - 1) * bound
        b = (torch.rand(n_out, generator=gen) * 2 - 1) * bound
        return w, b

    w0, b0 = linear(IN_DIM, hidden)
    w1, b1 = linear(hidden, features)
    return {"layers.0.weight": w0, "layers.0.bias": b0, "layers.1.weight": w1, "layers.1.bias": b1}


def features(body: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    h = torch.relu(F.linear(x, body["layers.0.weight"], body["layers.0.bias"]))
    return torch.relu(F.linear(h, body["layers.1.weight"], body["layers.1.bias"]))


def _logits(body, head, x):
    return F.linear(features(body, x), head["weight"], head["bias"])


def _accuracy(body, head, split: _Split) -> float:
    with torch.no_grad():
        return float((_logits(body, head, split.x).argmax(1) == split.y).float().mean())


def _batches(n: int, batch: int, steps: int, gen: torch.Generator):
    done = 0
    while True:
        perm = torch.randperm(n, generator=gen)
        for s in range(0, n - batch + 1 if n >= batch else 1, batch):
            yield perm[s:s + batch]
            done += 1
            if done >= steps:
                return


def _train(params: dict[str, torch.Tensor], loss_fn, n: int, *, lr: float, steps: int, batch: int, seed: int,
           snapshots: Sequence[int] = (), on_snapshot=None) -> None:
    for p in params.values():
        p.requires_grad_(True)
    opt = torch.optim.Adam(list(params.values()), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    wanted = set(snapshots)
    if 0 in wanted and on_snapshot:
        on_snapshot(0)
    for step, idx in enumerate(_batches(n, batch, steps, gen), start=1):
        loss = loss_fn(idx, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step in wanted and on_snapshot:
            on_snapshot(step)
    for p in params.values():
        p.requires_grad_(False)


def _pretrain(cfg: QualityConfig, images, labels, parts, snapshots: Sequence[int]) -> tuple[dict[int, dict], float]:
    gen = torch.Generator().manual_seed(cfg.seed)
    body = _init_body(cfg.hidden, cfg.features, gen)
    head = {"weight": torch.zeros(10, cfg.features), "bias": torch.zeros(10)}
    tr = parts["train"]
    x = torch.from_numpy(images[tr].reshape(len(tr), IN_DIM).copy())
    y = torch.from_numpy(labels[tr])
    params = {**body, **{f"head.{k}": v for k, v in head.items()}}
    taken: dict[int, dict] = {}

    def loss_fn(idx, g):
        xb = (x[idx] + cfg.pretrain_noise * torch.randn(len(idx), IN_DIM, generator=g)).clamp(0, 1)
        return F.cross_entropy(_logits(body, head, xb), y[idx])

    def snap(step):
        taken[step] = {k: v.detach().clone() for k, v in body.items()}

    _train(params, loss_fn, len(x), lr=cfg.pretrain_lr, steps=max(snapshots), batch=cfg.batch, seed=cfg.seed + 1,
           snapshots=snapshots, on_snapshot=snap)
    te = parts["test"]
    plain = _Split(torch.from_numpy(images[te].reshape(len(te), IN_DIM).copy()), torch.from_numpy(labels[te]))
    return taken, _accuracy(body, head, plain)


def _probe(cfg: QualityConfig, base: dict, data: _TaskData) -> dict[str, torch.Tensor]:
    """Multinomial logistic regression on the frozen base's features (L-BFGS, L2)."""
    with torch.no_grad():
        f = features(base, data.train.x)
    w = torch.zeros(data.n_classes, f.shape[1], requires_grad=True)
    b = torch.zeros(data.n_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=cfg.probe_iters, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(F.linear(f, w, b), data.train.y) + cfg.probe_l2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return {"weight": w.detach().clone(), "bias": b.detach().clone()}


def _finetune(cfg: QualityConfig, base: dict, head: dict, data: _TaskData, regime: Regime, seed: int) -> dict:
    body = {k: v.clone() for k, v in base.items()}

    def loss_fn(idx, g):
        return F.cross_entropy(_logits(body, head, data.train.x[idx]), data.train.y[idx])

    _train(body, loss_fn, len(data.train.x), lr=regime.lr, steps=regime.steps, batch=cfg.batch, seed=seed)
    return {k: v.detach() for k, v in body.items()}


# ---------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------


@dataclass
class Row:
    label: str
    settings: str
    test: list[float]  # per task
    val: list[float]
    seconds: float | None = None  # merge time (engine's MergeReport.seconds)
    kind: str = "merge"  # "reference" for fine-tunes / ensemble / probe
    sweep: dict[float, float] = field(default_factory=dict)  # λ -> validation average

    @property
    def avg(self) -> float:
        return float(np.mean(self.test))

    @property
    def val_avg(self) -> float:
        return float(np.mean(self.val))


@dataclass
class RegimeResult:
    regime: Regime
    tasks: list[str]
    base_accuracy: float  # a linear probe of the base on the plain digits (test): how strong the base is
    relative_norms: list[float]
    cosine: np.ndarray
    sign_conflict: float
    rows: list[Row]
    seconds: float
    n_test: list[int] = field(default_factory=list)  # test examples per task

    def row(self, label: str) -> Row:
        for r in self.rows:
            if r.label == label:
                return r
        raise KeyError(label)

    @property
    def finetuned(self) -> Row:
        return self.row("fine-tuned (each task)")

    def normalized(self, row: Row) -> float:
        """Mean over tasks of accuracy / the task's fine-tuned accuracy (the papers' normalized accuracy)."""
        ft = self.finetuned.test
        return float(np.mean([a / f if f > 0 else 0.0 for a, f in zip(row.test, ft)]))

    def merges(self) -> list[Row]:
        return [r for r in self.rows if r.kind == "merge"]

    def stderr(self, row: Row) -> float:
        """Binomial standard error of a row's average test accuracy (tasks independent)."""
        var = sum(a * (1 - a) / n for a, n in zip(row.test, self.n_test))
        return float(np.sqrt(var)) / len(self.n_test)

    def findings(self) -> list[tuple[str, bool, str]]:
        """(claim, reproduced?, the numbers) for the papers' qualitative findings."""
        m = {r.label: r for r in self.merges()}
        ft = self.finetuned.avg
        out = []
        if "EMR" in m:
            others = [r for r in self.merges() if r.label != "EMR"]
            best_other = max(others, key=lambda r: r.avg) if others else None
            gap = ft - m["EMR"].avg
            ok = best_other is None or m["EMR"].avg > best_other.avg
            text = f"EMR {_p(m['EMR'].avg)} vs fine-tuned {_p(ft)} (gap {gap * 100:.1f} points)"
            if best_other is not None:
                text += f"; best other merge: {best_other.label} {_p(best_other.avg)}"
            out.append(("EMR is the merge closest to the individual models", ok, text))
        for name in ("TIES", "PCB"):
            if name in m and "task arithmetic" in m and "average" in m:
                r, ta, av = m[name], m["task arithmetic"], m["average"]
                ok = r.avg > ta.avg and r.avg > av.avg
                out.append((f"{name} above task arithmetic and averaging", ok,
                            f"{name} {_p(r.avg)}, task arithmetic {_p(ta.avg)}, average {_p(av.avg)}"))
        return out

    def probe_comparison(self) -> str | None:
        """Which merges beat the linear probe on the frozen base (the fair lower bound)."""
        try:
            probe = self.row("linear probe (frozen base)").avg
        except KeyError:
            return None
        above = [f"{r.label} (+{(r.avg - probe) * 100:.1f})" for r in self.merges() if r.avg > probe]
        below = [f"{r.label} ({(r.avg - probe) * 100:+.1f})" for r in self.merges() if r.avg <= probe]
        return (f"linear probe {_p(probe)}: above it: {', '.join(above) or 'none'}; "
                f"at or below it: {', '.join(below) or 'none'}")


@dataclass
class QualityResult:
    config: QualityConfig
    regimes: list[RegimeResult]
    pretrain_seconds: float
    seconds: float
    torch_version: str = torch.__version__

    def format(self) -> str:
        return format_results(self)

    __str__ = format


def _p(x: float) -> str:
    return f"{100 * x:.1f}"


# ---------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------


def _save(folder: Path, tensors: dict, config: dict) -> Path:
    from pymerge.synthetic import save_checkpoint

    return save_checkpoint(folder, {k: v.contiguous() for k, v in tensors.items()}, config)


def _read(folder: Path, names: Sequence[str]) -> dict[str, torch.Tensor]:
    from pymerge.io import CheckpointReader

    with CheckpointReader(folder) as r:
        return {n: r.get(n).float() for n in names}


def _merge_config(recipe: MergeRecipe, base: Path, models: Sequence[Path], lam: float | None, cfg: QualityConfig) -> dict:
    params = dict(recipe.parameters)
    if lam is not None:
        params["lambda"] = lam
    return {
        "merge_method": recipe.method,
        "base_model": str(base),
        "models": [{"model": str(m), "parameters": dict(recipe.per_model)} for m in models],
        "parameters": params,
        "dtype": "float32",
        "seed": cfg.seed,
        "backend": cfg.backend,
    }


def _run_regime(cfg: QualityConfig, regime: Regime, base: dict, base_accuracy: float, datas: list[_TaskData],
                root: Path, log: Callable[[str], None]) -> RegimeResult:
    from pymerge import emr as emr_mod
    from pymerge import merge
    from pymerge.analysis.inspect_models import inspect_models

    t0 = time.perf_counter()
    names = list(base)
    arch = {"model_type": "pymerge-quality-mlp", "layers": [IN_DIM, cfg.hidden, cfg.features]}
    base_dir = _save(root / "base", base, arch)
    heads, bodies, dirs = [], [], []
    probe_test, probe_val, ft_test, ft_val = [], [], [], []
    for k, data in enumerate(datas):
        head = _probe(cfg, base, data)
        probe_test.append(_accuracy(base, head, data.test))
        probe_val.append(_accuracy(base, head, data.val))
        body = _finetune(cfg, base, head, data, regime, seed=cfg.seed + 100 + k)
        ft_test.append(_accuracy(body, head, data.test))
        ft_val.append(_accuracy(body, head, data.val))
        heads.append(head)
        bodies.append(body)
        dirs.append(_save(root / f"task{k}", body, arch))
    log(f"[{regime.name}] fine-tuned {len(datas)} tasks in {time.perf_counter() - t0:.1f} s")

    stats = inspect_models(dirs, base_dir, densities=(0.2,), emr=False, group="model")
    rows = [Row("fine-tuned (each task)", f"{len(datas)} models", ft_test, ft_val, kind="reference")]
    # output ensemble: task t averages the probabilities of its head on every fine-tuned body
    ens_test, ens_val = [], []
    with torch.no_grad():
        for t, data in enumerate(datas):
            for split, acc in ((data.test, ens_test), (data.val, ens_val)):
                prob = sum(F.softmax(_logits(b, heads[t], split.x), dim=1) for b in bodies) / len(bodies)
                acc.append(float((prob.argmax(1) == split.y).float().mean()))
    rows.append(Row("output ensemble", f"{len(datas)} forward passes", ens_test, ens_val, kind="reference"))
    rows.append(Row("linear probe (frozen base)", "lower bound", probe_test, probe_val, kind="reference"))

    for recipe in cfg.recipes:
        candidates = []
        for lam in recipe.lambdas or (None,):
            out = root / "merged" / f"{recipe.method}-{lam}"
            report = merge(_merge_config(recipe, base_dir, dirs, lam, cfg), out, overwrite=True, quiet=True)
            if recipe.method == "emr":
                with emr_mod.load(out) as e:
                    merged = [{n: v.float() for n, v in e.state_dict(t).items()} for t in range(len(datas))]
            else:
                one = _read(out, names)
                merged = [one] * len(datas)
            test = [_accuracy(merged[t], heads[t], d.test) for t, d in enumerate(datas)]
            val = [_accuracy(merged[t], heads[t], d.val) for t, d in enumerate(datas)]
            candidates.append((lam, test, val, report.seconds))
            shutil.rmtree(out, ignore_errors=True)
        # the best λ on validation; ties keep the earlier (smaller) one
        best = max(range(len(candidates)), key=lambda i: (float(np.mean(candidates[i][2])), -i))
        lam, test, val, secs = candidates[best]
        settings = recipe.settings + (f", λ={lam:g}" if lam is not None else "")
        sweep = {c[0]: float(np.mean(c[2])) for c in candidates} if lam is not None else {}
        rows.append(Row(recipe.label, settings, test, val, secs, "merge", sweep))
        log(f"[{regime.name}] {recipe.label}: {_p(float(np.mean(test)))}")
    o = stats.overall
    return RegimeResult(regime, [d.task.name for d in datas], base_accuracy, o.relative_norms.tolist(), o.cosine,
                        o.conflict_fraction, rows, time.perf_counter() - t0, [len(d.test.y) for d in datas])


def run_quality(config: QualityConfig | None = None, *, workdir: str | Path | None = None,
                log: Callable[[str], None] | None = None) -> QualityResult:
    """Build the setup, fine-tune, merge with every recipe through the engine, evaluate. Returns the result."""
    cfg = config or default_config()
    log = log or (lambda s: None)
    start = time.perf_counter()
    old_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, cfg.threads))
    try:
        with tempfile.TemporaryDirectory(prefix="pymerge-quality-") as tmp:
            root = Path(workdir) if workdir is not None else Path(tmp)
            images, labels, parts = _load_digits(cfg.seed, cfg.split)
            datas = [_task_data(TASKS[t], images, labels, parts, cfg.seed) for t in cfg.tasks]
            steps = sorted({r.base_steps for r in cfg.regimes})
            snaps, base_acc = _pretrain(cfg, images, labels, parts, steps)
            pretrain_seconds = time.perf_counter() - start
            log(f"pre-trained in {pretrain_seconds:.1f} s (plain digits test accuracy {_p(base_acc)})")
            results = []
            for i, regime in enumerate(cfg.regimes):
                base = snaps[regime.base_steps]
                plain = _plain_accuracy(cfg, base, images, labels, parts)
                results.append(_run_regime(cfg, regime, base, plain, datas, root / f"regime{i}", log))
    finally:
        torch.set_num_threads(old_threads)
    return QualityResult(cfg, results, pretrain_seconds, time.perf_counter() - start)


def _plain_accuracy(cfg, base, images, labels, parts) -> float:
    """Linear probe accuracy of a base on the plain digits it was pre-trained on (how strong the base is)."""
    plain = Task("plain", "plain digits", lambda x, rng: x)
    data = _task_data(plain, images, labels, parts, cfg.seed)
    return _accuracy(base, _probe(cfg, base, data), data.test)


# ---------------------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------------------


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: Sequence[str] | None = None) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    align = align or ["l"] * len(header)

    def cell(v, i):
        v = str(v)
        return v.rjust(widths[i]) if align[i] == "r" else v.ljust(widths[i])

    def sep(i):
        return "-" * (widths[i] - 1) + ":" if align[i] == "r" else "-" * widths[i]

    lines = ["| " + " | ".join(cell(h, i) for i, h in enumerate(header)) + " |",
             "| " + " | ".join(sep(i) for i in range(len(header))) + " |"]
    lines += ["| " + " | ".join(cell(v, i) for i, v in enumerate(r)) + " |" for r in rows]
    return lines


def format_regime(res: RegimeResult) -> str:
    tasks = res.tasks
    lines = [f"### Regime: {res.regime.name}", "",
             f"{res.regime.description}; base: linear probe on plain digits {_p(res.base_accuracy)}%.", ""]
    header = ["method", "settings"] + tasks + ["avg", "normalized", "merge s"]
    rows = []
    for r in res.rows:
        secs = f"{r.seconds:.2f}" if r.seconds is not None else "—"
        rows.append([r.label, r.settings] + [_p(a) for a in r.test] + [_p(r.avg), _p(res.normalized(r)), secs])
    lines += _md_table(header, rows, ["l", "l"] + ["r"] * (len(tasks) + 3))
    lines.append("")
    se = max(res.stderr(r) for r in res.rows)
    lines.append("Test accuracy (%), per task and averaged; normalized = mean of accuracy / the task's fine-tuned "
                 "accuracy; λ chosen on the validation split; merge s = the engine's wall time for that merge. "
                 f"Test examples per task: {', '.join(map(str, res.n_test))}; the binomial standard error of an "
                 f"average is at most {100 * se:.1f} points.")
    lines.append("")
    lines.append("Task vectors: ‖τ‖/‖θ0‖ = " + ", ".join(f"{t} {v:.3f}" for t, v in zip(tasks, res.relative_norms))
                 + f"; parameters with a sign conflict between tasks: {100 * res.sign_conflict:.1f}%.")
    lines.append("")
    lines.append("Pairwise cosine of the task vectors:")
    lines.append("")
    n = len(tasks)
    lines += _md_table([""] + tasks, [[tasks[i]] + [f"{res.cosine[i, j]:+.3f}" for j in range(n)] for i in range(n)],
                       ["l"] + ["r"] * n)
    sweeps = [r for r in res.merges() if r.sweep and len(r.sweep) > 1]
    if sweeps:
        lines.append("")
        lines.append("Validation average (%) over the λ sweep:")
        lines.append("")
        for r in sweeps:
            lines.append(f"- {r.label}: " + ", ".join(f"λ={lam:g}: {_p(v)}" for lam, v in r.sweep.items()))
    lines.append("")
    lines.append("Findings (the papers' qualitative claims, checked on these numbers):")
    lines.append("")
    for claim, ok, text in res.findings():
        lines.append(f"- {'reproduced' if ok else 'NOT reproduced'}: {claim} — {text}")
    probe = res.probe_comparison()
    if probe:
        lines.append("")
        lines.append(f"Against the fair lower bound: {probe}.")
    return "\n".join(lines)


def format_overview(result: QualityResult) -> str:
    """One compact table: average test accuracy (and normalized accuracy) per method and regime."""
    regimes = result.regimes
    if not regimes:
        return ""
    header = ["method"]
    for r in regimes:
        header += [f"{r.regime.name}: avg", "normalized"]
    header.append("merge s")
    rows = []
    for k, row in enumerate(regimes[0].rows):
        cells = [row.label]
        for res in regimes:
            other = res.rows[k]
            cells += [_p(other.avg), _p(res.normalized(other))]
        times = [res.rows[k].seconds for res in regimes if res.rows[k].seconds is not None]
        cells.append(f"{max(times):.2f}" if times else "—")
        rows.append(cells)
    lines = _md_table(header, rows, ["l"] + ["r"] * (len(header) - 1))
    lines.append("")
    lines.append("Average test accuracy over the tasks (%); normalized = accuracy relative to each task's own fine-tune; "
                 "‖τ‖/‖θ0‖ (mean over tasks): "
                 + ", ".join(f"{r.regime.name} {float(np.mean(r.relative_norms)):.3f}" for r in regimes)
                 + "; merge s = the slower of the regimes' merge times.")
    return "\n".join(lines)


def format_results(result: QualityResult) -> str:
    cfg = result.config
    tasks = ", ".join(f"{t} ({TASKS[t].description})" for t in cfg.tasks)
    head = [
        f"## Merge quality on digits ({cfg.name} configuration)",
        "",
        f"MLP body 64-{cfg.hidden}-{cfg.features} pre-trained on scikit-learn's digits, fine-tuned per task with the "
        f"task's head frozen at its linear probe. Tasks: {tasks}. Seed {cfg.seed}; torch {result.torch_version}; "
        f"merges through `pymerge.merge` on safetensors checkpoints (fp32, backend {cfg.backend}); "
        f"total {result.seconds:.1f} s (pre-training {result.pretrain_seconds:.1f} s).",
        "",
    ]
    overview = ["### Overview", "", format_overview(result), ""] if len(result.regimes) > 1 else []
    return "\n".join(head + overview + ["\n\n".join(format_regime(r) for r in result.regimes)])


# ---------------------------------------------------------------------------------------
# Command line (wired into `pymerge quality` by pymerge.cli)
# ---------------------------------------------------------------------------------------


def format_seed_summary(results: Sequence[QualityResult]) -> str:
    """Average test accuracy per method and regime over several seeds, and how often each finding held."""
    if not results:
        return ""
    seeds = [r.config.seed for r in results]
    lines = [f"## Over seeds {', '.join(map(str, seeds))}", ""]
    for k, first in enumerate(results[0].regimes):
        per_seed = [r.regimes[k] for r in results]
        labels = [row.label for row in first.rows]
        header = ["method"] + [f"seed {s}" for s in seeds] + ["mean", "sd"]
        rows = []
        for label in labels:
            vals = [res.row(label).avg for res in per_seed]
            rows.append([label] + [_p(v) for v in vals] + [_p(float(np.mean(vals))),
                                                          f"{100 * float(np.std(vals, ddof=1)) if len(vals) > 1 else 0:.1f}"])
        lines.append(f"### Regime: {first.regime.name} (average test accuracy, %)")
        lines.append("")
        lines += _md_table(header, rows, ["l"] + ["r"] * (len(seeds) + 2))
        lines.append("")
        norms = ", ".join(f"{float(np.mean(res.relative_norms)):.3f}" for res in per_seed)
        lines.append(f"Mean ‖τ‖/‖θ0‖ per seed: {norms}.")
        lines.append("")
        claims = [c for c, _, _ in per_seed[0].findings()]
        for i, claim in enumerate(claims):
            held = [s for s, res in zip(seeds, per_seed) if res.findings()[i][1]]
            lines.append(f"- {claim}: reproduced with {len(held)} of {len(seeds)} seeds"
                         + (f" ({', '.join(map(str, held))})" if held and len(held) < len(seeds) else ""))
        lines.append("")
    return "\n".join(lines).rstrip()


def add_quality_arguments(p) -> None:
    """Add `pymerge quality`'s arguments to an argparse parser."""
    p.add_argument("--quick", action="store_true", help="the reduced configuration (3 tasks, 1 regime, no λ sweep)")
    p.add_argument("--seed", type=int, nargs="+", default=[0],
                   help="seed(s) of the data split, training and DARE (default 0); several seeds add a summary")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "cpu", "cuda", "triton"],
                   help="kernel backend of the merges")
    p.add_argument("--workdir", help="keep the checkpoints here instead of a temporary folder")
    p.add_argument("--out", metavar="MD", help="also write the tables (Markdown) to this file")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress lines")


def run_quality_cli(args) -> int:
    """Run `pymerge quality` from parsed arguments; prints the tables. Returns the exit status."""
    import sys

    make = quick_config if args.quick else default_config
    seeds = args.seed if isinstance(args.seed, (list, tuple)) else [args.seed]
    log = None if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    results = []
    for seed in seeds:
        workdir = None if args.workdir is None else (Path(args.workdir) if len(seeds) == 1 else Path(args.workdir) / f"seed{seed}")
        results.append(run_quality(make(seed=seed, backend=args.backend), workdir=workdir, log=log))
    parts = [r.format() for r in results]
    if len(results) > 1:
        parts.append(format_seed_summary(results))
    text = "\n\n".join(parts)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


def main_quality(argv: Sequence[str] | None = None) -> int:
    """`pymerge quality [--quick] [--seed N [N ...]] [--out FILE]` as a standalone entry point."""
    import argparse

    p = argparse.ArgumentParser(prog="pymerge quality", description="merge quality on a multi-task digits benchmark")
    add_quality_arguments(p)
    return run_quality_cli(p.parse_args(argv))
