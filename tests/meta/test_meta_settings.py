"""MetaLearnerClassifier / MetaLearnerRegressor: edge settings and bad modules."""

import numpy as np
import pytest
import torch

from skbilevel.meta import MetaLearnerClassifier, MetaLearnerRegressor


def _line(n=40, seed=0):
    X = np.random.RandomState(seed).randn(n, 2)
    return X, X[:, 0]


@pytest.mark.parametrize("Est", [MetaLearnerRegressor, MetaLearnerClassifier])
def test_imaml_with_zero_inner_steps_fits_and_predicts(Est):
    # With no inner step, vmap hands back phi broadcast along the task axis; the
    # Hessian-vector products must not write into that shared memory.
    X, y = _line()
    if Est is MetaLearnerClassifier:
        y = (y > 0).astype(int)
    est = Est("linear", method="imaml", inner_steps=0, k_shot=2, n_query=2,
              meta_batch_size=2, max_iter=2, random_state=0).fit(X, y)
    assert est.n_iter_ == 2
    assert np.isfinite(est.predict(X[:3]).astype(float)).all()


@pytest.mark.parametrize("lam", [0.0, -1.0])
def test_imaml_rejects_non_positive_lam(lam):
    X, y = _line()
    est = MetaLearnerRegressor(method="imaml", method_params={"lam": lam}, max_iter=1)
    with pytest.raises(ValueError, match="lam must be > 0"):
        est.fit(X, y)


def test_imaml_rejects_inner_steps_the_proximal_term_makes_diverge():
    # theta - phi is multiplied by 1 - inner_lr * lam at every inner step
    X, y = _line()
    est = MetaLearnerRegressor(method="imaml", inner_lr=0.5, method_params={"lam": 4.0},
                               max_iter=1)
    with pytest.raises(ValueError, match=r"inner_lr \* lam = 2 >= 2"):
        est.fit(X, y)
    # accepted below 2; 5 steps (the loss's own curvature adds to lam's, so 20
    # steps at 1.9 diverge through the loss, as they should)
    MetaLearnerRegressor(method="imaml", inner_steps=5, inner_lr=0.1,
                         method_params={"lam": 19.0}, max_iter=1, random_state=0).fit(X, y)


@pytest.mark.parametrize("params", [{"alpha": 0.0}, {"alpha": -1.0}, {"scale": 0.0},
                                    {"scale": -2.0}])
def test_r2d2_rejects_non_positive_alpha_and_scale(params):
    X, y = _line()
    name = next(iter(params))
    est = MetaLearnerClassifier(method="r2d2", method_params=params, max_iter=1)
    with pytest.raises(ValueError, match=f"{name} must be > 0"):
        est.fit(X, (y > 0).astype(int))


def _four_classes():
    X = np.random.RandomState(0).randn(80, 3)
    return X, np.repeat([0, 1, 2, 3], 20)


@pytest.mark.parametrize("module, match", [
    (torch.nn.Linear(3, 2), "gives 2 outputs .* at least n_way_ = 4"),
    (torch.nn.Linear(5, 4), "takes 5 input features but X has 3 features"),
])
def test_module_instance_with_wrong_sizes_is_a_clear_error(module, match):
    X, y = _four_classes()
    with pytest.raises(ValueError, match=match):
        MetaLearnerClassifier(module, max_iter=1).fit(X, y)


def test_regressor_module_with_wrong_output_width_is_a_clear_error():
    X, y = _line()
    with pytest.raises(ValueError, match="gives 3 outputs .* one output per target: 1"):
        MetaLearnerRegressor(torch.nn.Linear(2, 3), max_iter=1).fit(X, y)


def test_wider_classifier_head_and_r2d2_feature_map_are_accepted():
    X, y = _four_classes()
    kw = dict(k_shot=2, n_query=2, meta_batch_size=2, max_iter=1, random_state=0)
    MetaLearnerClassifier(torch.nn.Linear(3, 6), **kw).fit(X, y)
    MetaLearnerClassifier(torch.nn.Linear(3, 7), method="r2d2", **kw).fit(X, y)


@pytest.mark.parametrize("method", ["anil", "maml"])
def test_module_without_parameters_is_a_clear_error(method):
    X, y = _four_classes()
    with pytest.raises(ValueError, match="no parameters to meta-learn"):
        MetaLearnerRegressor(torch.nn.Identity(), method=method, max_iter=1).fit(X, X)


@pytest.mark.parametrize("norm", [torch.nn.BatchNorm1d(8), torch.nn.SyncBatchNorm(8)])
def test_batch_norm_is_rejected(norm):
    X, y = _four_classes()
    net = torch.nn.Sequential(torch.nn.Linear(3, 8), norm, torch.nn.ReLU(),
                              torch.nn.Linear(8, 4))
    match = r"batch-norm layers \(1: .*BatchNorm.*LayerNorm"
    with pytest.raises(ValueError, match=match):
        MetaLearnerClassifier(net, max_iter=1).fit(X, y)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.parametrize("method", ["maml", "fomaml", "reptile", "metasgd", "imaml"])
def test_unscaled_targets_are_a_clear_error_not_inf_predictions(method):
    # The meta-batch loss is NaN at once, so the outer loop keeps the untrained
    # initialization, whose adaptation on y of ~1e3 overflows (weights of 1e244).
    X, y = _line()
    with pytest.raises(ValueError, match=r"diverged.*standardize X and y"):
        MetaLearnerRegressor(method=method, max_iter=5, random_state=0).fit(X, 1000 * y)


def test_adaptation_exploding_to_finite_garbage_is_a_clear_error():
    X, y = _line()
    meta = MetaLearnerRegressor(max_iter=5, random_state=0).fit(X, y)
    assert np.isfinite(meta.adapt(X[:10], y[:10]).predict(X[:3])).all()
    # outputs of ~1e19 for targets of ~1e3: finite, but the loss grew 1e31-fold
    with pytest.raises(ValueError, match=r"diverged.*loss on them is .*e\+"):
        meta.adapt(X[:10], 1000 * y[:10])


@pytest.mark.parametrize(
    "method, dtype, match",
    [("maml", "float16", "bfloat16"), ("r2d2", "bfloat16", "linear system"),
     ("r2d2", "float16", "linear system")],
)
def test_half_precision_rejected_where_it_fails(method, dtype, match):
    # float16 fits stopped at their second iteration on a NaN loss (Adam), keeping
    # the initialization; R2D2 in half precision crashed inside torch ("lu_cpu" not
    # implemented for 'Half')
    X, y = _line()
    est = MetaLearnerRegressor("linear", method=method, dtype=dtype, k_shot=2,
                               n_query=2, meta_batch_size=2, max_iter=3, random_state=0)
    with pytest.raises(ValueError, match=match):
        est.fit(X, y)


def test_bfloat16_still_fits():
    X, y = _line()
    est = MetaLearnerRegressor("linear", dtype="bfloat16", k_shot=2, n_query=2,
                               meta_batch_size=2, max_iter=3, random_state=0).fit(X, y)
    assert est.n_iter_ == 3
    assert np.isfinite(est.predict(X[:3])).all()


@pytest.mark.parametrize("method", ["maml", "r2d2"])
@pytest.mark.parametrize("sizes", [(0,), (8, -1), 5, (2.5,)])
def test_module_hidden_layer_sizes_validated(method, sizes):
    # (0,) fitted a network with an empty hidden layer (torch only warned
    # 'Initializing zero-element tensors is a no-op'); 5 failed with "'int' object
    # is not iterable" (R2D2: "object of type 'int' has no len()")
    X, y = _line()
    est = MetaLearnerRegressor(method=method, module__hidden_layer_sizes=sizes,
                               k_shot=2, n_query=2, meta_batch_size=2, max_iter=2)
    with pytest.raises(ValueError, match="module__hidden_layer_sizes must be a tuple"):
        est.fit(X, y)


@pytest.mark.parametrize("method", ["maml", "anil", "reptile", "r2d2"])
def test_frozen_parameters_of_a_module_instance_stay_fixed(method):
    # parameters with requires_grad=False were meta-learned and adapted like the
    # others (a frozen first layer moved by 3e-3 in 3 iterations)
    X = np.random.RandomState(0).randn(60, 3)
    y = (X[:, 0] > 0).astype(int)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    net[0].requires_grad_(False)
    meta = MetaLearnerClassifier(net, method=method, k_shot=2, n_query=2,
                                 meta_batch_size=2, max_iter=3, random_state=0).fit(X, y)
    torch.testing.assert_close(meta.module_[0].weight, net[0].weight)
    assert not any(k.startswith("0.") for k in meta.meta_params_)
    support = np.r_[np.flatnonzero(y == 0)[:4], np.flatnonzero(y == 1)[:4]]
    task = meta.adapt(X[support], y[support])
    assert not any(k.startswith("params/0.") for k in task._state)
    assert task.predict_proba(X[:3]).shape == (3, 2)
    net[2].requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad=False"):
        MetaLearnerClassifier(net, method=method, k_shot=2, n_query=2, max_iter=2).fit(X, y)


def test_single_class_message_shows_the_label_plainly():
    # the label was shown as numpy's repr: "got 1 class (np.str_('x'))"
    X, _ = _line()
    with pytest.raises(ValueError, match=r"got 1 class \(\['x'\]\)"):
        MetaLearnerClassifier(k_shot=2, n_query=2, max_iter=2).fit(X, ["x"] * len(X))


@pytest.mark.parametrize("change", [{"method": "r2d2"}, {"method": "metasgd"},
                                    {"inner_lr": 0.5}, {"inner_steps": 1}])
def test_predict_and_adapt_use_the_fitted_method_after_set_params(change):
    # predict and adapt rebuilt the method from the current parameters: after
    # set_params(method='r2d2') a MAML fit raised KeyError('W') inside the core,
    # and other changes silently altered the predictions without a refit
    X = np.random.RandomState(0).randn(60, 3)
    y = (X[:, 0] > 0).astype(int)
    meta = MetaLearnerClassifier("linear", k_shot=2, n_query=2, meta_batch_size=2,
                                 max_iter=2, random_state=0).fit(X, y)
    proba, adapted = meta.predict_proba(X), meta.adapt(X[:20], y[:20]).predict_proba(X)
    meta.set_params(**change)
    np.testing.assert_array_equal(meta.predict_proba(X), proba)
    np.testing.assert_array_equal(meta.adapt(X[:20], y[:20]).predict_proba(X), adapted)


@pytest.mark.parametrize("Est", [MetaLearnerRegressor, MetaLearnerClassifier])
def test_module_returning_a_tuple_is_a_clear_error(Est, tuple_net):
    # it failed with AttributeError: 'tuple' object has no attribute 'dim'
    X, y = _line()
    if Est is MetaLearnerClassifier:
        y = (y > 0).astype(int)
    with pytest.raises(ValueError, match="returned a tuple"):
        Est(tuple_net, k_shot=2, n_query=2, max_iter=2).fit(X, y)


def test_failed_refit_keeps_the_fitted_method_with_its_parameters():
    # the fitted method was recorded before the backbone checks: a refit with
    # method='r2d2' that failed on the module left MAML's parameters with R2D2's
    # method, and predict raised KeyError('W')
    X = np.random.RandomState(0).randn(60, 3)
    y = (X[:, 0] > 0).astype(int)
    meta = MetaLearnerClassifier("linear", k_shot=2, n_query=2, meta_batch_size=2,
                                 max_iter=2, random_state=0).fit(X, y)
    proba = meta.predict_proba(X)
    meta.set_params(method="r2d2", module=torch.nn.Linear(5, 4))
    with pytest.raises(ValueError, match="input"):
        meta.fit(X, y)
    np.testing.assert_array_equal(meta.predict_proba(X), proba)


@pytest.mark.parametrize("params, match", [
    ({"cg_maxiter": 0}, r"cg_maxiter .* must be an integer >= 1; got 0"),
    ({"cg_maxiter": -1}, r"cg_maxiter .* must be an integer >= 1; got -1"),
    ({"cg_maxiter": 2.5}, r"cg_maxiter .* must be an integer >= 1; got 2.5"),
    ({"cg_tol": float("nan")}, r"cg_tol must be a number in \[0, 1\); got cg_tol=nan"),
    ({"cg_tol": -1e-3}, r"cg_tol must be a number in \[0, 1\); got cg_tol=-0.001"),
    ({"cg_tol": 2.0}, r"cg_tol must be a number in \[0, 1\); got cg_tol=2.0"),
    ({"cg_tol": float("inf")}, r"cg_tol must be a number in \[0, 1\); got cg_tol=inf"),
])
def test_imaml_rejects_cg_settings_that_solve_nothing(params, match):
    """iMAML's ``cg_maxiter`` and ``cg_tol`` are validated as ``lam`` is.

    Before the fix they were taken as given: ``cg_maxiter`` 0 or -1 ran no CG
    step ("stopped after 0 step(s)") and ``cg_tol`` 2 or inf stopped before
    the first (CG's relative residual starts at 1), so the meta-gradient was
    exactly zero and the meta-parameters never moved (max change between a
    1- and a 5-iteration fit: 0.0, against 3.7e-3 at the defaults); a NaN or
    negative ``cg_tol`` was never met and silently meant "no tolerance".
    """
    X, y = _line()
    est = MetaLearnerRegressor(method="imaml", method_params=params, k_shot=2, n_query=2,
                               meta_batch_size=2, max_iter=2, random_state=0)
    with pytest.raises(ValueError, match=match):
        est.fit(X, y)


def test_imaml_cg_tol_zero_runs_every_cg_step():
    """``cg_tol=0`` is a fixed number of CG steps (the paper's setting)."""
    X, y = _line()
    est = MetaLearnerRegressor("linear", method="imaml", k_shot=2, n_query=2,
                               meta_batch_size=2, max_iter=2, random_state=0,
                               method_params={"cg_tol": 0.0, "cg_maxiter": 1}).fit(X, y)
    assert est.hypergradient_info_["linear_solve_iterations"] == 1
