"""Regression tests of a QA pass on the fold problems and closed-form ridge
(``skbilevel.hypergrad._penalized``, ``skbilevel.hypergrad._closed_form``).

Each test fails on the code before its fix; the numbers in the docstrings are
the ones measured there.
"""

import math
import warnings

import numpy as np
import pytest
import torch

from skbilevel.hypergrad import (
    InnerSolveWarning,
    LogisticFolds,
    RidgeFolds,
    RidgeLOO,
    RidgeSolver,
    adaptive_penalty_basis,
    penalty_per_feature,
    ridge_loo_curve,
    ridge_loo_decomposition,
    ridge_loo_value_and_grad,
)
from skbilevel.hypergrad._sparse import to_csr

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


# --------------------------------------------------------------------------
# phi's type and precision, the range of exp(phi), basis and pilot checks
# --------------------------------------------------------------------------


def test_float64_phi_on_float32_data():
    """A float64 phi on float32 data (the common mix) failed inside torch:
    ``RidgeLOO`` (primal) with "linalg.solve: Expected A and B to have the same
    dtype", ``LogisticFolds.value_and_grad`` with "dot : expected both vectors
    to have same dtype". phi is now cast to the data's precision (as
    ``value_grad_hessian`` does) and the gradient comes back in phi's."""
    X, y, train = _data(n=30, p=4)
    phi = torch.zeros(4, dtype=DT)
    for y32 in (y, y.float()):
        loo = RidgeLOO(X.float(), y32)
        ref = RidgeLOO(X.float(), y32)(phi.float())
        assert float(loo(phi)) == pytest.approx(float(ref), rel=1e-6)
        value, grad, _ = loo.value_and_grad(phi)
        assert grad.dtype == DT and bool(torch.isfinite(grad).all())
    for classes, labels in ((2, (y > 0).long()), (3, (y > -0.5).long() + (y > 0.5).long())):
        folds = LogisticFolds(X.float(), labels, classes, train, 1 - train)
        value, grad, _, _ = folds.value_and_grad(phi)
        ref = LogisticFolds(X.float(), labels, classes, train, 1 - train).value_and_grad(
            phi.float()
        )
        assert grad.dtype == DT
        assert float(value) == pytest.approx(float(ref[0]), rel=1e-5)
        assert torch.allclose(grad.float(), ref[1], rtol=1e-3, atol=1e-6)


def test_numpy_phi_is_refused_clearly():
    """A numpy phi failed with "'numpy.ndarray' object has no attribute
    'detach'" (``RidgeLOO.__call__`` and ``value_and_grad``,
    ``RidgeFolds.value_and_grad``, ``LogisticFolds.value_and_grad``)."""
    X, y, train = _data(n=30, p=4)
    phi = np.zeros(4)
    calls = [
        RidgeLOO(X, y),
        RidgeLOO(X, y).value_and_grad,
        RidgeFolds(X, y, train, 1 - train).value_and_grad,
        RidgeFolds(X, y, train, 1 - train).closed_form,
        LogisticFolds(X, (y > 0).long(), 2, train, 1 - train).value_and_grad,
    ]
    for call in calls:
        with pytest.raises(TypeError, match=r"phi must be a torch tensor.*torch\.as_tensor"):
            call(phi)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_penalties_that_overflow_or_underflow_are_refused(dtype):
    """``exp(phi)`` past the dtype's range gave NaN silently. Float64
    (30 x 4): ``RidgeLOO`` and ``RidgeFolds`` at phi = 710 a finite value and
    a NaN gradient; ``LogisticFolds`` at 800 "The inner objective is not
    finite at the starting point ... check the initialization and the data".
    The dual forms (10 x 25) at -360 a finite value and a NaN gradient (their
    gradients form 1 / alpha^2), at -709 a NaN value. Float32: NaN gradients
    past 89 and, in the dual forms, from -88 down. Inside the limits every
    value and gradient is finite."""
    limit = "log-penalties must lie in"
    X, y, train = _data(n=30, p=4)
    X, y = X.to(dtype), y.to(dtype)
    hi = 710.0 if dtype == torch.float64 else 89.0
    lo = -709.0 if dtype == torch.float64 else -88.0
    problems = [
        (RidgeLOO(X, y).value_and_grad, 4),
        (RidgeFolds(X, y, train, 1 - train).value_and_grad, 4),
        (LogisticFolds(X, (y > 0).long(), 2, train, 1 - train).value_and_grad, 4),
    ]
    Xw, yw, tw = _data(n=10, p=25)
    Xw, yw = Xw.to(dtype), yw.to(dtype)
    dual = [
        (RidgeLOO(Xw, yw).value_and_grad, 25),
        (RidgeFolds(Xw, yw, tw, 1 - tw).value_and_grad, 25),
    ]
    for f, p in problems + dual:
        for level in (hi, lo, 800.0):
            with pytest.raises(ValueError, match=limit):
                f(torch.full((p,), level, dtype=dtype))
        value, grad = f(torch.full((p,), hi - 2.0, dtype=dtype))[:2]
        assert math.isfinite(float(value)) and bool(torch.isfinite(grad).all())
    if dtype == torch.float64:
        for f, p in dual:
            with pytest.raises(ValueError, match=r"\[-354\.9, 709\.8\].*dual form"):
                f(torch.full((p,), -360.0, dtype=dtype))
            value, grad = f(torch.full((p,), -350.0, dtype=dtype))[:2]
            assert math.isfinite(float(value)) and bool(torch.isfinite(grad).all())
    # one phi entry out of range through a basis is caught too
    basis = torch.ones(4, 2, dtype=dtype)
    folds = RidgeFolds(X, y, train, 1 - train, basis=basis)
    with pytest.raises(ValueError, match=limit):
        folds.value_and_grad(torch.tensor([hi - 10.0, 10.0], dtype=dtype))


@pytest.mark.parametrize("what", ["basis", "log_offset"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_basis_or_offset_is_refused(what, bad):
    """A NaN (or infinite) ``basis`` or ``log_offset`` gave a NaN value and
    gradient silently (phi itself was checked); now refused at construction."""
    X, y, train = _data(n=30, p=3)
    kwargs = {
        "basis": torch.full((3, 2), bad, dtype=DT),
        "log_offset": torch.full((3,), bad, dtype=DT),
    }
    with pytest.raises(ValueError, match=f"{what} must be finite"):
        RidgeFolds(X, y, train, 1 - train, **{what: kwargs[what]})
    with pytest.raises(ValueError, match=f"{what} must be finite"):
        RidgeFolds(X, y, train, 1 - train).reparametrized(**{what: kwargs[what]})
    with pytest.raises(ValueError, match=f"{what} must be finite"):
        LogisticFolds(X, (y > 0).long(), 2, train, 1 - train).reparametrized(
            **{what: kwargs[what]}
        )


@pytest.mark.parametrize("eps", [0.0, -1.0, float("nan"), float("inf")])
def test_adaptive_penalty_basis_refuses_bad_eps(eps):
    """``eps = 0`` and ``eps = -1`` gave a NaN second column silently (log 0
    and log of a negative number for a zero pilot coefficient)."""
    coef = torch.tensor([[2.0, 1.0, 0.0]], dtype=DT)
    with pytest.raises(ValueError, match="eps must be a positive finite number"):
        adaptive_penalty_basis(coef, eps=eps)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_adaptive_penalty_basis_refuses_non_finite_coef(bad):
    """A NaN (or infinite) pilot coefficient made the whole second column NaN,
    silently."""
    coef = torch.tensor([[2.0, bad, 0.0]], dtype=DT)
    with pytest.raises(ValueError, match="coef must be finite"):
        adaptive_penalty_basis(coef)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_adaptive_penalty_basis_does_not_depend_on_the_scale(dtype):
    """The basis depends on the pilot's relative sizes only, but its squares
    overflowed or underflowed: float64 ``coef * 1e200`` gave a NaN second
    column, ``coef * 1e-200`` an all-zero one (u = 0 everywhere); float32 the
    same at 1e30 and 1e-30. Now scaled by a power of two per fold first: the
    same basis at every scale, and the very same bits on ordinary pilots."""
    g = torch.Generator().manual_seed(0)
    coef = torch.randn(3, 12, generator=g, dtype=DT).to(dtype)
    coef[:, ::4] = 0
    coef[2] = 0  # an all-zero pilot: a constant column
    groups = torch.arange(12) // 2
    ref = adaptive_penalty_basis(coef, groups)
    assert bool(torch.isfinite(ref).all()) and bool(ref[0, :, 1].std() > 0)
    big, small = (1e200, 1e-200) if dtype == torch.float64 else (1e30, 1e-30)
    for scale in (big, small, 2.0**-20):
        out = adaptive_penalty_basis(coef * scale, groups)
        assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5)
    # a power of two scales exactly: identical bits
    assert torch.equal(adaptive_penalty_basis(coef * 2.0**-20, groups), ref)


def test_penalty_per_feature_validates_groups():
    """A label -1 took the last group's penalty silently; a label past the
    last group (5) or a float label failed inside torch with an IndexError; a
    numpy phi with "'numpy.ndarray' object has no attribute 'exp'"."""
    phi = torch.zeros(2, dtype=DT)
    with pytest.raises(ValueError, match="non-negative integers"):
        penalty_per_feature(phi, torch.tensor([0, 0, -1]))
    with pytest.raises(ValueError, match=r"labels in \[0, 2\).*got a label 5"):
        penalty_per_feature(phi, torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="non-integer"):
        penalty_per_feature(phi, torch.tensor([0.0, 0.5]))
    with pytest.raises(TypeError, match="phi must be a torch tensor"):
        penalty_per_feature(np.zeros(2), torch.tensor([0, 1]))
    # integer-valued float labels and lists still work
    out = penalty_per_feature(torch.tensor([0.0, 1.0], dtype=DT), [0.0, 1.0, 1.0])
    assert torch.allclose(out, torch.tensor([1.0, math.e, math.e], dtype=DT))


@pytest.mark.parametrize("method", ["primal", "dual"])
def test_solve_fallbacks_take_phi_of_another_precision(method):
    """Where the Cholesky factorization fails (penalties 1e-13 on a rank-6 Gram
    matrix of 25 features), the primal form's LU fallback raised "linalg.solve:
    Expected A and B to have the same dtype" for a float64 phi on float32
    data."""
    X, y, train = _data(n=12, p=25)
    folds = RidgeFolds(X.float(), y.float(), train.float(), (1 - train).float(), method=method)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value, grad, _, _ = folds.value_and_grad(torch.full((25,), -30.0, dtype=DT))
    assert math.isfinite(float(value)) and grad.dtype == DT


def test_auto_method_follows_the_folds_training_rows():
    """``method="auto"`` compared the features with all the rows: with as many
    rows as features or more but fewer in each fold's training part, it took
    the primal form, whose Gram matrices are then singular. At tiny penalties
    its value was silently wrong (e^-30: 56.4 against 53.8 for the exact
    Woodbury form, hypergradient 45% off; e^-40: 81787)."""
    g = torch.Generator().manual_seed(0)
    n, p = 120, 110
    X = torch.randn(n, p, generator=g, dtype=DT)
    y = X @ torch.randn(p, generator=g, dtype=DT) + 0.01 * torch.randn(n, generator=g, dtype=DT)
    train = torch.ones(5, n, dtype=DT)
    for k in range(5):
        train[k, 24 * k : 24 * (k + 1)] = 0  # 96 training rows per fold < 110
    auto = RidgeFolds(X, y, train, 1 - train)
    assert auto.method == "dual"
    # the first fold alone with 110 training rows or more: primal
    wide_fold = train.clone()
    wide_fold[0] = 1.0
    wide_fold[0, :5] = 0
    assert RidgeFolds(X, y, wide_fold, 1 - wide_fold).method == "primal"
    # one fold given as a vector of weights: all its rows
    assert RidgeFolds(X, y, torch.ones(n, dtype=DT)).method == "primal"
    # exact at tiny penalties, as a float64 reference of the Woodbury form
    reference = RidgeFolds(X, y, train, 1 - train, method="dual")
    for level in (-10.0, -30.0, -40.0):
        phi = torch.full((p,), level, dtype=DT)
        value, grad = auto.value_and_grad(phi)[:2]
        exact, exact_grad = reference.value_and_grad(phi)[:2]
        assert float(value) == pytest.approx(float(exact), rel=1e-10)
        torch.testing.assert_close(grad, exact_grad, rtol=1e-8, atol=0.0)
    # the primal form, still available by name, agrees where it is well-conditioned
    phi = torch.full((p,), -10.0, dtype=DT)
    primal = RidgeFolds(X, y, train, 1 - train, method="primal").value_and_grad(phi)[0]
    assert float(primal) == pytest.approx(float(reference.value_and_grad(phi)[0]), rel=1e-8)


def test_primal_form_on_singular_fold_grams_warns_where_it_loses_accuracy():
    """``method="primal"`` on folds with fewer training rows than features was
    silently wrong at tiny penalties (e^-30: coefficients 7.7% off, e^-40: 15
    times their size). It now warns once the estimated error passes 1e-6."""
    g = torch.Generator().manual_seed(0)
    n, p = 30, 50
    X = torch.randn(n, p, generator=g, dtype=DT)
    y = torch.randn(n, generator=g, dtype=DT)
    train = torch.ones(2, n, dtype=DT)
    train[0, :15] = 0
    train[1, 15:] = 0
    exact = RidgeFolds(X, y, train, method="dual")
    for level, off in ((-10.0, 1e-8), (-20.0, 1e-4), (-30.0, 1.0)):
        phi = torch.full((p,), level, dtype=DT)
        primal = RidgeFolds(X, y, train, method="primal")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            coef = primal.closed_form(phi)
            primal.closed_form(phi)  # once per problem
        truth = exact.closed_form(phi)
        error = float((coef - truth).norm() / truth.norm())
        assert error < off
        if level == -10.0:
            assert not caught
            continue
        assert len(caught) == 1 and caught[0].category is InnerSolveWarning
        message = str(caught[0].message)
        assert "span fewer dimensions than the 50 features" in message
        assert "method='dual'" in message
        estimate = float(message.split("off by about ")[1].split(" ")[0])
        assert estimate / 30 < error < estimate * 30  # the right order of magnitude
    # large penalties beside small ones are harmless (Cholesky does not mind the
    # scaling) and do not warn
    phi = torch.linspace(-12.0, 25.0, p, dtype=DT)
    with warnings.catch_warnings():
        warnings.simplefilter("error", InnerSolveWarning)
        coef = RidgeFolds(X, y, train, method="primal").closed_form(phi)
    torch.testing.assert_close(coef, exact.closed_form(phi), rtol=1e-9, atol=1e-12)


def _mp_ridge(X, y, alpha, rhs=None):
    """``(Xc^T Xc + diag(alpha))^{-1} Xc^T yc`` (or ``^{-1} rhs``) of one fold
    (rows centred at their exact mean), at 60 digits."""
    mpmath = pytest.importorskip("mpmath")
    with mpmath.workdps(60):
        m, p = X.shape
        Xm, ym = mpmath.matrix(X.tolist()), mpmath.matrix(y.tolist())
        mu = [mpmath.fsum(Xm[i, j] for i in range(m)) / m for j in range(p)]
        ybar = mpmath.fsum(ym) / m
        Xc = mpmath.matrix(m, p)
        for i in range(m):
            for j in range(p):
                Xc[i, j] = Xm[i, j] - mu[j]
        A = Xc.T * Xc
        for j in range(p):
            A[j, j] += mpmath.mpf(float(alpha[j]))
        b = Xc.T * mpmath.matrix([ym[i] - ybar for i in range(m)])
        if rhs is not None:
            b = mpmath.matrix(rhs.tolist())
        return np.array([float(v) for v in mpmath.lu_solve(A, b)])


def _two_wide_folds(dtype=DT):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(30, 50, generator=g, dtype=DT).to(dtype).double()
    y = (X[:, :5] @ torch.randn(5, generator=g, dtype=DT)).to(dtype).double()
    train = torch.ones(2, 30, dtype=DT)
    train[0, :15] = 0
    train[1, 15:] = 0
    return X, y, train


def _dual_errors(alpha, dtype=DT, sparse=False):
    """Relative errors of ``RidgeFolds(method="dual")`` on two folds of 15 x
    50 at penalties ``alpha`` (an InnerSolveWarning is an error), against
    mpmath: the coefficients' (worst fold), and the gradient's in ``alpha``
    of their sum (``-(H^-1 1) * w`` summed over folds)."""
    X, y, train = _two_wide_folds(dtype)
    Xd = to_csr(X.to(dtype)) if sparse else X.to(dtype)
    folds = RidgeFolds(Xd, y.to(dtype), train.to(dtype), method="dual")
    a = alpha.clone().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", InnerSolveWarning)
        coef = folds.coef(a)
        coef.sum().backward()
    assert coef.dtype == dtype
    assert folds.last_fallback is None  # no least-squares or autograd fallback
    errors, grad = [], torch.zeros_like(alpha)
    for k in range(2):
        rows = (train[k] > 0).numpy()
        Xk, yk = X.numpy()[rows], y.numpy()[rows]
        exact = _mp_ridge(Xk, yk, alpha.numpy())
        error = np.linalg.norm(coef[k].detach().double().numpy() - exact)
        errors.append(error / np.linalg.norm(exact))
        grad -= torch.tensor(_mp_ridge(Xk, yk, alpha.numpy(), rhs=np.ones(50)) * exact)
    return max(errors), float((a.grad - grad).norm() / grad.norm())


@pytest.mark.parametrize("level, tol", [(20.0, 1e-12), (30.0, 5e-8)])
def test_dual_form_with_penalties_far_below_their_features_is_refined(level, tol):
    """The Woodbury form lost the digits that ``|x_j|^2 / alpha_j`` costs when
    a penalty sat far below its feature's squared norm: penalties at e^-30 and
    e^-15 on folds of 15 x 50 gave coefficients 2.2e-4 off, silently (e^-20
    and e^-10: 1.9e-8). Iterative refinement against the residual brings
    the coefficients and the gradient in alpha to 9e-9 (2e-14)."""
    alpha = torch.ones(50, dtype=DT)
    alpha[0], alpha[1] = math.exp(-level), math.exp(-level / 2)
    coef_error, grad_error = _dual_errors(alpha)
    assert coef_error < tol and grad_error < tol


def test_dual_form_warns_where_refinement_cannot_save_it():
    """At a penalty e^-40 (3e-19 times its feature's squared norm) the
    factorization of ``I + Xs A^-1 Xs^T`` keeps nothing of the rest: the
    coefficients were 600 times off, silently. An InnerSolveWarning now says
    so, with the residual and the remedy."""
    X, y, train = _two_wide_folds()
    alpha = torch.ones(50, dtype=DT)
    alpha[0] = math.exp(-40.0)
    folds = RidgeFolds(X, y, train, method="dual")
    match = "Woodbury form keeps a relative residual"
    with pytest.warns(InnerSolveWarning, match=match) as rec:
        folds.coef(alpha)
    message = str(rec[0].message)
    assert "down to 4.25e-18" in message and "off by about" in message
    assert "acts as no penalty at all" in message
    with warnings.catch_warnings():
        warnings.simplefilter("error", InnerSolveWarning)
        folds.coef(alpha)  # once per problem


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("level", [-20.0, -30.0, -40.0])
def test_dual_form_on_float32_rows_centres_them_in_float64(level, sparse):
    """float32 rows centred in float32 keep a mean of about eps times their
    size, which eliminating the intercept takes as zero: with every penalty
    at e^-30 the coefficients were 36% off (sparse: 32%; e^-20: 7e-5, e^-40:
    73%), silently. The Woodbury form now centres the rows in float64: 3e-8."""
    alpha = torch.full((50,), math.exp(level), dtype=DT)
    coef_error, grad_error = _dual_errors(alpha, torch.float32, sparse)
    assert coef_error < 1e-6 and grad_error < 1e-6


def test_dual_form_factors_by_lu_where_cholesky_fails():
    """With an intercept, ``M = I + Xs A^-1 Xs^T`` has an eigenvalue of 1 along
    the root weights; penalties from e^-50 to e^50 put entries of 1e22 beside
    it and Cholesky fails. The fallback then solved by LU through autograd:
    coefficients right, gradient in alpha 15% off. M is now factored by LU
    with partial pivoting and both solves are refined: 1.3e-4."""
    alpha = torch.exp(torch.linspace(-50.0, 50.0, 50, dtype=DT))
    coef_error, grad_error = _dual_errors(alpha)
    assert coef_error < 1e-6 and grad_error < 1e-3


def test_all_rows_problem_judges_its_own_gram_matrix():
    # the K-fold layout's all-rows problem reuses the folds' Gram matrix of all
    # rows, and it kept the folds' flag "singular Gram matrix": the final fit on
    # 30 rows and 25 features, exact to 6e-15 at penalties e^-30, warned that
    # its coefficients might be off by 1e-2
    g = torch.Generator().manual_seed(0)
    X = torch.randn(30, 25, generator=g, dtype=DT)
    y = torch.randn(30, generator=g, dtype=DT)
    train = torch.ones(3, 30, dtype=DT)
    for k in range(3):
        train[k, 10 * k : 10 * (k + 1)] = 0  # 20 training rows < 25 features
    folds = RidgeFolds(X, y, train, method="primal")
    phi = torch.full((25,), -30.0, dtype=DT)
    full = folds.all_rows(torch.ones(30, dtype=DT))
    assert full._all_rows is None and full.gram.shape == (1, 25, 25)  # reused
    with warnings.catch_warnings():
        warnings.simplefilter("error", InnerSolveWarning)
        coef = full.closed_form(phi)
    exact = RidgeFolds(X, y, torch.ones(30, dtype=DT), method="primal").closed_form(phi)
    torch.testing.assert_close(coef, exact, rtol=1e-12, atol=0.0)
    with pytest.warns(InnerSolveWarning, match="span fewer dimensions"):
        folds.closed_form(phi)  # the folds' own Gram matrices are singular
