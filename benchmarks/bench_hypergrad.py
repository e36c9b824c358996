"""Benchmark of the hypergradient core: cost, memory, and the same numbers from torchopt / higher.

Three tables, one run:

1. **Cost of one hypergradient in units of one inner-gradient evaluation**,
   per strategy, on L2-regularized logistic regression (``d`` = number of
   parameters, 1e3 to 1e5; one log-penalty ``phi``) and on a tanh MLP with
   ``d`` ~ 1e5 and weight decay ``e^phi``. ``solve`` is the time of
   :func:`~skbilevel.hypergrad.argmin` (for the implicit and proxy
   strategies warm-started at the inner solution, as in an outer loop; the
   cold L-BFGS solve has its own row), ``hypergrad`` is the time of the
   backward pass, both divided by the time of one inner gradient (best
   block of 10 back-to-back ``torch.autograd.grad`` calls, / 10).
   ``n_grad`` / ``n_hvp`` are the counts the health record reports (solve and
   backward), ``bwd_evals`` the products counted in the backward pass alone.
   ``rel_err`` is the distance to the ImplicitCG hypergradient (the
   reference: exact up to the solver tolerances; for the MLP only as good as
   its inner solve) and ``scale`` the length of the projection on it
   (EvoGrad's scale is arbitrary; BOME's first call is exactly zero because
   its multiplier is 0 until its iterate leaves the inner optimum; first-order
   unrolling drops the dependence on an inner regularization strength).
2. **Peak memory against the number of inner steps T** for reverse, forward
   and implicit (CG) on logistic regression, all three with the same
   gradient-descent inner solver. ``peak_MB`` is the peak resident memory
   of the process during ``argmin`` + ``backward`` above its resident
   memory just before (so the data, built before, is not counted), read
   from the kernel: the high-water mark ``VmHWM`` is reset through
   ``/proc/self/clear_refs`` before each run, in a child process whose
   ``MALLOC_MMAP_THRESHOLD_`` is fixed at 64 KiB so that every tensor of
   that size or more is mapped and unmapped on its own and the resident
   size follows the live tensors. (An earlier version read torch.profiler's
   memory timeline; it misses the frees of tensors made by batched
   ``autograd.grad`` and showed forward mode growing with T while the
   process's resident memory stayed flat, even at T = 3000.) ``saved_MB``
   is a second, independent number: the bytes of all distinct storages
   autograd saved for backward during the run
   (``torch.autograd.graph.saved_tensors_hooks``; the data excluded). It is
   a total, not a peak: for reverse mode, which keeps every step's graph,
   it tracks the peak; for strategies that free each step's graph it counts
   what was saved over the whole run, not what was alive at once. Where
   ``/proc`` cannot be used (not Linux), the targets fall back to it.
3. **Peers**: the same per-feature-penalty hypergradient (``phi`` in R^d) by
   torchopt's implicit differentiation (``torchopt.diff.implicit.custom_root``
   with ``torchopt.linear_solve.solve_cg``) against skbilevel's ``"cg"``, both
   from the same precomputed inner solution, and by ``higher``'s unrolled
   loop (``higher.innerloop_ctx`` with SGD) against skbilevel's ``"reverse"``
   with the same steps. ``ratio`` = skbilevel time / peer time (forward +
   backward, best of the repeats); ``max_rel_diff`` = max |a - b| / max |b|.
   ``"reverse"`` is timed twice: as shipped, where the health record costs
   one more inner gradient (at the returned parameters) than ``higher``
   spends, and with ``check_inner=False``, the same work as ``higher``; the
   speed target uses the latter and its value shows both.

Targets (printed as met / NOT met): implicit CG with K iterations costs
<= 2K + 4 gradient evaluations; reverse-mode memory grows linearly in T while
forward and implicit stay flat within 10%; skbilevel is no slower than
torchopt or higher (ratio <= 1) and agrees with them to 1e-6.

Timings come from a shared machine: treat ratios near 1 as ties. Run with
``OMP_NUM_THREADS`` set; on a machine whose cores are busy with other work,
more threads than free cores makes small operations many times slower.

Usage: ``python benchmarks/bench_hypergrad.py [--quick] [--json PATH]``.
"""

import gc
import json
import math
import os
import subprocess
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _common import parse_args, print_table, write_json  # noqa: E402

from skbilevel.hypergrad import (  # noqa: E402
    BOME,
    LBFGS,
    BestResponse,
    EvoGrad,
    FiniteDifferenceDARTS,
    FirstOrder,
    GradientDescent,
    HypergradientWarning,
    ImplicitCG,
    ImplicitDense,
    ImplicitIdentity,
    ImplicitNeumann,
    TruncatedReverse,
    UnrolledForward,
    UnrolledReverse,
    argmin,
)

DT = torch.float64


# --------------------------------------------------------------------------- problems
class Problem:
    """An inner loss, an outer loss, a starting point, a step size and ``phi``."""

    def __init__(self, name, d, inner, outer, init, phi0, lipschitz):
        self.name, self.d = name, d
        self.inner, self.outer = inner, outer
        self.init, self.phi0 = init, phi0
        self.lr = 1.0 / lipschitz
        self.theta_star = None

    def solve(self, tol=1e-10, max_iter=500):
        """Cold L-BFGS solve (kept as the warm start of the other strategies)."""
        phi = self.phi0.detach()
        solver = LBFGS(tol=tol, max_iter=max_iter, warn=False)
        start = time.perf_counter()
        theta, res = solver.solve(lambda t: self.inner(t, phi), self.init)
        self.solve_time = time.perf_counter() - start
        self.solve_result = res
        self.theta_star = theta
        return theta


def _top_eig(matvec, d, iters=30, gen=None):
    v = torch.randn(d, dtype=DT, generator=gen)
    lam = 0.0
    for _ in range(iters):
        w = matvec(v)
        lam = float(w.norm() / v.norm())
        v = w / w.norm()
    return lam


def logistic_problem(d, n, per_feature=False, seed=0):
    """L2-regularized logistic regression, ``d`` features, labels from a sparse model.

    Features are scaled so that the data part of the Hessian has its top
    eigenvalue near 1/4 whatever ``d / n``; with ``alpha = 0.01`` the inner
    problem has a condition number of a few hundred.
    """
    gen = torch.Generator().manual_seed(seed)
    scale = 1.0 / math.sqrt(max(1.0, d / n)) / (1.0 + math.sqrt(min(d, n) / max(d, n)))
    X = scale * torch.randn(n, d, dtype=DT, generator=gen)
    w_true = torch.zeros(d, dtype=DT)
    k = max(1, d // 100)
    w_true[:k] = 3.0 * torch.randn(k, dtype=DT, generator=gen) / (scale * math.sqrt(k))
    y = torch.sign(X @ w_true + 0.5 * torch.randn(n, dtype=DT, generator=gen))
    Xv = scale * torch.randn(n, d, dtype=DT, generator=gen)
    yv = torch.sign(Xv @ w_true + 0.5 * torch.randn(n, dtype=DT, generator=gen))
    phi0 = torch.full((d,) if per_feature else (), math.log(1e-2), dtype=DT)

    def inner(w, phi):
        return torch.nn.functional.softplus(-y * (X @ w)).mean() + 0.5 * (
            phi.exp() * w**2
        ).sum()

    def outer(w):
        return torch.nn.functional.softplus(-yv * (Xv @ w)).mean()

    top = _top_eig(lambda v: X.T @ (X @ v) / (4 * n), d, gen=gen)
    alpha = float(phi0.exp().max())
    name = f"logreg d={d:.0e}".replace("e+0", "e")
    prob = Problem(name, d, inner, outer, torch.zeros(d, dtype=DT), phi0, top + alpha)
    prob.tensors = [X, y, Xv, yv]
    return prob


def mlp_problem(n_in, hidden, n, seed=0):
    """Tanh MLP regression with weight decay ``e^phi``; ``theta`` is a dict of tensors."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, n_in, dtype=DT, generator=gen)
    Xv = torch.randn(n, n_in, dtype=DT, generator=gen)
    teacher = torch.randn(n_in, dtype=DT, generator=gen) / math.sqrt(n_in)
    y = torch.sin(2 * X @ teacher) + 0.1 * torch.randn(n, dtype=DT, generator=gen)
    yv = torch.sin(2 * Xv @ teacher) + 0.1 * torch.randn(n, dtype=DT, generator=gen)
    sizes = [n_in, *hidden, 1]
    init = {}
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        init[f"W{i}"] = torch.randn(b, a, dtype=DT, generator=gen) / math.sqrt(a)
        init[f"b{i}"] = torch.zeros(b, dtype=DT)
    n_layers = len(sizes) - 1
    d = sum(t.numel() for t in init.values())

    def forward(theta, inputs):
        h = inputs
        for i in range(n_layers):
            h = h @ theta[f"W{i}"].T + theta[f"b{i}"]
            if i < n_layers - 1:
                h = torch.tanh(h)
        return h.squeeze(-1)

    def inner(theta, phi):
        reg = sum((t**2).sum() for t in theta.values())
        return 0.5 * ((forward(theta, X) - y) ** 2).mean() + 0.5 * phi.exp() * reg

    def outer(theta):
        return 0.5 * ((forward(theta, Xv) - yv) ** 2).mean()

    phi0 = torch.tensor(math.log(3e-2), dtype=DT)
    name = f"mlp d={d:.1e}".replace("e+0", "e")
    prob = Problem(name, d, inner, outer, init, phi0, lipschitz=10.0)
    prob.tensors = [X, y, Xv, yv]
    return prob


# --------------------------------------------------------------------------- timing helpers
def time_inner_grad(problem, repeat=5, block=10):
    """Times of one inner gradient (the cost unit) and of one Hessian-vector product.

    Each is the best over ``repeat`` blocks of ``block`` back-to-back
    evaluations, divided by ``block``: a block is exposed to the machine's
    load like the multi-product backward passes it is compared with (the
    best single evaluation would flatter the unit on a loaded machine).
    """
    theta = problem.theta_star
    leaves = list(theta.values()) if isinstance(theta, dict) else [theta]
    phi = problem.phi0.detach()
    ls = [t.detach().requires_grad_(True) for t in leaves]
    th = dict(zip(theta, ls)) if isinstance(theta, dict) else ls[0]
    grads = torch.autograd.grad(problem.inner(th, phi), ls, create_graph=True)
    vs = [torch.ones_like(g) for g in grads]
    best = best_hvp = math.inf
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(block):
            torch.autograd.grad(problem.inner(th, phi), ls)
        best = min(best, (time.perf_counter() - start) / block)
        start = time.perf_counter()
        for _ in range(block):
            torch.autograd.grad(grads, ls, vs, retain_graph=True)
        best_hvp = min(best_hvp, (time.perf_counter() - start) / block)
    return best, best_hvp


def _repeats(seconds, budget, lo, hi):
    """How many repeats fit in ``budget`` seconds (at least ``lo``, at most ``hi``)."""
    return int(min(hi, max(lo, budget // max(seconds, 1e-9))))


def run_once(problem, strategy, solver, init, phi0=None):
    """One ``argmin`` + backward; returns (solve time, backward time, grad, info).

    ``info.extra["bwd_evals"]`` is set to the gradient + Hessian-vector
    products counted during the backward pass alone.
    """
    phi = (problem.phi0 if phi0 is None else phi0).detach().clone().requires_grad_(True)
    start = time.perf_counter()
    theta, info = argmin(problem.inner, phi, init, hypergradient=strategy, solver=solver)
    mid = time.perf_counter()
    counted = info.n_grad + info.n_hvp
    loss = problem.outer(theta)
    if not loss.requires_grad:  # the strategy drops every dependence on phi
        info.extra["bwd_evals"] = 0
        return mid - start, float("nan"), torch.zeros_like(phi), info
    loss.backward()
    end = time.perf_counter()
    info.extra["bwd_evals"] = info.n_grad + info.n_hvp - counted
    return mid - start, end - mid, phi.grad.detach().clone(), info


def _rel(a, b):
    nb = float(b.abs().max())
    return float((a - b).abs().max()) / nb if nb > 0 else float("nan")


# --------------------------------------------------------------------------- part 1: cost
def strategy_specs(problem, T, quick):
    """(label, strategy factory, solver factory, warm) for the cost table."""
    lr = problem.lr
    gd = lambda: GradientDescent(lr=lr, n_steps=T)  # noqa: E731
    # warm-started at the cold solution: stop at the accuracy the cold solve reached
    tol = max(1e-10, 2 * problem.solve_result.grad_norm)
    exact = lambda: LBFGS(tol=tol, max_iter=1000, warn=False)  # noqa: E731
    specs = [
        ("cg", lambda: ImplicitCG(tol=1e-10, maxiter=200), exact, True),
        ("neumann", lambda: ImplicitNeumann(n_terms=50), exact, True),
        ("identity", lambda: ImplicitIdentity(), exact, True),
    ]
    if problem.d <= 1000 and not quick:  # d Hessian-vector products: not for CI
        specs.append(("dense", lambda: ImplicitDense(), exact, True))
    specs += [
        (f"reverse T={T}", lambda: UnrolledReverse(), gd, False),
        (f"truncated 10/{T}", lambda: TruncatedReverse(truncate=10), gd, False),
        (f"forward T={T}", lambda: UnrolledForward(), gd, False),
        (f"first_order T={T}", lambda: FirstOrder(), gd, False),
        ("darts", lambda: FiniteDifferenceDARTS(), gd, True),
        ("best_response", lambda: BestResponse(random_state=0), exact, True),
        ("evograd n=32", lambda: EvoGrad(n_samples=32, sigma=1e-3, temperature=1e-3, random_state=0), exact, True),
        ("bome T=10", lambda: BOME(), lambda: GradientDescent(lr=lr, n_steps=10), True),
    ]
    return specs


def cost_table(problems, T, repeat, budget, quick):
    rows, targets = [], []
    for problem in problems:
        print(f"[cost] {problem.name}: cold L-BFGS solve ...", flush=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", HypergradientWarning)
            problem.solve(max_iter=1000)
        t_grad, t_hvp = time_inner_grad(problem)
        res = problem.solve_result
        rows.append(
            dict(
                problem=problem.name, strategy="(inner solve, L-BFGS cold)",
                t_grad_ms=1e3 * t_grad, solve=problem.solve_time / t_grad,
                hypergrad=float("nan"), n_grad=res.n_grad, n_hvp=0, bwd_evals=0,
                K=float("nan"), rel_err=float("nan"), scale=float("nan"),
                note=f"{res.n_iter} it, |grad|={res.grad_norm:.1e}; "
                     f"1 HVP = {t_hvp / t_grad:.2f} grads",
            )
        )
        ref = None
        for label, make, make_solver, warm in strategy_specs(problem, T, quick):
            init = problem.theta_star if warm else problem.init
            best_s = best_b = math.inf
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", HypergradientWarning)
                # first run: a warm-up, kept as the measurement when it is too long to repeat
                s, b, grad, info = run_once(problem, make(), make_solver(), init)
                first = s + (0 if math.isnan(b) else b)
                if first > budget:
                    best_s, best_b = s, b
                for _ in range(0 if first > budget else _repeats(first, budget, 1, repeat)):
                    s, b, grad, info = run_once(problem, make(), make_solver(), init)
                    best_s, best_b = min(best_s, s), min(best_b, b)
            warned = sorted({type(w.message).__name__ for w in caught})
            if label == "cg":
                ref = grad
            rel = _rel(grad, ref) if ref is not None else float("nan")
            # length of the projection on the reference: EvoGrad's scale is arbitrary
            scale = float((grad * ref).sum() / (ref * ref).sum()) if ref is not None else 1.0
            K = info.linear_solve_iterations
            row = dict(
                problem=problem.name, strategy=label, t_grad_ms=1e3 * t_grad,
                solve=best_s / t_grad, hypergrad=best_b / t_grad,
                n_grad=info.n_grad, n_hvp=info.n_hvp, bwd_evals=info.extra["bwd_evals"],
                K=float("nan") if K is None else K, rel_err=rel, scale=scale,
                note=", ".join(warned),
            )
            rows.append(row)
            if label == "cg":
                bound = 2 * K + 4
                targets.append(
                    dict(
                        target=f"{problem.name}: CG backward <= 2K+4 grads",
                        value=f"measured {best_b / t_grad:.1f} (K={K}, bound {bound}); "
                              f"counted {info.extra['bwd_evals']} products",
                        met=best_b / t_grad <= bound,
                    )
                )
            print(
                f"  {label:<18} solve {row['solve']:8.1f}  hypergrad {row['hypergrad']:8.1f}"
                f"  n_grad {info.n_grad:5d}  n_hvp {info.n_hvp:5d}  rel_err {rel:.1e}",
                flush=True,
            )
    return rows, targets


# --------------------------------------------------------------------------- part 2: memory
def _status_bytes(field):
    """``VmHWM`` (peak) or ``VmRSS`` (current) of this process, in bytes (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"{field} not in /proc/self/status")


def _peak_rss_above_current(fn):
    """Peak resident memory while ``fn`` runs, above the resident memory before it.

    Writing ``5`` to ``/proc/self/clear_refs`` resets the kernel's high-water
    mark ``VmHWM`` (Linux >= 4.0), so each run is measured on its own. The
    worker runs with ``MALLOC_MMAP_THRESHOLD_`` fixed at 64 KiB: every tensor
    of that size or more gets pages of its own that go back to the kernel
    when it is freed, so the resident size follows the live tensors rather
    than the allocator's caches.
    """
    gc.collect()
    before = _status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    fn()
    return _status_bytes("VmHWM") - before


def _saved_bytes(fn, exclude=()):
    """Bytes of the distinct storages autograd saves for backward while ``fn`` runs.

    Storages of the tensors in ``exclude`` (the data, which a graph only
    references) are not counted.
    """
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen = {}

    def pack(t):
        try:
            storage = t.untyped_storage()
            if storage.data_ptr() not in skip:
                seen[storage.data_ptr()] = storage.nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def _memory_specs(cg_iters):
    return [
        ("reverse", lambda: UnrolledReverse()),
        ("forward", lambda: UnrolledForward()),
        (f"cg (K<={cg_iters})", lambda: ImplicitCG(tol=1e-10, maxiter=cg_iters)),
    ]


def memory_rows(problem, Ts, cg_iters, use_rss):
    """Peak and saved bytes of argmin + backward for each strategy and T."""
    rows = []
    for label, make in _memory_specs(cg_iters):
        for T in Ts:
            def fn():
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", HypergradientWarning)
                    run_once(problem, make(), GradientDescent(lr=problem.lr, n_steps=T),
                             problem.init)

            fn()  # warm-up (lazy initializations are not the strategy's memory)
            peak = min(_peak_rss_above_current(fn) for _ in range(2)) if use_rss else math.nan
            saved = _saved_bytes(fn, exclude=problem.tensors + [problem.init])
            rows.append(dict(problem=problem.name, strategy=label, T=T,
                             peak_MB=peak / 2**20, saved_MB=saved / 2**20))
            print(f"  {label:<14} T={T:4d} peak {peak / 2**20:8.2f} MB  "
                  f"saved {saved / 2**20:8.2f} MB", file=sys.stderr, flush=True)
    return rows


def _memory_worker(config):
    """Child process, started with a fixed mmap threshold (see ``_peak_rss_above_current``)."""
    torch.set_num_threads(1)
    problem = logistic_problem(config["d"], config["n"])
    rows = memory_rows(problem, config["Ts"], config["cg_iters"], use_rss=True)
    print("MEMORY_JSON " + json.dumps(rows))


def memory_table(d, n, Ts, cg_iters):
    config = dict(d=d, n=n, Ts=list(Ts), cg_iters=cg_iters)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(64 * 1024))
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--memory-worker", json.dumps(config)],
        capture_output=True, text=True, env=env,
    )
    for line in (proc.stderr or "").splitlines():
        if line.startswith("  "):
            print(line)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("MEMORY_JSON ")]
    if proc.returncode == 0 and lines:
        rows = json.loads(lines[-1][len("MEMORY_JSON "):])
        key, how = "peak_MB", "peak RSS"
    else:
        tail = (proc.stderr or "").strip().splitlines()[-3:]
        print(f"[memory] peak-RSS worker failed (rc={proc.returncode}: {' | '.join(tail)}); "
              "measuring saved-tensor bytes only")
        problem = logistic_problem(d, n)
        rows = memory_rows(problem, Ts, cg_iters, use_rss=False)
        key, how = "saved_MB", "saved tensors"
    targets = []
    for label, _ in _memory_specs(cg_iters):
        vals = [(r["T"], r[key]) for r in rows if r["strategy"] == label]
        ts = torch.tensor([t for t, _ in vals], dtype=DT)
        ms = torch.tensor([m for _, m in vals], dtype=DT)
        if label == "reverse":
            A = torch.stack([torch.ones_like(ts), ts], dim=1)
            coef = torch.linalg.lstsq(A, ms[:, None]).solution.squeeze(1)
            fit = A @ coef
            r2 = 1 - float(((ms - fit) ** 2).sum() / ((ms - ms.mean()) ** 2).sum())
            growth = float(ms[-1] / ms[0])
            targets.append(dict(
                target="reverse memory grows linearly in T",
                value=f"{how}: slope {float(coef[1]):.3f} MB/step, R^2 {r2:.4f}, "
                      f"x{growth:.1f} for T x{float(ts[-1] / ts[0]):.0f}",
                met=float(coef[1]) > 0 and r2 >= 0.98 and growth > 1.5,
            ))
        else:
            spread = float((ms.max() - ms.min()) / ms.min())
            targets.append(dict(
                target=f"{label} memory flat in T (within 10%)",
                value=f"{how}: max/min - 1 = {100 * spread:.1f}%",
                met=spread <= 0.10,
            ))
    return rows, targets


# --------------------------------------------------------------------------- part 3: peers
def _best_of(fns, repeat):
    """Best times of ``fns`` run in turn (so load spikes hit all of them)."""
    best, outs = [math.inf] * len(fns), [None] * len(fns)
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            outs[i] = fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return outs, best


def peers_table(d, n, T, repeat):
    rows, targets = [], []
    problem = logistic_problem(d, n, per_feature=True, seed=1)
    problem.solve(tol=1e-12)
    w_star = problem.theta_star
    tol, maxiter = 1e-10, 1000

    # --- implicit: skbilevel cg vs torchopt custom_root + solve_cg
    class Given(LBFGS):
        """The precomputed solution (the solve is not what is compared)."""

        def solve(self, fun, theta0, phi=None):
            res = LBFGS.solve(self, fun, w_star, phi)
            return res

    def skb_cg():
        _, _, grad, info = run_once(problem, ImplicitCG(tol=tol, maxiter=maxiter),
                                    Given(tol=1e-6, warn=False), w_star)
        return grad, info

    skb_cg()  # warm-up
    try:
        import torchopt
    except Exception as exc:  # noqa: BLE001
        print(f"[peers] torchopt skipped: {type(exc).__name__}: {exc}")
        rows.append(dict(problem=problem.name, comparison="cg vs torchopt",
                         note=f"skipped: {exc}"))
    else:
        def optimality(w, phi):
            return torch.func.grad(problem.inner)(w, phi)

        @torchopt.diff.implicit.custom_root(
            optimality, argnums=1,
            solve=torchopt.linear_solve.solve_cg(maxiter=maxiter, rtol=tol, atol=0.0),
        )
        def solve(w, phi):
            return w_star.clone()

        def topt():
            phi = problem.phi0.detach().clone().requires_grad_(True)
            w = solve(problem.init.clone(), phi)
            problem.outer(w).backward()
            return phi.grad.detach().clone()

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # functorch.vjp deprecation
            topt()  # warm-up
            ((g_skb, info_cg), g_topt), (t_skb, t_topt) = _best_of([skb_cg, topt], repeat)
        diff = _rel(g_skb, g_topt)
        rows.append(dict(problem=problem.name, comparison="cg vs torchopt custom_root+CG",
                         skbilevel_ms=1e3 * t_skb, peer_ms=1e3 * t_topt,
                         ratio=t_skb / t_topt, max_rel_diff=diff,
                         note=f"K={info_cg.linear_solve_iterations}, torchopt {torchopt.__version__}"))
        targets.append(dict(target=f"{problem.name}: cg no slower than torchopt",
                            value=f"ratio {t_skb / t_topt:.2f}", met=t_skb <= t_topt))
        targets.append(dict(target=f"{problem.name}: cg agrees with torchopt to 1e-6",
                            value=f"{diff:.1e}", met=diff <= 1e-6))

    # --- unrolled: skbilevel reverse vs higher.innerloop_ctx
    lr = problem.lr

    def skb_rev(check_inner=True):
        _, _, grad, _ = run_once(problem, UnrolledReverse(check_inner=check_inner),
                                 GradientDescent(lr=lr, n_steps=T), problem.init)
        return grad

    skb_rev()  # warm-up
    try:
        import higher
    except Exception as exc:  # noqa: BLE001
        print(f"[peers] higher skipped: {type(exc).__name__}: {exc}")
        rows.append(dict(problem=problem.name, comparison="reverse vs higher",
                         note=f"skipped: {exc}"))
    else:
        def hig():
            phi = problem.phi0.detach().clone().requires_grad_(True)
            model = torch.nn.Linear(d, 1, bias=False).to(DT)
            with torch.no_grad():
                model.weight.copy_(problem.init[None, :])
            opt = torch.optim.SGD(model.parameters(), lr=lr)
            with higher.innerloop_ctx(model, opt, copy_initial_weights=True) as (fm, dopt):
                for _ in range(T):
                    dopt.step(problem.inner(fm.weight.view(-1), phi))
                problem.outer(fm.weight.view(-1)).backward()
            return phi.grad.detach().clone()

        hig()  # warm-up
        (g_rev, g_bare, g_hig), (t_rev, t_bare, t_hig) = _best_of(
            [skb_rev, lambda: skb_rev(False), hig], repeat
        )
        diff = max(_rel(g_rev, g_hig), _rel(g_bare, g_hig))
        rows.append(dict(problem=problem.name, comparison=f"reverse vs higher (T={T})",
                         skbilevel_ms=1e3 * t_rev, peer_ms=1e3 * t_hig,
                         ratio=t_rev / t_hig, max_rel_diff=_rel(g_rev, g_hig),
                         note=f"default: the health record adds the gradient at theta_T "
                              f"({T + 1} gradients against {T})"))
        rows.append(dict(problem=problem.name,
                         comparison=f"reverse(check_inner=False) vs higher (T={T})",
                         skbilevel_ms=1e3 * t_bare, peer_ms=1e3 * t_hig,
                         ratio=t_bare / t_hig, max_rel_diff=_rel(g_bare, g_hig),
                         note=f"like for like: {T} gradients each"))
        targets.append(dict(
            target=f"{problem.name}: reverse no slower than higher (same work)",
            value=f"ratio {t_bare / t_hig:.2f} (with the health record: {t_rev / t_hig:.2f})",
            met=t_bare <= t_hig,
        ))
        targets.append(dict(target=f"{problem.name}: reverse agrees with higher to 1e-6",
                            value=f"{diff:.1e}", met=diff <= 1e-6))
    return rows, targets


# --------------------------------------------------------------------------- main
def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--memory-worker":
        _memory_worker(json.loads(sys.argv[2]))
        return
    args = parse_args("hypergrad", __doc__.splitlines()[0])
    quick = args.quick
    repeat = 3 if quick else 7  # at most; fewer when one run exceeds the budget
    budget = 0.3 if quick else 2.0  # seconds of repeats per strategy
    t0 = time.perf_counter()
    torch.manual_seed(0)

    if quick:
        problems = [logistic_problem(1000, 2000), mlp_problem(32, (64, 64), 256)]
        T, mem_Ts, mem_d, mem_n, peer_ds = 20, (5, 10, 20, 40), 50000, 200, (1000,)
    else:
        problems = [logistic_problem(1000, 2000), logistic_problem(10000, 1000),
                    logistic_problem(100000, 200), mlp_problem(100, (400, 150), 512)]
        T, mem_Ts, mem_d, mem_n, peer_ds = 50, (10, 20, 40, 80, 160), 100000, 200, (1000, 10000)

    cost_rows, targets = cost_table(problems, T, repeat, budget, quick)
    print_table(cost_rows, ["problem", "strategy", "t_grad_ms", "solve", "hypergrad",
                            "n_grad", "n_hvp", "bwd_evals", "K", "rel_err", "scale", "note"],
                title="\nCost of one hypergradient, in inner-gradient evaluations "
                      "(solve = argmin, hypergrad = backward)")

    print(f"\n[memory] logistic regression d={mem_d}, n={mem_n}, T in {mem_Ts}", flush=True)
    mem_rows, mem_targets = memory_table(mem_d, mem_n, mem_Ts, cg_iters=20)
    targets += mem_targets
    print_table(mem_rows, ["problem", "strategy", "T", "peak_MB", "saved_MB"],
                title="\nPeak memory of argmin + backward against T")

    peer_rows = []
    for d in peer_ds:
        print(f"\n[peers] logistic regression d={d}, per-feature penalties", flush=True)
        rows, tg = peers_table(d, 1000 if d <= 1000 else 500, T, repeat=3 if quick else 15)
        peer_rows += rows
        targets += tg
    print_table(peer_rows, ["problem", "comparison", "skbilevel_ms", "peer_ms", "ratio",
                            "max_rel_diff", "note"],
                title="\nskbilevel against torchopt / higher (ratio = skbilevel / peer time)")

    print_table(targets, ["target", "value", "met"], title="\nTargets")
    elapsed = time.perf_counter() - t0
    print(f"\ntotal {elapsed:.1f} s ({'quick' if quick else 'full'} mode, "
          f"{torch.get_num_threads()} torch threads)")
    write_json(args.json, "hypergrad", cost_rows, quick, memory=mem_rows,
               peers=peer_rows, targets=targets, elapsed_s=elapsed)


if __name__ == "__main__":
    main()
