"""fit(..., groups=...) for a group splitter passed as cv, with and without
scikit-learn's metadata routing."""

import numpy as np
import pytest
import sklearn
from sklearn.model_selection import GroupKFold, LeaveOneGroupOut

from skbilevel.linear_model import BilevelRidgeCV, HyperL2Classifier, HyperL2Regressor

# the tests use few outer iterations
pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")


def _data(classifier):
    rng = np.random.RandomState(0)
    g = np.repeat(np.arange(6), 12)
    # a shift per group: the groups matter to the validation error
    X = rng.randn(72, 5) + rng.randn(6, 5)[g]
    f = X @ np.array([1.0, -0.5, 0.0, 0.3, 0.0]) + rng.randn(6)[g]
    noisy = f + 0.5 * rng.randn(72)
    y = (noisy > 0).astype(int) if classifier else noisy
    return X, y, g


ESTIMATORS = [
    (lambda cv: BilevelRidgeCV(cv=cv), False),
    (lambda cv: HyperL2Regressor(cv=cv, max_iter=5), False),
    (lambda cv: HyperL2Classifier(cv=cv, max_iter=3), True),
]
IDS = ["BilevelRidgeCV", "HyperL2Regressor", "HyperL2Classifier"]


@pytest.mark.parametrize("make, classifier", ESTIMATORS, ids=IDS)
@pytest.mark.parametrize("routing", [False, True])
def test_groups_reach_the_splitter(make, classifier, routing):
    X, y, g = _data(classifier)
    # the same splits given as a list of index pairs: the reference
    ref = make(list(GroupKFold(3).split(X, y, g))).fit(X, y)
    with sklearn.config_context(enable_metadata_routing=routing):
        est = make(GroupKFold(3)).fit(X, y, groups=g)
    np.testing.assert_array_equal(est.coef_, ref.coef_)
    np.testing.assert_array_equal(est.intercept_, ref.intercept_)
    # and they are not the splits of an ungrouped K-fold
    other = make(list(GroupKFold(3).split(X, y, np.arange(72) % 6))).fit(X, y)
    assert not np.array_equal(est.coef_, other.coef_)


@pytest.mark.parametrize("make, classifier", ESTIMATORS, ids=IDS)
def test_groups_without_a_group_splitter(make, classifier):
    X, y, g = _data(classifier)
    # the splitter needs groups and gets none: scikit-learn's error, and how
    # to pass them (GridSearchCV without routing keeps them for its own splitter)
    with pytest.raises(ValueError, match=r"should not be None.*fit\(X, y, groups=groups\)"):
        make(LeaveOneGroupOut()).fit(X, y)
    # groups with the estimator's own K-fold would be ignored: refused
    with pytest.raises(ValueError, match="does not use them.*GroupKFold"):
        make(3).fit(X, y, groups=g)
    # any other keyword needs metadata routing
    with pytest.raises(ValueError, match=r"unexpected keyword arguments \['group'\] \(did you mean groups\?\)"):
        make(GroupKFold(3)).fit(X, y, group=g)
    with sklearn.config_context(enable_metadata_routing=True):
        # a K-fold does not request groups: scikit-learn's routing refuses them
        with pytest.raises(TypeError, match="groups"):
            make(3).fit(X, y, groups=g)


def test_holdout_and_leave_one_out_refuse_groups():
    X, y, g = _data(False)
    with pytest.raises(ValueError, match="does not use them"):
        BilevelRidgeCV(cv=None).fit(X, y, groups=g)
    with pytest.raises(ValueError, match="does not use them"):
        HyperL2Regressor(cv="loo", penalty="scalar").fit(X, y, groups=g)
    with pytest.raises(ValueError, match="does not use them"):
        BilevelRidgeCV(validation_fraction=0.3).fit(X, y, groups=g)


def test_groups_reach_an_inner_group_splitter_through_grid_search_with_routing():
    from sklearn.model_selection import GridSearchCV

    X, y, g = _data(False)
    grid = {"fit_intercept": [True, False]}
    with sklearn.config_context(enable_metadata_routing=True):
        search = GridSearchCV(BilevelRidgeCV(cv=GroupKFold(3)), grid, cv=GroupKFold(2))
        search.fit(X, y, groups=g)
    assert search.best_estimator_.alpha_ > 0


def test_metadata_routing_sends_groups_to_the_splitter_only():
    router = HyperL2Classifier(cv=GroupKFold(3)).get_metadata_routing()
    assert router.consumes("fit", ["groups"]) == {"groups"}
    # an integer cv's K-fold requests nothing
    router = HyperL2Regressor(cv=5).get_metadata_routing()
    assert router.consumes("fit", ["groups"]) == set()
