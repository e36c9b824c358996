"""Regression tests of a QA pass on the fold problems and closed-form ridge
(``skbilevel.hypergrad._penalized``, ``skbilevel.hypergrad._closed_form``).

Each test fails on the code before its fix; the numbers in the docstrings are
the ones measured there.
"""

import numpy as np
import pytest
import torch

from skbilevel.hypergrad import (
    LogisticFolds,
    RidgeFolds,
    RidgeLOO,
    RidgeSolver,
    ridge_loo_curve,
    ridge_loo_decomposition,
    ridge_loo_value_and_grad,
)

DT = torch.float64


def _data(n=20, p=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, p, generator=g, dtype=DT)
    y = X[:, 0] + 0.5 * torch.randn(n, generator=g, dtype=DT)
    train = torch.ones(2, n, dtype=DT)
    train[0, : n // 2] = 0
    train[1, n // 2 :] = 0
    return X, y, train


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(bad):
    """A NaN or infinite training or sample weight passed the checks (not
    negative, positive sum): RidgeFolds and RidgeLOO returned a NaN value and
    NaN hypergradients, silently."""
    X, y, train = _data()
    weights = train.clone()
    weights[0, 15] = bad
    with pytest.raises(ValueError, match="train_weights must be finite"):
        RidgeFolds(X, y, weights, 1 - train)
    val = 1 - train
    val[0, 3] = bad
    with pytest.raises(ValueError, match="val_weights must be finite"):
        RidgeFolds(X, y, train, val)
    with pytest.raises(ValueError, match="train_weights must be finite"):
        LogisticFolds(X, (y > 0).long(), 2, weights, 1 - train)
    with pytest.raises(ValueError, match="sample_weight must be finite"):
        RidgeLOO(X, y, sample_weight=weights[0] + 1)


@pytest.mark.parametrize("n_val_folds", [1, 3])
def test_validation_weights_need_one_row_per_fold(n_val_folds):
    """Validation weights with another number of folds than the training
    weights failed inside torch (RidgeFolds: "returned an invalid gradient at
    index 0 - got [1, 5] but expected [2, 5]", "index 2 is out of bounds";
    LogisticFolds with 3 rows: "The size of tensor a (3) must match"), or,
    LogisticFolds with one row for two folds, applied that row to both
    folds silently (value 0.927)."""
    X, y, train = _data()
    val = torch.ones(n_val_folds, X.shape[0], dtype=DT)
    with pytest.raises(ValueError, match=r"val_weights must have shape \(2, 20\)"):
        RidgeFolds(X, y, train, val)
    with pytest.raises(ValueError, match="one row per fold of train_weights"):
        LogisticFolds(X, (y > 0).long(), 2, train, val)


def test_sample_weight_must_be_one_per_sample():
    """``RidgeLOO(sample_weight=W)`` with ``W`` of shape ``(2, n)`` used its
    first row and dropped the second, silently (a value of 0.0487 for the
    leave-one-out error of rows 10..19 only); ``RidgeFolds.all_rows`` made two
    folds of it, not the one fit on all rows it documents."""
    X, y, train = _data()
    with pytest.raises(ValueError, match=r"sample_weight must have shape \(20,\)"):
        RidgeLOO(X, y, sample_weight=train)
    folds = RidgeFolds(X, y, train, 1 - train)
    with pytest.raises(ValueError, match=r"sample_weight must have shape \(20,\)"):
        folds.all_rows(train)
    # one weight per sample, as before
    w = torch.linspace(0.5, 1.5, 20, dtype=DT)
    assert folds.all_rows(w).n_folds == 1
    assert RidgeLOO(X, y, sample_weight=w).s_sum == w.sum()


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize("layout", ["csr", "coo", "csc"])
def test_ridge_loo_refuses_sparse_X_clearly(layout):
    """RidgeLOO on a sparse X failed inside torch ("torch.empty: Only batched
    sparse compressed (non-block) tensors are supported, but got size [20]")
    or later; RidgeFolds and LogisticFolds take sparse X, RidgeLOO's
    formulas are dense: a ValueError says to densify."""
    X, y, _ = _data()
    sparse = {"csr": X.to_sparse_csr, "coo": X.to_sparse, "csc": X.to_sparse_csc}[layout]()
    with pytest.raises(ValueError, match=r"X must be a dense tensor.*to_dense\(\)"):
        RidgeLOO(sparse, y)


@pytest.mark.parametrize("n_positive", [0, 1])
def test_leave_one_out_needs_two_positive_weights(n_positive):
    """With an intercept and one sample of positive weight (the others zero),
    leave-one-out is 0/0: RidgeLOO, ridge_loo_value_and_grad and
    ridge_loo_curve returned NaN silently (the closed-form checks counted
    rows, 20, not positive weights). ``n_positive=0``: RidgeLOO of one row."""
    X, y, _ = _data()
    if n_positive == 0:  # one row, unit weight
        X, y, sw = X[:1], y[:1], None
    else:
        sw = torch.zeros(20, dtype=DT)
        sw[3] = 1.0
    with pytest.raises(ValueError, match="at least 2 samples with a positive sample_weight"):
        RidgeLOO(X, y, sample_weight=sw)
    if sw is not None:
        for mode in ("gram", "cov"):
            d = ridge_loo_decomposition(X, y, sw, mode=mode)
            with pytest.raises(ValueError, match="at least 2 samples with a positive"):
                ridge_loo_value_and_grad(d, 0.0)
            with pytest.raises(ValueError, match="at least 2 samples with a positive"):
                ridge_loo_curve(d, [1.0])
        # two positive weights: finite, and no intercept needs none
        sw[7] = 2.0
        d = ridge_loo_decomposition(X, y, sw)
        assert np.isfinite(float(ridge_loo_value_and_grad(d, 0.0)[0][0]))
        assert np.isfinite(float(RidgeLOO(X, y, sw)(torch.zeros(5, dtype=DT))))
    assert np.isfinite(float(RidgeLOO(X, y, sw, fit_intercept=False)(torch.zeros(5, dtype=DT))))


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_data_are_refused(bad):
    """A NaN or an infinity in X or y gave RidgeFolds (dense or sparse X, primal
    or dual) and RidgeLOO a NaN value and NaN hypergradients, silently."""
    X, y, train = _data()
    Xb, yb = X.clone(), y.clone()
    Xb[3, 1] = bad
    yb[4] = bad
    for args in ((Xb, y), (Xb.to_sparse_csr(), y), (X, yb)):
        for method in ("primal", "dual"):
            with pytest.raises(ValueError, match="RidgeFolds: X and y must be finite"):
                RidgeFolds(*args, train, 1 - train, method=method)
    for args in ((Xb, y), (X, yb)):
        with pytest.raises(ValueError, match="RidgeLOO: X and y must be finite"):
            RidgeLOO(*args)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_phi_is_refused(bad):
    """A NaN log-penalty gave RidgeFolds and RidgeLOO a NaN value silently
    (LogisticFolds: "the inner objective is not finite at the starting
    point", which blamed the data); an infinite one a value at a zero or
    infinite penalty. Every fold problem, and the reparametrized ones (one
    map from phi to the penalties), now refuse it."""
    X, y, train = _data()
    phi = torch.zeros(5, dtype=DT)
    phi[2] = bad
    problems = [
        RidgeFolds(X, y, train, 1 - train, method="primal"),
        RidgeFolds(X, y, train, 1 - train, method="dual"),
        LogisticFolds(X, (y > 0).long(), 2, train, 1 - train),
        RidgeLOO(X, y),
    ]
    match = r"phi \(log-penalties\) must be finite; got 1 non-finite value\(s\), the first phi\[2\]"
    for problem in problems:
        for method in ("value_and_grad", "value_grad_hessian"):
            if hasattr(problem, method):
                with pytest.raises(ValueError, match=match):
                    getattr(problem, method)(phi)
    grouped = problems[0].reparametrized(groups=torch.tensor([0, 0, 1, 1, 2]))
    with pytest.raises(ValueError, match=r"phi\[1\]"):
        grouped.value_and_grad(torch.tensor([0.0, bad, 0.0], dtype=DT))


@pytest.mark.parametrize("method", ["primal", "dual"])
def test_value_grad_hessian_takes_phi_of_another_precision(method):
    """``value_grad_hessian`` with a float32 ``phi`` on float64 data failed in
    torch ("expected scalar type Double but found Float", RidgeFolds primal
    and dual, LogisticFolds), where ``value_and_grad`` took it. It now works
    in the data's precision: the same numbers as ``phi.double()``."""
    X, y, train = _data(n=40, p=6)
    groups = torch.tensor([0, 1, 2, 0, 1, 2])
    phi32 = torch.tensor([0.2, -0.4, 1.1], dtype=torch.float32)
    folds = RidgeFolds(X, y, train, 1 - train, groups=groups, method=method)
    got, ref = folds.value_grad_hessian(phi32), folds.value_grad_hessian(phi32.double())
    for a, b in zip(got, ref):
        assert a.dtype == DT
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    if method == "primal":
        logistic = LogisticFolds(X, (y > 0).long(), 2, train, 1 - train, groups=groups)
        got = logistic.value_grad_hessian(phi32)
        logistic.theta_ = None
        ref = logistic.value_grad_hessian(phi32.double())
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


def test_non_integer_labels_are_refused():
    """Float group labels and class indices were truncated by ``.long()``
    silently: ``groups=[0, 0.5, 1, 1, 1]`` gave two groups (0.5 -> 0) and
    LogisticFolds took targets ``y + 0.5`` for ``y`` (value 0.710 either
    way). Integral floats are still taken."""
    X, y, train = _data()
    with pytest.raises(ValueError, match="non-integer values"):
        RidgeFolds(X, y, train, 1 - train, groups=torch.tensor([0.0, 0.5, 1.0, 1.0, 1.0]))
    labels = (y > 0).to(DT)
    with pytest.raises(ValueError, match="class indices"):
        LogisticFolds(X, labels + 0.5, 2, train, 1 - train)
    assert RidgeFolds(X, y, train, 1 - train, groups=torch.tensor([0.0, 1, 1, 2, 2])).n_groups == 3
    assert LogisticFolds(X, labels, 2, train, 1 - train).y.dtype == torch.long


def test_ridge_loo_dual_form_in_float32_with_spread_penalties():
    """RidgeLOO's Woodbury (dual) form, chosen for p > n, ran in float32 for
    float32 data: with penalties from 1e-6 to 1e6 (60 x 200) its LOO error
    was 0.00034 against 13.02 in float64, and its gradient all wrong
    (relative error 1.0). It now factors in float64, as RidgeFolds' dual form
    does: the float64 number to 1e-3, returned in float32."""
    rng = np.random.RandomState(0)
    X = rng.randn(60, 200)
    y = X[:, :5].sum(1) + 0.3 * rng.randn(60)
    phi = rng.uniform(-6, 6, 200) * np.log(10)
    ref = RidgeLOO(torch.tensor(X), torch.tensor(y), method="primal")
    value, grad, _ = ref.value_and_grad(torch.tensor(phi))
    loo = RidgeLOO(torch.tensor(X, dtype=torch.float32), torch.tensor(y, dtype=torch.float32))
    assert loo.method == "dual"
    v32, g32, _ = loo.value_and_grad(torch.tensor(phi, dtype=torch.float32))
    assert v32.dtype == g32.dtype == torch.float32
    assert abs(float(v32) - float(value)) < 1e-3 * float(value)
    assert float((g32.double() - grad).abs().max()) < 1e-2 * float(grad.abs().max())


def test_ridge_solver_refuses_non_integer_group_labels():
    """``RidgeSolver(penalty=torch.tensor([0.0, 0.5, 1.0]))`` truncated the
    labels to ``[0, 0, 1]`` silently (two groups, phi of shape (2,))."""
    X, y, _ = _data(p=3)
    with pytest.raises(ValueError, match="Group labels must be 3 non-negative integers"):
        RidgeSolver(X, y, penalty=torch.tensor([0.0, 0.5, 1.0]))
    assert RidgeSolver(X, y, penalty=torch.tensor([0.0, 1.0, 1.0])).phi_shape() == (2,)
