"""BilevelRidgeCV against RidgeCV and GridSearchCV(Ridge): time, validation error, test R².

One table, one run. Data sets: ``load_diabetes``; wide (n = 500, p = 2000);
tall (n = 50 000, p = 200); multi-target (n = 2000, p = 100, 10 targets).
Each is split 75 / 25 into train / test (wide and tall get 500 / 5000 extra
test rows instead).

Rows per data set:

- ``BilevelRidgeCV`` (exact leave-one-out, continuous alpha) vs
  ``RidgeCV(alphas=np.logspace(-6, 6, 13))`` (leave-one-out on the grid):
  ``time_ratio`` = time / RidgeCV's time, ``val_error`` = mean squared LOO
  error at the chosen alpha (``-best_score_``);
- ``BilevelRidgeCV(cv=5)`` vs ``GridSearchCV(Ridge(), same grid, cv=5)``:
  ``time_ratio`` = time / GridSearchCV's time, ``val_error`` = mean over the
  5 folds of the validation MSE (``-best_score_``).

Targets (issue 3): LOO time <= 0.5 x RidgeCV on the tall problem and <= 1 x
elsewhere; validation error <= the grid's minimum on every data set (LOO and
5-fold); test R² >= RidgeCV's - 1e-3. Times are the best of several wall-clock
runs, single-threaded (``torch.set_num_threads(1)``; run with
``OMP_NUM_THREADS=1`` so numpy's BLAS is single-threaded too).

Usage: ``python benchmarks/bench_ridge.py [--quick] [--json PATH]``
"""

import os
import sys

import numpy as np
import torch
from sklearn.datasets import load_diabetes, make_regression
from sklearn.linear_model import Ridge, RidgeCV
from sklearn.metrics import r2_score
from sklearn.model_selection import GridSearchCV, train_test_split

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import parse_args, print_table, timed, write_json  # noqa: E402

from skbilevel.linear_model import BilevelRidgeCV  # noqa: E402

TOPIC = "ridge"
GRID = np.logspace(-6, 6, 13)


def datasets(quick):
    """``name -> (X_train, X_test, y_train, y_test, repeats)``."""
    out = {}
    X, y = load_diabetes(return_X_y=True)
    out["diabetes"] = (*train_test_split(X, y, test_size=0.25, random_state=0), 20)
    n_wide = 200 if quick else 500
    X, y = make_regression(
        n_wide + 500, 2000, n_informative=100, noise=30.0, random_state=1
    )
    out[f"wide {n_wide}x2000"] = (X[:n_wide], X[n_wide:], y[:n_wide], y[n_wide:], 3)
    n_tall = 10_000 if quick else 50_000
    X, y = make_regression(
        n_tall + 5000, 200, n_informative=50, effective_rank=60, noise=5.0, random_state=2
    )
    out[f"tall {n_tall}x200"] = (X[:n_tall], X[n_tall:], y[:n_tall], y[n_tall:], 1 if not quick else 2)
    n_multi = 800 if quick else 2000
    X, y = make_regression(
        n_multi, 100, n_informative=30, n_targets=10, noise=20.0, random_state=3
    )
    out[f"multi-target {int(n_multi * 0.75)}x100x10"] = (
        *train_test_split(X, y, test_size=0.25, random_state=0), 3
    )
    return out


def run(name, X_tr, X_te, y_tr, y_te, repeats):
    rows = []
    ridge_cv, t_ridge = timed(lambda: RidgeCV(alphas=GRID).fit(X_tr, y_tr), repeat=repeats)
    ours, t_ours = timed(lambda: BilevelRidgeCV().fit(X_tr, y_tr), repeat=repeats)
    r2_ridge = r2_score(y_te, ridge_cv.predict(X_te))
    r2_ours = r2_score(y_te, ours.predict(X_te))
    grid_min = -float(np.mean(ridge_cv.best_score_))
    loo_ours = -float(np.mean(ours.best_score_))
    time_target = 0.5 if name.startswith("tall") else 1.0
    rows.append(dict(
        dataset=name, method="RidgeCV (LOO, 13-pt grid)", alpha=float(ridge_cv.alpha_),
        time_s=t_ridge, time_ratio=1.0, val_error=grid_min, test_r2=r2_ridge, n_iter="",
    ))
    rows.append(dict(
        dataset=name, method="BilevelRidgeCV (LOO)", alpha=float(ours.alpha_),
        time_s=t_ours, time_ratio=t_ours / t_ridge, val_error=loo_ours, test_r2=r2_ours,
        n_iter=ours.n_iter_,
        target_time=bool(t_ours <= time_target * t_ridge),
        target_error=bool(loo_ours <= grid_min * (1 + 1e-12)),
        target_r2=bool(r2_ours >= r2_ridge - 1e-3),
    ))
    gs_rep = max(1, repeats // 5)
    gs, t_gs = timed(
        lambda: GridSearchCV(Ridge(), {"alpha": GRID}, cv=5, scoring="neg_mean_squared_error").fit(
            X_tr, y_tr
        ),
        repeat=gs_rep,
    )
    kf, t_kf = timed(lambda: BilevelRidgeCV(cv=5).fit(X_tr, y_tr), repeat=gs_rep)
    cv_grid = -float(gs.best_score_)
    cv_ours = -float(kf.best_score_)
    rows.append(dict(
        dataset=name, method="GridSearchCV(Ridge, cv=5)", alpha=float(gs.best_params_["alpha"]),
        time_s=t_gs, time_ratio=1.0, val_error=cv_grid,
        test_r2=r2_score(y_te, gs.predict(X_te)), n_iter="",
    ))
    rows.append(dict(
        dataset=name, method="BilevelRidgeCV (cv=5)", alpha=float(kf.alpha_),
        time_s=t_kf, time_ratio=t_kf / t_gs, val_error=cv_ours,
        test_r2=r2_score(y_te, kf.predict(X_te)), n_iter=kf.n_iter_,
        target_error=bool(cv_ours <= cv_grid * (1 + 1e-12)),
    ))
    return rows


def main():
    args = parse_args(TOPIC, __doc__.splitlines()[0])
    torch.set_num_threads(1)
    rows = []
    for name, (X_tr, X_te, y_tr, y_te, repeats) in datasets(args.quick).items():
        rows.extend(run(name, X_tr, X_te, y_tr, y_te, repeats))
    columns = ["dataset", "method", "alpha", "time_s", "time_ratio", "val_error", "test_r2", "n_iter"]
    print_table(rows, columns, title=f"Ridge: BilevelRidgeCV vs grid search ({'quick' if args.quick else 'full'})")
    checks = []
    for row in rows:
        for key, what in (
            ("target_time", "time <= {}x RidgeCV".format(0.5 if row["dataset"].startswith("tall") else 1)),
            ("target_error", "val error <= grid minimum"),
            ("target_r2", "test R2 >= RidgeCV - 1e-3"),
        ):
            if key in row:
                checks.append(dict(dataset=row["dataset"], method=row["method"], target=what, met=row[key]))
    print()
    print_table(checks, ["dataset", "method", "target", "met"], title="Targets")
    met = {f"{c['dataset']} | {c['method']} | {c['target']}": c["met"] for c in checks}
    print(f"\n{sum(met.values())}/{len(met)} targets met (wall-clock times on a shared machine are noisy)")
    write_json(args.json, TOPIC, rows, args.quick, targets=met, grid=GRID.tolist())


if __name__ == "__main__":
    main()
