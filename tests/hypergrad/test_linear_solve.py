"""Linear solvers of the implicit backward pass, on small explicit matrices."""

import math

import pytest
import torch

from skbilevel.hypergrad import (
    LinearSolveResult,
    solve_cg,
    solve_dense,
    solve_identity,
    solve_neumann,
)

DT = torch.float64


def _spd(n=20, cond=50.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    eig = torch.logspace(0, math.log10(cond), n, dtype=DT)
    A = Q @ torch.diag(eig) @ Q.T
    b = torch.randn(n, generator=g, dtype=DT)
    return 0.5 * (A + A.T), b


def _rel(a, b):
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


# ----------------------------------------------------------------------------- CG


def test_cg_solves_spd_system_and_counts_products():
    A, b = _spd()
    calls = []

    def matvec(v):
        calls.append(1)
        return A @ v

    x, res = solve_cg(matvec, b, tol=1e-12)
    assert isinstance(res, LinearSolveResult)
    assert _rel(x, torch.linalg.solve(A, b)) < 1e-10
    assert res.converged and res.residual <= 1e-12
    assert res.residual == pytest.approx(_rel(A @ x, b), rel=1e-6, abs=1e-15)
    assert res.n_matvec == len(calls) >= res.iterations + 1  # + the true-residual check
    assert res.fallback is None


def test_cg_scalar_rhs():
    x, res = solve_cg(lambda v: 4.0 * v, torch.tensor(2.0, dtype=DT))
    assert x.shape == () and float(x) == pytest.approx(0.5)
    assert res.converged and res.iterations == 1


def test_cg_zero_rhs_returns_exact_zero():
    A, b = _spd()
    x, res = solve_cg(lambda v: A @ v, torch.zeros_like(b))
    assert torch.equal(x, torch.zeros_like(b))
    assert res.converged and res.residual == 0.0 and res.n_matvec == 0


def test_cg_negative_curvature_stops_with_nonzero_finite_step():
    b = torch.tensor([1.0, -2.0, 0.5], dtype=DT)
    x, res = solve_cg(lambda v: -v, b)  # negative definite
    assert not res.converged
    assert "non-positive curvature" in res.message
    assert res.fallback is not None
    assert torch.isfinite(x).all() and torch.allclose(x, b)  # step |b^T A b| along b
    # Indefinite: stops when curvature turns non-positive, returns a finite iterate.
    A = torch.diag(torch.tensor([2.0, 1.0, -1.0, 3.0], dtype=DT))
    x, res = solve_cg(lambda v: A @ v, torch.ones(4, dtype=DT))
    assert torch.isfinite(x).all() and x.abs().sum() > 0
    assert not res.converged and math.isfinite(res.residual)


def test_cg_maxiter_on_ill_conditioned_system():
    A, b = _spd(n=30, cond=1e8)
    x, res = solve_cg(lambda v: A @ v, b, tol=1e-12, maxiter=3)
    assert not res.converged and res.iterations == 3
    assert res.residual > 1e-12 and "maxiter=3" in res.message
    assert torch.isfinite(x).all() and x.abs().sum() > 0


def test_cg_warm_start_and_bad_start():
    A, b = _spd()
    x_exact = torch.linalg.solve(A, b)
    x, res = solve_cg(lambda v: A @ v, b, x0=x_exact, tol=1e-10)
    assert res.iterations == 0 and res.converged
    _, cold = solve_cg(lambda v: A @ v, b, tol=1e-10)
    x, res = solve_cg(lambda v: A @ v, b, x0=1e6 * torch.ones_like(b), tol=1e-10)
    assert res.converged and res.iterations == cold.iterations  # ignored: worse than zero
    assert _rel(x, x_exact) < 1e-8


def test_cg_float32():
    A, b = _spd()
    A, b = A.float(), b.float()
    x, res = solve_cg(lambda v: A @ v, b, tol=1e-5)
    assert x.dtype == torch.float32 and res.converged


def test_cg_rejects_nonfinite_rhs():
    with pytest.raises(ValueError, match="not finite"):
        solve_cg(lambda v: v, torch.tensor([1.0, math.nan]))


# ------------------------------------------------------------------------- Neumann


def _badly_scaled(n=60, seed=0):
    """Diagonal spanning six decades plus a small SPD coupling: Jacobi's best case."""
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(n, n, generator=g, dtype=DT) / n
    A = torch.diag(torch.logspace(-2, 4, n, dtype=DT)) + B @ B.T
    return A, torch.randn(n, generator=g, dtype=DT)


@pytest.mark.parametrize("kind", ["diagonal", "callable"])
def test_preconditioned_cg_same_solution_far_fewer_iterations(kind):
    A, b = _badly_scaled()
    x_ref = torch.linalg.solve(A, b)
    d = A.diagonal().clone()
    pre = d if kind == "diagonal" else (lambda r: r / d)
    x0, r0 = solve_cg(lambda v: A @ v, b, tol=1e-13, maxiter=2000)
    x1, r1 = solve_cg(lambda v: A @ v, b, tol=1e-13, maxiter=2000, preconditioner=pre)
    assert r0.converged and r1.converged
    assert _rel(x1, x_ref) < 1e-10 and _rel(x1, x0) < 1e-10
    # the test is the true, unpreconditioned relative residual
    assert _rel(A @ x1, b) <= 1e-13 and r1.residual == pytest.approx(_rel(A @ x1, b))
    assert r1.iterations * 4 < r0.iterations
    assert r1.n_matvec == r1.iterations + 1


def test_preconditioned_cg_keeps_warm_start_scalar_and_zero_rhs():
    A, b = _spd()
    d = A.diagonal().clone()
    x_ref = torch.linalg.solve(A, b)
    x, res = solve_cg(lambda v: A @ v, b, x0=x_ref, tol=1e-8, preconditioner=d)
    assert res.iterations == 0 and res.n_matvec == 2 and res.converged
    x, res = solve_cg(lambda v: 2.0 * v, torch.tensor(3.0, dtype=DT),
                      preconditioner=torch.tensor(4.0, dtype=DT))
    assert float(x) == pytest.approx(1.5) and res.converged
    x, res = solve_cg(lambda v: A @ v, torch.zeros(20, dtype=DT), preconditioner=d)
    assert res.n_matvec == 0 and not bool(torch.any(x != 0))


def test_preconditioned_cg_negative_curvature_steps_along_preconditioned_b():
    A = -torch.eye(3, dtype=DT)
    b = torch.ones(3, dtype=DT)
    d = torch.tensor([1.0, 2.0, 4.0], dtype=DT)
    x, res = solve_cg(lambda v: A @ v, b, preconditioner=d)
    assert not res.converged and "non-positive curvature" in res.message
    assert "M^-1 b" in res.fallback
    z = b / d
    assert torch.allclose(x, float(b @ z) / float(z @ z) * z)


@pytest.mark.parametrize(
    "pre, match",
    [
        (torch.ones(5, dtype=DT), "shaped like b"),
        (torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=DT), "positive and finite"),
        (torch.tensor([1.0, -2.0, 1.0, 1.0], dtype=DT), "positive and finite"),
        (torch.tensor([1.0, math.nan, 1.0, 1.0], dtype=DT), "positive and finite"),
        (torch.tensor([1.0, math.inf, 1.0, 1.0], dtype=DT), "positive and finite"),
        (lambda r: r[:2], "shaped like b"),
        (lambda r: -r, "not positive definite"),
        (lambda r: r * math.nan, "not positive definite"),
        ("jacobi", "preconditioner must be"),
    ],
)
def test_preconditioned_cg_rejects_bad_preconditioner(pre, match):
    A, b = torch.eye(4, dtype=DT) * 2.0, torch.ones(4, dtype=DT)
    with pytest.raises(ValueError, match=match):
        solve_cg(lambda v: A @ v, b, preconditioner=pre)


def test_neumann_converges_and_residual_is_exact():
    A, b = _spd(cond=10.0)
    lam = float(torch.linalg.eigvalsh(A).max())
    x, res = solve_neumann(lambda v: A @ v, b, step=1.0 / lam, n_terms=300)
    assert _rel(x, torch.linalg.solve(A, b)) < 1e-8
    assert res.converged and res.n_matvec == res.iterations == 300
    assert res.residual == pytest.approx(_rel(A @ x, b), rel=1e-4)


def test_neumann_tol_stops_early():
    A, b = _spd(cond=10.0)
    lam = float(torch.linalg.eigvalsh(A).max())
    x, res = solve_neumann(lambda v: A @ v, b, step=1.0 / lam, n_terms=1000, tol=1e-6)
    assert res.converged and res.iterations < 1000 and res.residual <= 1e-6


def test_neumann_divergence_is_reported_and_finite():
    A, b = _spd(cond=10.0)
    x, res = solve_neumann(lambda v: A @ v, b, step=1.0, n_terms=20)
    assert not res.converged and res.residual > 1 and "diverges" in res.message
    assert torch.isfinite(x).all()
    # Terms overflowing to inf stop the sum before x becomes non-finite.
    x, res = solve_neumann(lambda v: A @ v, b, step=100.0, n_terms=10_000)
    assert torch.isfinite(x).all() and res.iterations < 10_000 and "non-finite" in res.message


def test_neumann_scalar_and_zero_rhs():
    x, res = solve_neumann(lambda v: 2.0 * v, torch.tensor(1.0, dtype=DT), step=0.25, n_terms=100)
    assert x.shape == () and float(x) == pytest.approx(0.5)
    x, res = solve_neumann(lambda v: 2.0 * v, torch.zeros(3, dtype=DT), step=0.25, n_terms=5)
    assert torch.equal(x, torch.zeros(3, dtype=DT)) and res.converged


def test_neumann_rejects_bad_parameters():
    with pytest.raises(ValueError, match="n_terms"):
        solve_neumann(lambda v: v, torch.ones(2), step=0.5, n_terms=0)
    with pytest.raises(ValueError, match="step"):
        solve_neumann(lambda v: v, torch.ones(2), step=-1.0, n_terms=3)


# --------------------------------------------------------------------------- dense


@pytest.mark.parametrize("method", ["auto", "cholesky", "lu"])
def test_dense_matrix_and_matvec_agree(method):
    A, b = _spd()
    x_exact = torch.linalg.solve(A, b)
    x, res = solve_dense(A, b, method=method)
    assert _rel(x, x_exact) < 1e-12 and res.converged and res.fallback is None
    x2, res2 = solve_dense(lambda v: A @ v, b, method=method)
    assert _rel(x2, x_exact) < 1e-12 and res2.n_matvec == b.numel()
    x3, res3 = solve_dense(lambda v: A @ v, b, method=method, vectorize=True)
    assert _rel(x3, x_exact) < 1e-12


def test_dense_fallbacks_are_recorded():
    A = torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=DT)  # symmetric indefinite
    b = torch.tensor([1.0, 0.0], dtype=DT)
    x, res = solve_dense(A, b, method="cholesky")
    assert "used LU" in res.fallback and _rel(A @ x, b) < 1e-12
    N = torch.tensor([[1.0, 2.0], [0.0, 1.0]], dtype=DT)  # not symmetric
    x, res = solve_dense(N, b, method="cholesky")
    assert "not symmetric" in res.fallback and _rel(N @ x, b) < 1e-12
    x, res = solve_dense(N, b, method="auto")
    assert res.fallback is None and _rel(N @ x, b) < 1e-12
    S = torch.tensor([[1.0, 1.0], [1.0, 1.0]], dtype=DT)  # singular
    x, res = solve_dense(S, torch.tensor([2.0, 2.0], dtype=DT), method="lu")
    assert "pseudo-inverse" in res.fallback and torch.allclose(x, torch.ones(2, dtype=DT))


def test_dense_scalar_zero_and_shape_errors():
    x, res = solve_dense(torch.tensor(4.0, dtype=DT), torch.tensor(2.0, dtype=DT))
    assert x.shape == () and float(x) == pytest.approx(0.5)
    x, res = solve_dense(torch.eye(3, dtype=DT), torch.zeros(3, dtype=DT))
    assert torch.equal(x, torch.zeros(3, dtype=DT)) and res.converged
    with pytest.raises(ValueError, match="method"):
        solve_dense(torch.eye(2), torch.ones(2), method="qr")
    with pytest.raises(ValueError, match=r"\(3, 3\) matrix"):
        solve_dense(torch.eye(2), torch.ones(3))


# ------------------------------------------------------------------------ identity


def test_identity():
    A, b = _spd()
    x, res = solve_identity(b, step=0.1)
    assert torch.equal(x, 0.1 * b) and res.converged is None and math.isnan(res.residual)
    x, res = solve_identity(b, step=0.1, matvec=lambda v: A @ v)
    assert res.residual == pytest.approx(_rel(A @ x, b)) and res.n_matvec == 1
    x, res = solve_identity(torch.tensor(3.0), step=2.0)
    assert float(x) == 6.0


def test_cg_stops_when_restarts_stagnate_at_rounding():
    # a residual of 1e-16 relative is below what float64 allows for this
    # system: CG stops after a restart that gains nothing, not at maxiter
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(40, 40, generator=g, dtype=torch.float64))
    A = Q @ torch.diag(torch.logspace(0, 12, 40, dtype=torch.float64)) @ Q.T
    b = torch.randn(40, generator=g, dtype=torch.float64)
    x, res = solve_cg(lambda v: A @ v, b, tol=1e-16, maxiter=2000,
                      preconditioner=lambda r: torch.linalg.solve(A, r))
    assert not res.converged and res.message.startswith("stagnated")
    assert res.iterations < 20
    assert res.residual < 1e-3  # about cond(A) * eps = 1e12 * 2e-16


def test_dense_solve_at_the_rounding_floor_is_converged_a_failed_one_is_not():
    # an SPD matrix with eigenvalues over 14 decades: Cholesky is backward
    # stable, yet its relative residual exceeds sqrt(eps) (the default tol)
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(40, 40, generator=g, dtype=DT))
    A = (Q * torch.logspace(-7, 7, 40, dtype=DT)) @ Q.T
    A = 0.5 * (A + A.T)
    b = torch.randn(40, generator=g, dtype=DT)
    x, res = solve_dense(A, b)
    assert res.residual > 1.5e-8  # the floor the old criterion flagged
    assert res.converged and "backward error" in res.message
    # b outside the range of a singular matrix: no x solves it, and the
    # least-squares answer keeps a large backward error
    S = torch.tensor([[1.0, 1.0], [1.0, 1.0]], dtype=DT)
    x, res = solve_dense(S, torch.tensor([1.0, -1.0], dtype=DT))
    assert not res.converged and "pseudo-inverse" in res.fallback


def test_bad_arguments_are_clear_errors():
    A, b = _spd(4)
    mv = lambda v: A @ v  # noqa: E731
    # numpy b: AttributeError 'numel'; integer b: a vector_norm RuntimeError
    with pytest.raises(TypeError, match="solve_cg: b must be a torch tensor"):
        solve_cg(mv, b.numpy())
    with pytest.raises(ValueError, match="b must hold floating-point values"):
        solve_cg(mv, torch.tensor([1, 2, 3, 4]))
    # a matrix as matvec: "'Tensor' object is not callable"
    with pytest.raises(TypeError, match="matvec must be a callable.*solve_dense"):
        solve_cg(A, b)
    # a matvec of the wrong size: torch's "inconsistent tensor size"
    for solve in (lambda m: solve_cg(m, b), lambda m: solve_neumann(m, b, 0.1, 10),
                  lambda m: solve_dense(m, b)):
        with pytest.raises(ValueError, match="matvec must return a tensor shaped like b"):
            solve(lambda v: torch.ones(3, dtype=DT))
    # x0 of another shape was ignored silently
    with pytest.raises(ValueError, match="x0 must be a tensor shaped like b"):
        solve_cg(mv, b, x0=torch.zeros(3, dtype=DT))
    # tol=-1 ran and reported converged=False whatever the residual
    with pytest.raises(ValueError, match="solve_cg: tol must be a finite number >= 0"):
        solve_cg(mv, b, tol=-1.0)
    with pytest.raises(ValueError, match="solve_dense: tol must be None or"):
        solve_dense(A, b, tol=float("nan"))
    # a NaN matrix: "atol must be greater than or equal to zero, but got -nan"
    with pytest.raises(ValueError, match="solve_dense: the matrix A is not finite"):
        solve_dense(A * float("nan"), b)
    with pytest.raises(ValueError, match="solve_dense: b is not finite"):
        solve_dense(A, b * float("inf"))
    # step=0 returned a silent zero; inf a NaN-free but meaningless infinity
    for step in (0.0, float("inf"), -1.0):
        with pytest.raises(ValueError, match="solve_identity: step must be a positive finite"):
            solve_identity(b, step)
        with pytest.raises(ValueError, match="solve_neumann: step must be a positive finite"):
            solve_neumann(mv, b, step, 10)
    x, _ = solve_identity(b, torch.tensor(0.5, dtype=DT))  # a 0-d tensor step is fine
    assert torch.equal(x, 0.5 * b)


# ------------------------------------------- right-hand sides of extreme magnitude

_A2 = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=DT)
_B2 = torch.tensor([1.0, 2.0], dtype=DT)


@pytest.mark.parametrize(
    "dtype, factor",
    [
        (torch.float32, 1e-25),  # ||b||^2 underflows
        (torch.float32, 1e-40),  # subnormal entries
        (torch.float32, 1e25),  # ||b||^2 overflows
        (DT, 1e-170),
        (DT, 1e160),
    ],
)
def test_cg_rhs_whose_norm_underflows_or_overflows_is_solved(dtype, factor):
    """Before the fix ``solve_cg(lambda v: v, [1, 2] * 1e-25)`` (float32) and
    ``* 1e-170`` (float64) returned x = [0, 0] with converged=True and 'b = 0:
    the solution is 0.', and ``* 1e160`` (float64) raised 'not finite (norm
    inf)', although every entry of b was finite."""
    A, b = _A2.to(dtype), (_B2 * factor).to(dtype)
    x_ref = torch.linalg.solve(_A2, b.double() / factor)  # in float64, ordinary b
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    x, res = solve_cg(lambda v: A @ v, b, tol=tol)
    assert x.dtype == dtype and res.converged and res.iterations >= 1
    assert "b = 0" not in res.message
    fi = torch.finfo(dtype)
    # (a subnormal x holds fewer bits: up to a few of its smallest spacings off)
    torch.testing.assert_close(x, (x_ref * factor).to(dtype), rtol=10 * tol,
                               atol=4 * fi.tiny * fi.eps)
    # a warm start at the answer is taken, in b's units
    x2, res2 = solve_cg(lambda v: A @ v, b, x0=x, tol=tol)
    assert res2.warm_started and res2.iterations == 0 and torch.equal(x2, x)


def test_cg_scaling_is_exact_and_preconditioner_and_warm_start_follow():
    """Before the fix b * 2^-600 was 'b = 0' (x = 0) and b * 2^600 'not
    finite'. The power-of-two scaling is exact: the solution of b * 2^k is the
    solution of b times 2^k, bit for bit, with the same residual and counts."""
    A, b = _spd()
    d = A.diagonal().clone()
    x0 = torch.linalg.solve(A, b) + 1e-3
    ref, r_ref = solve_cg(lambda v: A @ v, b, x0=x0, preconditioner=d)
    assert r_ref.warm_started
    for k in (-600, -300, 300, 600):
        s = math.ldexp(1.0, k)
        x, res = solve_cg(lambda v: A @ v, b * s, x0=x0 * s, preconditioner=d)
        assert torch.equal(x, ref * s)
        assert (res.residual, res.iterations, res.n_matvec, res.converged,
                res.warm_started) == (r_ref.residual, r_ref.iterations,
                                      r_ref.n_matvec, r_ref.converged, True)


def test_cg_solution_out_of_range_after_scaling_is_not_converged():
    """A solution beyond the dtype's range cannot be returned: it is not
    converged, and the message says it overflows or underflows. Before the
    fix b = [1, 2] * 1e300 (A = 1e-100 I) raised 'not finite (norm inf)', and
    b = [1, 2] * 1e-170 (A = 1e200 I) returned 0 as converged ('b = 0')."""
    b = _B2 * 1e300
    x, res = solve_cg(lambda v: 1e-100 * v, b)
    assert not res.converged and "overflows" in res.message
    x, res = solve_cg(lambda v: 1e200 * v, _B2 * 1e-170)  # x = 1e-370 underflows
    assert not res.converged and "underflows" in res.message


def test_other_solvers_handle_rhs_whose_norm_underflows_or_overflows():
    """Before the fix solve_neumann and solve_dense returned x = 0 marked
    converged for b = [1, 2] * 1e-170; for * 1e160 solve_dense raised 'b is
    not finite' and solve_neumann stopped at 'Neumann term 1 became
    non-finite; the series diverges' (converged=False); solve_identity
    reported residual 0.0 for * 1e-170 (0.25 now, as for [1, 2])."""
    for factor in (1e-170, 1e160):
        b = _B2 * factor
        x_ref = torch.linalg.solve(_A2, _B2)
        x, res = solve_dense(_A2, b)
        assert res.converged and torch.allclose(x / factor, x_ref, rtol=1e-12)
        x, res = solve_dense(lambda v: _A2 @ v, b)
        assert res.converged and torch.allclose(x / factor, x_ref, rtol=1e-12)
        x, res = solve_neumann(lambda v: _A2 @ v, b, step=0.2, n_terms=500, tol=1e-12)
        assert res.converged and torch.allclose(x / factor, x_ref, rtol=1e-10)
        x, res = solve_identity(b, step=0.25, matvec=lambda v: _A2 @ v)
        assert res.residual == pytest.approx(_rel(_A2 @ (0.25 * _B2), _B2))


@pytest.mark.parametrize("maxiter", [-1, 0, 1.5, "3", True])
def test_cg_rejects_bad_maxiter(maxiter):
    """Before the fix maxiter=-1 and 0 ran no iteration ('maxiter=-1 reached',
    x = 0), 1.5 ran like 2, and "3" raised TypeError "'<' not supported
    between instances of 'int' and 'str'"."""
    with pytest.raises(ValueError, match=r"solve_cg: maxiter must be None or an "
                                         r"integer >= 1"):
        solve_cg(lambda v: v, torch.ones(2, dtype=DT), maxiter=maxiter)


def test_matvec_of_another_dtype_is_a_clear_error():
    """Before the fix a float32 matvec on a float64 b raised torch's 'dot :
    expected both vectors to have same dtype, but found Double and Float'
    (solve_cg), 'Expected b and A to have the same dtype' (solve_dense), and
    solve_neumann silently promoted every term."""
    b = torch.ones(3, dtype=DT)
    solves = {
        "solve_cg": lambda m: solve_cg(m, b),
        "solve_neumann": lambda m: solve_neumann(m, b, 0.5, 5),
        "solve_dense": lambda m: solve_dense(m, b),
    }
    for name, solve in solves.items():
        with pytest.raises(TypeError, match=rf"{name}: matvec must return a tensor of "
                                            r"b's dtype.*torch.float64.*torch.float32"):
            solve(lambda v: v.float())
    # a float32 b with a float64 matvec, the other way round
    with pytest.raises(TypeError, match="solve_cg: matvec must return"):
        solve_cg(lambda v: v.double(), torch.ones(3))
