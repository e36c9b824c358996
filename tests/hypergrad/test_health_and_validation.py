"""Health records of the unrolled strategies, and parameter validation.

Regression tests for a QA sweep of the core: diverging unrolled steps gave a
NaN hypergradient without a word, ``inner_converged`` was never set by the
unrolled strategies, out-of-range tolerances and steps were accepted, and a
string solver failed deep inside.
"""

import math
import warnings

import pytest
import torch

from skbilevel.hypergrad import (
    LBFGS,
    Adam,
    GradientDescent,
    ImplicitCG,
    ImplicitDense,
    ImplicitIdentity,
    ImplicitNeumann,
    InnerSolveWarning,
    NewtonCG,
    UnrolledForward,
    argmin,
)

DT = torch.float64
UNROLLED = ["reverse", "forward", "truncated", "first_order"]
ONE_STEP = ["lookahead", "darts"]


def ridge(seed=0, nan=False):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(20, 3, dtype=DT, generator=gen)
    y = torch.randn(20, dtype=DT, generator=gen)
    if nan:
        X[0, 0] = math.nan

    def inner(w, p):
        return 0.5 * ((X @ w - y) ** 2).sum() + 0.5 * p.exp() * (w**2).sum()

    return inner


def run(strategy, solver, inner=None):
    inner = ridge() if inner is None else inner
    phi = torch.tensor(0.0, dtype=DT, requires_grad=True)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        w, info = argmin(inner, phi, torch.zeros(3, dtype=DT),
                         hypergradient=strategy, solver=solver)
        (w**2).sum().backward()
    caught = [r for r in rec if issubclass(r.category, InnerSolveWarning)]
    return phi.grad, info, caught


# ----------------------------------------------------------- 4: divergence


@pytest.mark.parametrize("strategy", UNROLLED + [UnrolledForward(method="jvp")])
def test_diverging_unrolled_steps_warn_with_the_step_and_norms(strategy):
    # lr=1 on a Hessian with lambda_max ~ 30: the iterates blow up
    grad, info, caught = run(strategy, GradientDescent(lr=1.0, n_steps=200))
    assert not torch.isfinite(grad).all() or strategy == "first_order"
    assert info.inner_converged is False
    assert len(caught) == 1
    message = str(caught[0].message)
    step = info.extra["nonfinite_step"]
    assert 0 < step <= 200
    assert f"not finite at step {step} of 200" in message
    assert "1.073e+01 at the start" in message and "lower the solver's lr=1" in message
    assert caught[0].filename == __file__  # points at the argmin call


def test_diverging_steps_with_a_tensor_learning_rate_name_its_value():
    lr = torch.tensor(1.0, dtype=DT, requires_grad=True)
    _, info, caught = run("reverse", GradientDescent(lr=lr, n_steps=200))
    assert info.inner_converged is False and "lr=1" in str(caught[0].message)


@pytest.mark.parametrize("strategy", UNROLLED + ONE_STEP)
def test_nan_data_warn_at_the_start(strategy):
    _, info, caught = run(strategy, GradientDescent(lr=0.01, n_steps=5),
                          inner=ridge(nan=True))
    assert info.inner_converged is False and info.extra["nonfinite_step"] == 0
    assert len(caught) == 1
    assert "not finite at the starting point (value nan" in str(caught[0].message)


def test_check_inner_false_still_catches_non_finite_parameters():
    from skbilevel.hypergrad import UnrolledReverse

    solver = GradientDescent(lr=1.0, n_steps=2000)  # overflows to inf, then nan
    _, info, caught = run(UnrolledReverse(check_inner=False), solver)
    assert info.inner_grad_norm is None and info.inner_converged is False
    assert len(caught) == 1 and "of 2000" in str(caught[0].message)
    _, info, caught = run(UnrolledReverse(check_inner=False),
                          GradientDescent(lr=0.01, n_steps=20))
    assert info.inner_converged is None and not caught


# --------------------------------------------------- 10: inner_converged


@pytest.mark.parametrize("strategy", UNROLLED)
def test_unrolled_inner_converged_follows_the_fixed_step_rule(strategy):
    # lr = 1 / lambda_max-ish and many steps: the gradient reaches rounding
    _, done, caught = run(strategy, GradientDescent(lr=0.03, n_steps=3000))
    assert done.inner_grad_norm <= 1e-10 and done.inner_converged is True
    assert done.extra["inner_tol"] == 1e-10
    # a step budget short of the optimum: not converged, and no warning
    _, short, caught = run(strategy, GradientDescent(lr=0.01, n_steps=20))
    assert short.inner_grad_norm > 1e-10 and short.inner_converged is False
    assert not caught


@pytest.mark.parametrize("strategy", ONE_STEP)
def test_one_step_strategies_are_judged_too(strategy):
    _, info, caught = run(strategy, GradientDescent(lr=0.01))
    assert info.inner_converged is False and not caught


def test_float32_uses_the_float32_tolerance():
    phi = torch.tensor(0.0, requires_grad=True)
    _, info = argmin(lambda w, p: 0.5 * ((w - p) ** 2).sum(), phi, torch.ones(2),
                     hypergradient="reverse", solver=Adam(lr=0.1, n_steps=5))
    assert info.extra["inner_tol"] == 1e-5 and info.inner_converged is False


# ------------------------------------------------------- 5: validation


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda v: ImplicitIdentity(step=v), "step"),
        (lambda v: ImplicitNeumann(step=v), "step"),
        (lambda v: ImplicitNeumann(tol=v), "tol"),
        (lambda v: ImplicitCG(tol=v), "tol"),
        (lambda v: ImplicitDense(tol=v), "tol"),
        (lambda v: LBFGS(tol=v), "tol"),
        (lambda v: NewtonCG(tol=v), "tol"),
    ],
)
@pytest.mark.parametrize("value", [0.0, -1.0, math.nan, math.inf, "1e-3", True])
def test_non_positive_tolerances_and_steps_are_rejected(make, name, value):
    with pytest.raises(ValueError, match=f"{name} must be None or a positive finite"):
        make(value)


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda v: LBFGS(max_iter=v), "max_iter"),
        (lambda v: NewtonCG(max_iter=v), "max_iter"),
        (lambda v: NewtonCG(cg_maxiter=v), "cg_maxiter"),
        (lambda v: ImplicitCG(maxiter=v), "maxiter"),
        (lambda v: ImplicitNeumann(n_terms=v), "n_terms"),
        (lambda v: LBFGS(history_size=v), "history_size"),
        (lambda v: LBFGS(max_ls=v), "max_ls"),
    ],
)
@pytest.mark.parametrize("value", [0, -1, 2.5])
def test_iteration_budgets_below_one_are_rejected(make, name, value):
    with pytest.raises(ValueError, match=f"{name} must be .*an integer >= 1"):
        make(value)


def test_valid_values_and_defaults_are_kept():
    assert ImplicitIdentity(step=0.5).step == 0.5 and ImplicitIdentity().step is None
    assert LBFGS(tol=1e-8, max_iter=1, min_iter=0).max_iter == 1
    assert NewtonCG(cg_maxiter=None, min_iter=2).min_iter == 2
    assert ImplicitCG(tol=1e-3, maxiter=1).maxiter == 1
    with pytest.raises(ValueError, match="min_iter must be an integer >= 0"):
        LBFGS(min_iter=-1)


def test_identity_step_zero_was_a_silent_zero_gradient():
    # the old behaviour: phi.grad == 0 exactly, no warning; now refused up front
    with pytest.raises(ValueError, match="step"):
        ImplicitIdentity(step=0.0)
    grad, _, _ = run(ImplicitIdentity(step=0.01), LBFGS())
    assert float(grad) != 0.0


# ------------------------------------------------ 8: solver type checks


@pytest.mark.parametrize("strategy", ["cg", "reverse", "closed_form"])
def test_a_string_solver_is_a_type_error_naming_it(strategy):
    pattern = r"InnerSolver instance \(e\.g\. LBFGS\(\).*'lbfgs'"
    with pytest.raises(TypeError, match=pattern):
        argmin(ridge(), torch.tensor(0.0, dtype=DT), torch.zeros(3, dtype=DT),
               hypergradient=strategy, solver="lbfgs")


def test_a_solver_class_is_a_type_error_asking_for_an_instance():
    with pytest.raises(TypeError, match=r"got the class LBFGS: pass LBFGS\(\)"):
        argmin(ridge(), torch.tensor(0.0, dtype=DT), torch.zeros(3, dtype=DT),
               solver=LBFGS)
