"""Tests of SampleReweighter / SampleReweighterRegressor (issue 5)."""

import pickle
import warnings

import numpy as np
import pytest
import sklearn
import torch
from sklearn.datasets import make_classification
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LinearRegression, LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks

from skbilevel.hypergrad import GradientDescent, get_strategy
from skbilevel.reweighting import SampleReweighter, SampleReweighterRegressor
from skbilevel.reweighting._reweighter import _outer_objective, _WeightedProblem
from skbilevel.utils._modules import MLP, WeightNet

_EXPECTED_FAILED = {
    "check_sample_weight_equivalence_on_dense_data": (
        "the trusted split and the mini-batches depend on the number of rows, so "
        "repeating a sample is not the same as doubling its weight"
    ),
}


@parametrize_with_checks(
    [
        SampleReweighter(max_iter=8, learning_rate=0.1, random_state=0),
        SampleReweighterRegressor(max_iter=8, learning_rate=0.1, random_state=0),
    ],
    expected_failed_checks=lambda est: _EXPECTED_FAILED,
)
def test_sklearn_compatible(estimator, check):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        check(estimator)


def _noisy_problem(n=400, noise=0.4, trusted_fraction=0.1, seed=0):
    X, y = make_classification(
        n_samples=n, n_features=8, n_informative=5, n_redundant=0, n_classes=3,
        n_clusters_per_class=1, class_sep=2.0, random_state=seed,
    )
    X = StandardScaler().fit_transform(X)
    rng = np.random.RandomState(seed)
    trusted = np.zeros(n, bool)
    trusted[rng.choice(n, int(trusted_fraction * n), replace=False)] = True
    flipped = ~trusted & (rng.rand(n) < noise)
    y_noisy = y.copy()
    y_noisy[flipped] = (y[flipped] + rng.randint(1, 3, flipped.sum())) % 3
    return X, y, y_noisy, trusted, flipped


@pytest.mark.parametrize("method", ["per_sample", "weight_net"])
def test_flipped_labels_get_low_weights(method):
    X, y, y_noisy, trusted, flipped = _noisy_problem()
    clf = SampleReweighter(method=method, max_iter=150, learning_rate=0.05, random_state=0)
    clf.fit(X, y_noisy, trusted=trusted)
    w = clf.sample_weight_[~trusted]
    auroc = roc_auc_score(~flipped[~trusted], w)
    assert auroc >= 0.9, auroc
    assert np.all(clf.sample_weight_[trusted] == 1.0)
    assert np.array_equal(clf.trusted_, trusted)
    if method == "weight_net":
        # the same learner does better on the reweighted data than on the raw labels
        plain = LogisticRegression().fit(X, y_noisy).score(X, y)
        refit = clf.set_params(final_estimator=LogisticRegression()).fit(X, y_noisy, trusted=trusted)
        assert refit.score(X, y) >= plain
    assert clf.n_iter_ == 150 and clf.history_.shape == (150,)
    assert clf.hypergradient_info_["strategy"] == "lookahead"
    assert (clf.weight_net_ is not None) == (method == "weight_net")


def _tiny_problem(method, seed=0):
    torch.manual_seed(seed)
    rng = np.random.RandomState(seed)
    dtype = torch.float64
    X = torch.as_tensor(rng.randn(30, 4), dtype=dtype)
    y = torch.as_tensor(rng.randint(0, 3, 30))
    module = MLP(4, 3, hidden_layer_sizes=(5,), activation="tanh").double()
    weight_net = WeightNet(n_classes=3, hidden_size=6).double() if method == "weight_net" else None
    problem = _WeightedProblem(
        module, "ce", None, X, y, torch.ones(30, dtype=dtype),
        torch.arange(22), torch.arange(22, 30), method=method, weight_net=weight_net,
        weight_label=True, alpha=1e-2, normalize=True, n_classes=3,
    )
    theta = {k: p.detach().clone() for k, p in module.named_parameters()}
    if method == "per_sample":
        phi = torch.as_tensor(rng.randn(22), dtype=dtype).requires_grad_(True)
    else:
        phi = {k: p.detach().clone().requires_grad_(True) for k, p in weight_net.named_parameters()}
    return problem, theta, phi


@pytest.mark.parametrize("method", ["per_sample", "weight_net"])
def test_lookahead_hypergradient_matches_finite_differences(method):
    problem, theta, phi = _tiny_problem(method)
    pos, tpos = torch.arange(22), torch.arange(8)
    strategy, solver = get_strategy("lookahead"), GradientDescent(lr=0.5, n_steps=1)

    def value(p):
        with torch.no_grad():
            return float(_outer_objective(problem, theta, p, pos, tpos, strategy, solver)[0])

    loss, _, info = _outer_objective(problem, theta, phi, pos, tpos, strategy, solver)
    loss.backward()
    leaves = [phi] if isinstance(phi, torch.Tensor) else list(phi.values())
    grad = torch.cat([leaf.grad.reshape(-1) for leaf in leaves])
    flat = [leaf.detach().clone() for leaf in leaves]
    fd = []
    eps = 1e-6
    for j, leaf in enumerate(flat):
        for i in range(leaf.numel()):
            vals = []
            for sign in (1.0, -1.0):
                moved = [t.clone() for t in flat]
                moved[j].view(-1)[i] += sign * eps
                p = moved[0] if isinstance(phi, torch.Tensor) else dict(zip(phi, moved))
                vals.append(value(p))
            fd.append((vals[0] - vals[1]) / (2 * eps))
    fd = torch.tensor(fd, dtype=torch.float64)
    assert grad.abs().max() > 1e-4  # not trivially zero
    torch.testing.assert_close(grad, fd, rtol=1e-5, atol=1e-8)
    assert info.strategy == "lookahead"


def test_pipeline_routes_trusted_metadata():
    X, y, y_noisy, trusted, flipped = _noisy_problem(n=200)
    X = X * 10 + 3
    with sklearn.config_context(enable_metadata_routing=True):
        pipe = make_pipeline(StandardScaler(), SampleReweighter(max_iter=30, random_state=0))
        assert SampleReweighter().get_metadata_routing().fit.requests["trusted"] is True
        pipe.fit(X, y_noisy, trusted=trusted)
        assert np.array_equal(pipe[-1].trusted_, trusted)
        # sample_weight is not requested by default; requesting it routes it too
        pipe2 = make_pipeline(
            StandardScaler().set_fit_request(sample_weight=False),
            SampleReweighter(max_iter=30, random_state=0).set_fit_request(sample_weight=True),
        )
        sw = np.ones(len(y))
        pipe2.fit(X, y_noisy, trusted=trusted, sample_weight=sw)
        assert np.array_equal(pipe2[-1].trusted_, trusted)
    assert pipe.predict(X).shape == (200,)


def test_validation_fraction_split_is_stratified():
    X, y, y_noisy, _, _ = _noisy_problem(n=300)
    clf = SampleReweighter(max_iter=5, validation_fraction=0.2, random_state=0).fit(X, y_noisy)
    assert clf.trusted_.sum() == 60
    counts = np.bincount(y_noisy[clf.trusted_], minlength=3)
    expected = np.bincount(y_noisy, minlength=3) * 0.2
    assert np.all(np.abs(counts - expected) <= 1)


def test_skorch_net_as_inner_model():
    from skorch import NeuralNetClassifier

    class SoftmaxNet(torch.nn.Module):
        def __init__(self, n_features=8, n_classes=3, hidden=16):
            super().__init__()
            self.body = torch.nn.Sequential(
                torch.nn.Linear(n_features, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, n_classes)
            )

        def forward(self, X):
            return torch.softmax(self.body(X), dim=-1)

    X, y, y_noisy, trusted, flipped = _noisy_problem(n=300)
    net = NeuralNetClassifier(SoftmaxNet, module__hidden=16, max_epochs=1, verbose=0)
    clf = SampleReweighter(net, max_iter=100, learning_rate=0.05, weight_learning_rate=0.01,
                           random_state=0)
    clf.fit(X.astype(np.float32), y_noisy, trusted=trusted)
    assert isinstance(clf.module_, SoftmaxNet)
    assert clf.module_.body[0].out_features == 16
    proba = clf.predict_proba(X)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-5)
    assert clf.score(X, y) > 0.85
    assert roc_auc_score(~flipped[~trusted], clf.sample_weight_[~trusted]) > 0.9
    assert not getattr(net, "initialized_", False)  # the user's net is left untouched


@pytest.mark.filterwarnings("ignore:Refitting the inner model")  # an MLP, 100 L-BFGS steps
def test_module_class_with_module_params_and_clone():
    X, y, y_noisy, trusted, _ = _noisy_problem(n=200)
    clf = SampleReweighter(MLP, module__hidden_layer_sizes=(7,), max_iter=20, random_state=0)
    assert clf.get_params()["module__hidden_layer_sizes"] == (7,)
    clone = sklearn.base.clone(clf).set_params(module__hidden_layer_sizes=(4,))
    assert clone.module__hidden_layer_sizes == (4,) and clf.module__hidden_layer_sizes == (7,)
    clone.fit(X, y_noisy, trusted=trusted)
    assert clone.module_.layers[0].out_features == 4
    mlp = SampleReweighter("mlp", module__hidden_layer_sizes=(6,), max_iter=5, random_state=0)
    assert mlp.fit(X, y_noisy).module_.layers[0].out_features == 6


def test_weight_net_weighs_new_samples():
    X, y, y_noisy, trusted, flipped = _noisy_problem(n=500)
    fit_idx, new_idx = np.arange(350), np.arange(350, 500)
    clf = SampleReweighter(max_iter=150, learning_rate=0.05, random_state=0)
    clf.fit(X[fit_idx], y_noisy[fit_idx], trusted=trusted[fit_idx])
    w_new = clf.weigh(X[new_idx], y_noisy[new_idx])
    assert w_new.shape == (150,) and np.all((w_new > 0) & (w_new < 1))
    assert roc_auc_score(~flipped[new_idx], w_new) >= 0.9
    with pytest.raises(ValueError, match="not seen in fit"):
        clf.weigh(X[:2], np.array([0, 7]))
    per_sample = SampleReweighter(method="per_sample", max_iter=2, random_state=0).fit(X[:100], y_noisy[:100])
    assert not hasattr(per_sample, "weigh")


def test_final_estimator_gets_learned_weights():
    X, y, y_noisy, trusted, _ = _noisy_problem(n=200)
    clf = SampleReweighter(final_estimator=LogisticRegression(), max_iter=20, random_state=0)
    clf.fit(X, y_noisy, trusted=trusted)
    ref = LogisticRegression().fit(X, y_noisy, sample_weight=clf.sample_weight_)
    np.testing.assert_allclose(clf.predict_proba(X), ref.predict_proba(X))
    joint = SampleReweighter(final_estimator="joint", max_iter=20, random_state=0)
    joint.fit(X, y_noisy, trusted=trusted)
    assert joint.estimator_.module_ is joint.module_


def test_regressor_downweights_corrupted_targets():
    rng = np.random.RandomState(0)
    X = rng.randn(300, 4)
    y = X @ np.array([1.0, -2.0, 0.5, 0.0]) + 0.1 * rng.randn(300)
    bad = rng.rand(300) < 0.3
    # biased corruption: unbiased noise would not move the least-squares fit
    y_noisy = np.where(bad, y + 6 + 2 * rng.randn(300), y)
    trusted = ~bad & (rng.rand(300) < 0.15)
    plain = LinearRegression().fit(X, y_noisy).score(X, y)
    for method in ["per_sample", "weight_net"]:
        reg = SampleReweighterRegressor(method=method, max_iter=150, learning_rate=0.05, random_state=0)
        reg.fit(X, y_noisy, trusted=trusted)
        assert roc_auc_score(~bad[~trusted], reg.sample_weight_[~trusted]) >= 0.9
        assert reg.score(X, y) > max(0.95, plain)


@pytest.mark.parametrize("hypergradient", ["truncated", "reverse", "cg"])
def test_other_strategies_run(hypergradient):
    X, y, y_noisy, trusted, flipped = _noisy_problem(n=150)
    clf = SampleReweighter(hypergradient=hypergradient, unroll_steps=3, max_iter=15,
                           alpha=1e-2, learning_rate=0.1, random_state=0, dtype="float64")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(X, y_noisy, trusted=trusted)
    assert clf.hypergradient_info_["strategy"] == hypergradient
    assert np.all(np.isfinite(clf.sample_weight_))


def test_early_stopping_and_callbacks():
    X, y, y_noisy, trusted, _ = _noisy_problem(n=200)
    seen = []
    clf = SampleReweighter(max_iter=500, early_stopping=True, n_iter_no_change=3, tol=0.5,
                           callbacks=[lambda state: seen.append(state.iteration)], random_state=0)
    clf.fit(X, y_noisy, trusted=trusted)
    assert clf.stop_reason_ == "callback" and clf.n_iter_ < 500
    assert seen == list(range(1, clf.n_iter_ + 1))


def test_mini_batches_and_pickle():
    X, y, y_noisy, trusted, flipped = _noisy_problem(n=400)
    clf = SampleReweighter(method="weight_net", batch_size=64, max_iter=60, random_state=0)
    clf.fit(X, y_noisy, trusted=trusted)
    again = pickle.loads(pickle.dumps(clf))
    np.testing.assert_allclose(again.predict_proba(X), clf.predict_proba(X))
    np.testing.assert_allclose(again.weigh(X, y_noisy), clf.weigh(X, y_noisy))
    same = SampleReweighter(method="weight_net", batch_size=64, max_iter=60, random_state=0)
    np.testing.assert_allclose(same.fit(X, y_noisy, trusted=trusted).sample_weight_, clf.sample_weight_)


# ----------------------------------------------------------------------------- bad input


def test_bad_trusted_masks():
    X, y, y_noisy, trusted, _ = _noisy_problem(n=100)
    clf = SampleReweighter(max_iter=2)
    with pytest.raises(ValueError, match=r"expected shape \(100,\), got \(99,\)"):
        clf.fit(X, y_noisy, trusted=trusted[:99])
    with pytest.raises(ValueError, match="no True entry"):
        clf.fit(X, y_noisy, trusted=np.zeros(100, bool))
    with pytest.raises(ValueError, match="Every sample is marked trusted"):
        clf.fit(X, y_noisy, trusted=np.ones(100, bool))
    with pytest.raises(ValueError, match="boolean mask"):
        clf.fit(X, y_noisy, trusted=np.arange(100))
    only_trusted_class = trusted.copy()
    only_trusted_class[y_noisy == 2] = True
    with pytest.raises(ValueError, match=r"Labels \[2\] appear in the trusted set"):
        clf.fit(X, y_noisy, trusted=only_trusted_class)


def test_nan_and_inf_rejected():
    X, y, y_noisy, trusted, _ = _noisy_problem(n=100)
    for bad in (np.nan, np.inf):
        Xb = X.copy()
        Xb[3, 1] = bad
        with pytest.raises(ValueError, match="NaN|infinity"):
            SampleReweighter(max_iter=2).fit(Xb, y_noisy, trusted=trusted)


def test_module_output_shape_mismatch():
    X, y, y_noisy, trusted, _ = _noisy_problem(n=100)
    clf = SampleReweighter(torch.nn.Linear(8, 5), max_iter=2)
    with pytest.raises(ValueError, match=r"output has shape \(2, 5\).*\(2, 3\) is needed"):
        clf.fit(X, y_noisy, trusted=trusted)
    with pytest.raises(ValueError, match="Unknown parameters"):
        SampleReweighter(max_iter=2, bogus=1).fit(X, y_noisy, trusted=trusted)
    with pytest.raises(ValueError, match="module__"):
        SampleReweighter(torch.nn.Linear(8, 3), module__bias=False, max_iter=2).fit(X, y_noisy)


def test_diverging_run_warns_and_keeps_finite_state():
    X, y, y_noisy, trusted, _ = _noisy_problem(n=200)
    clf = SampleReweighter(learning_rate=1e30, optimizer="sgd", max_iter=50, random_state=0)
    with pytest.warns(ConvergenceWarning, match="not finite"):
        clf.fit(X, y_noisy, trusted=trusted)
    assert clf.stop_reason_ == "diverged" and clf.n_iter_ < 50
    assert all(torch.isfinite(p).all() for p in clf.module_.parameters())
    assert np.all(np.isfinite(clf.sample_weight_))
    assert np.all(np.isfinite(clf.predict_proba(X)))


# ------------------------------------------------------------ QA regressions


def _small_problem(n=60, regression=False):
    from sklearn.datasets import make_regression

    if regression:
        X, y = make_regression(n, 4, random_state=0)
    else:
        X, y = make_classification(n, 4, n_informative=3, n_redundant=0, random_state=0)
    trusted = np.zeros(n, bool)
    trusted[::6] = True
    return X, y, trusted


@pytest.mark.parametrize("final_estimator", [None, "joint"])
def test_X_beyond_float32_range_is_rejected_up_front(final_estimator):
    # X * 1e39 overflows float32: 'joint' gave NaN silently, the default a
    # misleading 'inner objective is not finite' after the whole loop
    X, y, trusted = _small_problem()
    clf = SampleReweighter(max_iter=2, final_estimator=final_estimator)
    match = "beyond the range of float32.*dtype='float64'"
    with pytest.raises(ValueError, match=match):
        clf.fit(X * 1e39, y, trusted=trusted)
    reg = SampleReweighterRegressor(max_iter=2, final_estimator=final_estimator)
    Xr, yr, trusted = _small_problem(regression=True)
    with pytest.raises(ValueError, match="beyond the range of float32"):
        reg.fit(Xr * 1e39, yr, trusted=trusted)


@pytest.mark.parametrize("batch_size", ["auto", 8])
def test_divergence_at_first_iteration_history_matches_n_iter(batch_size):
    # history_ had shape (0,) while n_iter_ was forced to 1
    X, y, trusted = _small_problem(regression=True)
    reg = SampleReweighterRegressor(max_iter=3, batch_size=batch_size, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reg.fit(X * 1e8, y, trusted=trusted)
    assert reg.stop_reason_ == "diverged"
    assert reg.n_iter_ == 0 and reg.history_.shape == (reg.n_iter_,)
    assert np.isfinite(reg.predict(X)).all()


@pytest.mark.parametrize("Est", [SampleReweighter, SampleReweighterRegressor])
def test_negative_sample_weight_is_rejected(Est):
    # one negative prior weight was accepted and multiplied into the losses
    X, y, trusted = _small_problem(regression=Est is SampleReweighterRegressor)
    sw = np.ones(len(y))
    sw[1] = -5
    with pytest.raises(ValueError, match="Negative values.*sample_weight"):
        Est(max_iter=2).fit(X, y, trusted=trusted, sample_weight=sw)
    # all zero: the classifier's message said "Only 1 class ([])"
    with pytest.raises(ValueError, match="at least one non-zero"):
        Est(max_iter=2).fit(X, y, trusted=trusted, sample_weight=np.zeros(len(y)))


@pytest.mark.parametrize(
    "params, match",
    [
        (dict(dtype="float16"), "use 'bfloat16'"),
        (dict(dtype="bfloat16", hypergradient="dense"), "factorizes"),
    ],
)
def test_half_precision_rejected_where_it_fails(params, match):
    # float16 diverged at the second iteration (torch's Adam gives NaN on a zero
    # gradient in float16); 'dense' crashed in torch's LU in bfloat16
    X, y, trusted = _small_problem()
    dtype = params["dtype"]
    with pytest.raises(ValueError, match=f"dtype='{dtype}' is not supported.*{match}"):
        SampleReweighter(max_iter=2, **params).fit(X, y, trusted=trusted)
    # bfloat16 works with the default look-ahead
    clf = SampleReweighter(max_iter=5, dtype="bfloat16", random_state=0)
    assert clf.fit(X, y, trusted=trusted).stop_reason_ == "max_iter"


@pytest.mark.parametrize("module", ["mlp", MLP])
@pytest.mark.parametrize("sizes", [(0,), (-1,), (2.5,)])
def test_module_hidden_layer_sizes_validated(module, sizes):
    # (-1,) torch's negative dimension; (0,) and (2.5,) were accepted
    X, y, trusted = _small_problem()
    clf = SampleReweighter(module=module, module__hidden_layer_sizes=sizes, max_iter=2)
    match = "module__hidden_layer_sizes must be a tuple of integers >= 1"
    with pytest.raises(ValueError, match=match):
        clf.fit(X, y, trusted=trusted)


def test_module_instance_input_size_and_parameters_checked():
    # torch's 'mat1 and mat2 shapes cannot be multiplied' / 'optimizer got an
    # empty parameter list'
    X, y, trusted = _small_problem()
    clf = SampleReweighter(module=torch.nn.Linear(3, 2), max_iter=2)
    with pytest.raises(ValueError, match="takes 3 input features but X has 4 features"):
        clf.fit(X, y, trusted=trusted)
    clf = SampleReweighter(module=torch.nn.Identity(), max_iter=2)
    with pytest.raises(ValueError, match="Identity has no parameters"):
        clf.fit(X[:, :2], y, trusted=trusted)


def test_closed_form_hypergradient_rejected_up_front():
    # the core's message advised a solver= argument SampleReweighter does not have
    X, y, trusted = _small_problem()
    with pytest.raises(ValueError, match="closed-form solution.*'lookahead'") as e:
        SampleReweighter(hypergradient="closed_form", max_iter=2).fit(
            X, y, trusted=trusted
        )
    assert "solver=" not in str(e.value)


def test_final_estimator_without_sample_weight_rejected_before_training():
    # KNeighborsClassifier failed with a TypeError only after the whole loop
    from sklearn.neighbors import KNeighborsClassifier

    X, y, trusted = _small_problem()
    seen = []
    for final in (KNeighborsClassifier(), make_pipeline(StandardScaler(),
                                                        KNeighborsClassifier())):
        clf = SampleReweighter(final_estimator=final, max_iter=2,
                               callbacks=[lambda state: seen.append(1)])
        with pytest.raises(ValueError, match="KNeighborsClassifier.*sample_weight"):
            clf.fit(X, y, trusted=trusted)
    assert seen == []  # no outer iteration ran
    # a Pipeline gets the weights through its last step
    pipe = make_pipeline(StandardScaler(), LogisticRegression())
    clf = SampleReweighter(final_estimator=pipe, max_iter=3, random_state=0)
    clf.fit(X, y, trusted=trusted)
    expected = sklearn.base.clone(pipe).fit(
        X, y, logisticregression__sample_weight=clf.sample_weight_
    )
    np.testing.assert_allclose(clf.predict_proba(X), expected.predict_proba(X))


def test_non_callable_callback_rejected():
    X, y, trusted = _small_problem()
    with pytest.raises(ValueError, match="callbacks must be callables.*int"):
        SampleReweighter(max_iter=2, callbacks=[1]).fit(X, y, trusted=trusted)


def test_set_params_rejects_a_misspelled_name_at_once():
    # it was stored (get_params, clone) and failed only in fit: in a grid search,
    # every fit; module__* keywords stay parameters
    est = SampleReweighter()
    with pytest.raises(ValueError, match="Invalid parameter 'max_iters'"):
        est.set_params(max_iters=5)
    est.set_params(module="mlp", module__hidden_layer_sizes=(8,))
    assert est.get_params()["module__hidden_layer_sizes"] == (8,)


def test_predict_on_a_read_only_array_does_not_warn():
    # torch warned "The given NumPy array is not writable" (pandas 3 frames, memmaps)
    X, _, y, trusted, _ = _noisy_problem(n=120)
    est = SampleReweighter(max_iter=3, random_state=0).fit(X, y, trusted=trusted)
    X_ro = X.copy()
    X_ro.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(est.predict(X_ro), est.predict(X))


class _DropoutNet(torch.nn.Module):
    def __init__(self, n_features, n_outputs):
        super().__init__()
        self.hidden = torch.nn.Linear(n_features, 16)
        self.drop = torch.nn.Dropout(0.5)
        self.out = torch.nn.Linear(16, n_outputs)

    def forward(self, x):
        return self.out(self.drop(torch.relu(self.hidden(x))))


def test_random_state_makes_fits_with_dropout_identical():
    # dropout masks came from torch's unseeded global generator: two fits with
    # random_state=0 gave different weights and predictions
    X, y = make_classification(n_samples=80, n_features=4, random_state=0)
    fits = [
        SampleReweighter(_DropoutNet, max_iter=5, random_state=0).fit(X, y)
        for _ in range(2)
    ]
    np.testing.assert_array_equal(fits[0].sample_weight_, fits[1].sample_weight_)
    np.testing.assert_array_equal(fits[0].predict_proba(X), fits[1].predict_proba(X))
    # and the caller's generator is untouched
    torch.manual_seed(1)
    expected = torch.rand(3)
    torch.manual_seed(1)
    SampleReweighter(_DropoutNet, max_iter=2, random_state=0).fit(X, y)
    torch.testing.assert_close(torch.rand(3), expected)


def test_dropout_module_is_refitted_by_the_inner_optimizer():
    # L-BFGS's line search on a random loss (dropout, one full batch) stopped
    # after a few iterations with a ConvergenceWarning, the model half trained:
    # training accuracy .77 (a logistic regression has .76), now .855
    X, y = make_classification(200, n_features=6, n_informative=4, random_state=0)
    X = (X - X.mean(0)) / X.std(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        est = SampleReweighter(_DropoutNet, max_iter=100, random_state=0).fit(X, y)
    assert est.estimator_.module_.training is False  # predictions without dropout
    assert est.score(X, y) > 0.83


@pytest.mark.parametrize("hypergradient", ["cg", "neumann", "evograd", "best_response"])
def test_strategies_solving_to_a_tolerance_refuse_a_random_inner_loss(hypergradient):
    # each iteration gave a failed L-BFGS line search (and CG at negative
    # curvature): 40 warnings in 20 iterations of "cg", 1120 for "best_response"
    X, y = make_classification(60, n_features=4, random_state=0)
    match = r"random at fixed parameters \(dropout.*'lookahead'"
    with pytest.raises(ValueError, match=match):
        SampleReweighter(_DropoutNet, hypergradient=hypergradient, max_iter=2).fit(X, y)
    # a deterministic module with the same strategy is fitted
    SampleReweighter(hypergradient=hypergradient, max_iter=2, random_state=0).fit(X, y)


def test_early_stopping_counts_the_first_iteration_as_an_improvement():
    # the first comparison was value < inf - tol * inf = NaN, always False: the
    # first iteration counted as a stall and n_iter_no_change=1 stopped after it
    X, y = make_classification(n_samples=80, n_features=4, random_state=0)
    clf = SampleReweighter(max_iter=20, early_stopping=True, n_iter_no_change=1, tol=0,
                           random_state=0).fit(X, y)
    assert clf.history_[1] < clf.history_[0]  # the trusted loss is still falling
    assert clf.n_iter_ > 1
    assert len(clf.history_) == clf.n_iter_


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_weigh_rejects_non_finite_targets(bad):
    # a NaN target got a NaN weight, silently
    rng = np.random.RandomState(0)
    X = rng.randn(40, 2)
    reg = SampleReweighterRegressor(max_iter=2, random_state=0).fit(X, X[:, 0])
    with pytest.raises(ValueError, match="y contains"):
        reg.weigh(X[:3], [bad, 0.0, 1.0])
    assert np.isfinite(reg.weigh(X[:3], X[:3, 0])).all()


@pytest.mark.parametrize("scale", [1e-300, 1e160])
def test_regressor_standardizes_targets_of_extreme_scale(scale):
    # np.std(y) underflowed to 0 (fell back to 1) or overflowed to inf: targets at
    # 1e-300 were predicted at ~1e294, targets at 1e160 as -inf
    rng = np.random.RandomState(0)
    X = rng.randn(60, 2)
    y = X @ np.array([1.0, -0.5])
    ref = SampleReweighterRegressor(max_iter=5, random_state=0).fit(X, y)
    reg = SampleReweighterRegressor(max_iter=5, random_state=0).fit(X, y * scale)
    np.testing.assert_allclose(reg.predict(X[:5]) / scale, ref.predict(X[:5]), rtol=1e-5)


@pytest.mark.parametrize("final_estimator", [None, "joint"])
def test_frozen_parameters_of_a_module_instance_stay_fixed(final_estimator):
    # parameters with requires_grad=False were trained like the others: a frozen
    # first layer moved by 0.05 in module_ and by 3.4 in the refitted estimator_
    X, y = make_classification(n_samples=80, n_features=4, random_state=0)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    net[0].requires_grad_(False)
    clf = SampleReweighter(net, max_iter=5, final_estimator=final_estimator,
                           random_state=0).fit(X, y)
    for fitted in (clf.module_, clf.estimator_.module_):
        torch.testing.assert_close(fitted[0].weight, net[0].weight)
        torch.testing.assert_close(fitted[0].bias, net[0].bias)
        assert not torch.equal(fitted[2].weight, net[2].weight)  # the head trains
    net[2].requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad=False"):
        SampleReweighter(net, max_iter=2).fit(X, y)


def test_weigh_follows_the_fitted_method_after_set_params():
    # weigh was offered by the current method: after a per_sample fit and
    # set_params(method='weight_net') it failed on weight_net_ = None with an
    # AttributeError ('NoneType' object has no attribute 'n_classes')
    X, y = make_classification(n_samples=60, n_features=4, random_state=0)
    clf = SampleReweighter(method="per_sample", max_iter=2, random_state=0).fit(X, y)
    clf.set_params(method="weight_net")
    assert not hasattr(clf, "weigh")
    clf = SampleReweighter(max_iter=2, random_state=0).fit(X, y)
    w = clf.weigh(X[:5], y[:5])
    clf.set_params(method="per_sample")
    np.testing.assert_array_equal(clf.weigh(X[:5], y[:5]), w)


def test_module_returning_a_tuple_is_a_clear_error(tuple_net):
    # it failed with AttributeError: 'tuple' object has no attribute 'dim'
    X, y = make_classification(n_samples=40, n_features=4, random_state=0)
    with pytest.raises(ValueError, match="returned a tuple"):
        SampleReweighter(tuple_net, max_iter=2).fit(X, y)
