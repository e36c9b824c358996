"""Benchmark of the few-shot meta-learners: sinusoid regression, digits, and ``higher``.

One table, one run, three kinds of rows:

1. **Sinusoid regression** (Finn et al. 2017): tasks ``A sin(x - phase)``
   with ``A ~ U[0.1, 5]``, ``phase ~ U[0, pi]``, ``x ~ U[-5, 5]``; backbone
   the 2x40 ReLU MLP. For K = 5 and 10 shots every method is meta-trained
   (``MetaLearnerRegressor.fit(X, y, groups=task_ids)`` on a pool of
   pre-drawn tasks, K support + K query points per episode) under the same
   wall-clock budget, then adapted on K points of each of ``n_eval`` new
   tasks; ``value`` is the MSE on 100 evenly spaced points of [-5, 5],
   averaged over the tasks. ``published`` quotes public reproductions
   (MAML 0.72 / 0.67, Meta-SGD 0.46 / 0.31, FOMAML 0.81 and Reptile 1.3 at
   5 shots), which trained for far longer.
2. **Time per meta-iteration**: the same MAML (meta-batch 25, K = 10, the
   same MLP, one and five inner SGD steps, float32) as skbilevel's
   vectorized core (``torch.func.vmap`` over the tasks, what the estimator
   runs) and as ``higher``'s loop (``higher.innerloop_ctx`` per task, the
   usual way to write MAML in PyTorch), on the same pre-drawn batches:
   meta-gradient + Adam step, median over the iterations. ``ratio`` =
   higher time / skbilevel time (> 1: skbilevel faster). ``max_rel_diff`` is
   the agreement of the two meta-gradients on one batch in float64.
3. **Digits few-shot**: ``load_digits`` scaled to [0, 1]; meta-train on
   classes 0-5, meta-test on 6-9, 4-way 1- and 5-shot, accuracy on 15 query
   images per class averaged over ``n_eval`` episodes (the same episodes for
   every row), against training from scratch on the support set (logistic
   regression and the same MLP, scikit-learn) and nearest centroid. The
   backbone is the 2x40 MLP, plus one MAML row with a linear backbone
   (a meta-learned logistic-regression initialization). With only six
   meta-training classes, meta-training for long overfits them, so every
   method runs a fixed, small number of meta-iterations.

Targets (printed as met / NOT met): 10-shot sinusoid MSE <= 0.2 within 2
minutes of CPU (best method; the fit time is in the table); a meta-iteration
>= 3x faster than the ``higher`` loop.

Timings come from a shared machine (2 cores, several jobs): treat them as
rough. Usage: ``python benchmarks/bench_meta.py [--quick] [--json PATH]``.
"""

import os
import sys
import time
import warnings

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _common import parse_args, print_table, write_json  # noqa: E402

from skbilevel.hypergrad import FunctionalModel, get_meta_method  # noqa: E402
from skbilevel.meta import MetaLearnerClassifier, MetaLearnerRegressor  # noqa: E402

METHODS = ["maml", "fomaml", "reptile", "anil", "metasgd", "imaml", "r2d2"]

#: per-method settings for the sinusoid (inner steps, inner step size)
SINUSOID_CONFIG = {
    "maml": dict(inner_steps=5, inner_lr=0.01),
    "fomaml": dict(inner_steps=5, inner_lr=0.01),
    "reptile": dict(inner_steps=5, inner_lr=0.05),
    "anil": dict(inner_steps=5, inner_lr=0.1),
    "metasgd": dict(inner_steps=1, inner_lr=0.02),
    # iMAML's formula needs the proximal problem nearly solved and I + H/lam
    # positive definite: many small steps and a fairly large lam.
    "imaml": dict(inner_steps=40, inner_lr=0.005, method_params={"lam": 5.0, "cg_maxiter": 5}),
    "r2d2": dict(),
}
PUBLISHED = {("maml", 5): 0.72, ("maml", 10): 0.67, ("metasgd", 5): 0.46,
             ("metasgd", 10): 0.31, ("fomaml", 5): 0.81, ("reptile", 5): 1.3}

#: per-method settings for digits
DIGITS_CONFIG = {
    "maml": dict(inner_steps=5, inner_lr=0.5),
    "fomaml": dict(inner_steps=5, inner_lr=0.5),
    "reptile": dict(inner_steps=5, inner_lr=0.5),
    "anil": dict(inner_steps=5, inner_lr=0.5),
    "metasgd": dict(inner_steps=5, inner_lr=0.5),
    # lam sets how far a task moves from phi (about grad / lam): the sinusoid's
    # lam=5 leaves a cross-entropy near phi (0.32 / 0.27 accuracy, chance 0.25);
    # lam=0.5 with 40 steps solves the proximal problem to (1 - 0.05)^40 = 13%.
    "imaml": dict(inner_steps=40, inner_lr=0.1, method_params={"lam": 0.5, "cg_maxiter": 5}),
    "r2d2": dict(),
}


class TimeBudget:
    """Callback stopping meta-training after ``seconds`` of wall-clock time."""

    def __init__(self, seconds):
        self.seconds = seconds
        self.start = time.perf_counter()

    def __call__(self, state):
        return time.perf_counter() - self.start > self.seconds


def sinusoid_pool(n_tasks, n_per_task, rng):
    amp, phase = rng.uniform(0.1, 5, n_tasks), rng.uniform(0, np.pi, n_tasks)
    X = rng.uniform(-5, 5, (n_tasks, n_per_task, 1))
    y = amp[:, None] * np.sin(X[..., 0] - phase[:, None])
    return X.reshape(-1, 1), y.ravel(), np.repeat(np.arange(n_tasks), n_per_task)


def sinusoid_eval_tasks(n_eval, k, seed):
    rng = np.random.RandomState(seed)
    xq = np.linspace(-5, 5, 100)[:, None]
    out = []
    for _ in range(n_eval):
        a, p = rng.uniform(0.1, 5), rng.uniform(0, np.pi)
        xs = rng.uniform(-5, 5, (k, 1))
        out.append((xs, a * np.sin(xs[:, 0] - p), xq, a * np.sin(xq[:, 0] - p)))
    return out


def bench_sinusoid(args, rows):
    budget = 4.0 if args.quick else 60.0
    n_eval = 20 if args.quick else 200
    pool = sinusoid_pool(400 if args.quick else 5000, 20, np.random.RandomState(0))
    shots = (10,) if args.quick else (5, 10)
    methods = ["maml", "r2d2"] if args.quick else METHODS
    best = {}
    for k in shots:
        tasks = sinusoid_eval_tasks(n_eval, k, seed=100 + k)
        for method in methods:
            meta = MetaLearnerRegressor(
                method=method, k_shot=k, n_query=k, meta_batch_size=25, max_iter=100000,
                learning_rate=3e-3, callbacks=[TimeBudget(budget)], random_state=0,
                **SINUSOID_CONFIG[method])
            start = time.perf_counter()
            meta.fit(*pool[:2], groups=pool[2])
            fit_s = time.perf_counter() - start
            mse = float(np.mean([np.mean((meta.adapt(xs, ys).predict(xq) - yq) ** 2)
                                 for xs, ys, xq, yq in tasks]))
            rows.append(dict(benchmark="sinusoid", method=method, setting=f"{k}-shot",
                             metric="MSE", value=mse, published=PUBLISHED.get((method, k), ""),
                             peer="", ratio="", fit_s=fit_s, n_iter=meta.n_iter_))
            print(f"  sinusoid {k}-shot {method}: MSE {mse:.3f} ({meta.n_iter_} it, "
                  f"{fit_s:.0f} s)", flush=True)
            if k == 10:
                best[method] = (mse, fit_s)
    return best


# -- time per meta-iteration: vmap core vs higher loop --------------------------


def _mlp(dtype):
    return torch.nn.Sequential(
        torch.nn.Linear(1, 40), torch.nn.ReLU(), torch.nn.Linear(40, 40), torch.nn.ReLU(),
        torch.nn.Linear(40, 1)).to(dtype)


def _batches(n, B, K, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        amp = torch.rand(B, 1, 1, generator=g, dtype=dtype) * 4.9 + 0.1
        ph = torch.rand(B, 1, 1, generator=g, dtype=dtype) * np.pi
        xs = torch.rand(B, K, 1, generator=g, dtype=dtype) * 10 - 5
        xq = torch.rand(B, K, 1, generator=g, dtype=dtype) * 10 - 5
        out.append((xs, amp * torch.sin(xs - ph), xq, amp * torch.sin(xq - ph)))
    return out


def _ours_step(model, method, meta, opt, batch):
    opt.zero_grad(set_to_none=True)
    loss, _ = method.meta_loss(model, meta, batch)
    loss.backward()
    opt.step()


def _higher_step(net, inner_opt, opt, batch, steps, higher):
    xs, ys, xq, yq = batch
    opt.zero_grad(set_to_none=True)
    B = xs.shape[0]
    for i in range(B):
        with higher.innerloop_ctx(net, inner_opt, copy_initial_weights=False) as (fnet, diffopt):
            for _ in range(steps):
                diffopt.step(((fnet(xs[i]) - ys[i]) ** 2).mean())
            (((fnet(xq[i]) - yq[i]) ** 2).mean() / B).backward()
    opt.step()


def bench_iteration_time(args, rows):
    try:
        import higher
    except Exception as exc:  # report why, keep the rest of the benchmark
        print(f"  higher unavailable: {exc!r}")
        rows.append(dict(benchmark="meta-iteration", method="maml", setting="higher",
                         metric="ms/it", value=float("nan"), peer=f"unavailable: {exc}"))
        return {}
    n_it = 5 if args.quick else 30
    results = {}
    for steps in (1, 5):
        timings = {}
        for name in ("skbilevel", "higher"):
            torch.manual_seed(0)
            net = _mlp(torch.float32)
            batches = _batches(n_it + 2, 25, 10, torch.float32, seed=steps)
            if name == "skbilevel":
                model = FunctionalModel(net, "mse")
                method = get_meta_method("maml", inner_steps=steps, inner_lr=0.01)
                meta = method.init_meta(model)
                for leaf in meta["params"].values():
                    leaf.requires_grad_(True)
                opt = torch.optim.Adam(list(meta["params"].values()), lr=1e-3)
                step = lambda b: _ours_step(model, method, meta, opt, b)  # noqa: E731
            else:
                inner_opt = torch.optim.SGD(net.parameters(), lr=0.01)
                opt = torch.optim.Adam(net.parameters(), lr=1e-3)
                step = lambda b: _higher_step(net, inner_opt, opt, b, steps, higher)  # noqa: E731
            times = []
            for i, b in enumerate(batches):
                start = time.perf_counter()
                step(b)
                if i >= 2:  # warm-up
                    times.append(time.perf_counter() - start)
            timings[name] = 1000 * float(np.median(times))
        diff = _gradient_agreement(steps, higher)
        ratio = timings["higher"] / timings["skbilevel"]
        rows.append(dict(benchmark="meta-iteration", method="maml", setting=f"{steps} inner step(s)",
                         metric="ms/it", value=timings["skbilevel"],
                         peer=f"higher {timings['higher']:.1f} ms", ratio=ratio,
                         max_rel_diff=diff))
        print(f"  meta-iteration, {steps} step(s): skbilevel {timings['skbilevel']:.1f} ms, "
              f"higher {timings['higher']:.1f} ms, ratio {ratio:.2f}, grad diff {diff:.1e}",
              flush=True)
        results[steps] = ratio
    return results


def _gradient_agreement(steps, higher):
    """Max relative difference of the two MAML meta-gradients on one float64 batch."""
    torch.manual_seed(1)
    net = _mlp(torch.float64)
    batch = _batches(1, 25, 10, torch.float64, seed=7)[0]
    model = FunctionalModel(net, "mse")
    method = get_meta_method("maml", inner_steps=steps, inner_lr=0.01)
    meta = method.init_meta(model)
    for leaf in meta["params"].values():
        leaf.requires_grad_(True)
    method.meta_loss(model, meta, batch)[0].backward()
    ours = torch.cat([v.grad.reshape(-1) for v in meta["params"].values()])
    inner_opt = torch.optim.SGD(net.parameters(), lr=0.01)
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    _higher_step(net, inner_opt, opt, batch, steps, higher)
    theirs = torch.cat([p.grad.reshape(-1) for p in net.parameters()])
    return float((ours - theirs).abs().max() / theirs.abs().max())


# -- digits ------------------------------------------------------------------


def bench_digits(args, rows):
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import NearestCentroid
    from sklearn.neural_network import MLPClassifier

    X, y = load_digits(return_X_y=True)
    X = X / 16.0
    train = y < 6
    Xte, yte = X[~train], y[~train]
    # Only six meta-training classes: longer meta-training overfits them (the
    # accuracy on the new classes drops), so the meta-iterations are few.
    n_iter = 30 if args.quick else 100
    n_eval = 20 if args.quick else 200
    shots = (5,) if args.quick else (1, 5)
    methods = ["maml", "r2d2"] if args.quick else METHODS
    for k in shots:
        rng = np.random.RandomState(200 + k)
        episodes = []
        for _ in range(n_eval):
            sup, qry = [], []
            for c in (6, 7, 8, 9):
                idx = rng.permutation(np.flatnonzero(yte == c))
                sup.extend(idx[:k])
                qry.extend(idx[k:k + 15])
            episodes.append((np.array(sup), np.array(qry)))

        def accuracy(make):
            return float(np.mean([make(Xte[s], yte[s]).score(Xte[q], yte[q])
                                  for s, q in episodes]))

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            baselines = {
                "nearest centroid": lambda a, b: NearestCentroid().fit(a, b),
                "logistic regression (scratch)": lambda a, b: LogisticRegression().fit(a, b),
                "MLP 2x40 (scratch)": lambda a, b: MLPClassifier(
                    (40, 40), max_iter=300, random_state=0).fit(a, b),
            }
            if args.quick:
                baselines.pop("MLP 2x40 (scratch)")
            for name, make in baselines.items():
                rows.append(dict(benchmark="digits 4-way", method=name, setting=f"{k}-shot",
                                 metric="accuracy", value=accuracy(make)))
        runs = [(m, m, {}) for m in methods] + [("maml (linear backbone)", "maml", {"module": "linear"})]
        for label, method, extra in runs:
            meta = MetaLearnerClassifier(
                method=method, n_way=4, k_shot=k, n_query=10, meta_batch_size=16,
                max_iter=n_iter, learning_rate=1e-3, random_state=0,
                **{**DIGITS_CONFIG[method], **extra})
            start = time.perf_counter()
            meta.fit(X[train], y[train])
            fit_s = time.perf_counter() - start
            acc = accuracy(meta.adapt)
            rows.append(dict(benchmark="digits 4-way", method=label, setting=f"{k}-shot",
                             metric="accuracy", value=acc, fit_s=fit_s, n_iter=meta.n_iter_))
            print(f"  digits {k}-shot {label}: accuracy {acc:.3f} ({meta.n_iter_} it, "
                  f"{fit_s:.0f} s)", flush=True)


def main():
    args = parse_args("meta", __doc__.splitlines()[0])
    torch.manual_seed(0)
    rows = []
    start = time.perf_counter()
    print("sinusoid regression ...", flush=True)
    best = bench_sinusoid(args, rows)
    print("time per meta-iteration ...", flush=True)
    ratios = bench_iteration_time(args, rows)
    print("digits few-shot ...", flush=True)
    bench_digits(args, rows)
    columns = ["benchmark", "method", "setting", "metric", "value", "published", "peer",
               "ratio", "max_rel_diff", "fit_s", "n_iter"]
    table = print_table(rows, columns, title="\nskbilevel meta-learners"
                        + (" (quick)" if args.quick else ""))
    targets = []
    if best:
        name, (mse, fit_s) = min(best.items(), key=lambda kv: kv[1][0])
        ok = mse <= 0.2 and fit_s <= 120
        targets.append(f"10-shot sinusoid MSE <= 0.2 within 2 min CPU: {'met' if ok else 'NOT met'} "
                       f"(best {name}: {mse:.3f} in {fit_s:.0f} s)")
    if ratios:
        worst = min(ratios.values())
        targets.append(f"meta-iteration >= 3x faster than higher: {'met' if worst >= 3 else 'NOT met'} "
                       f"(ratios {', '.join(f'{s} step(s): {r:.2f}x' for s, r in ratios.items())})")
    for line in targets:
        print(line)
    print(f"total {time.perf_counter() - start:.0f} s")
    write_json(args.json, "meta", rows, args.quick, targets=targets, table=table)


if __name__ == "__main__":
    main()
