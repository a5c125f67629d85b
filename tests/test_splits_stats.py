import pytest

from medfusion.data.splits import SplitError, make_split


def _groups(n_patients: int, per_patient: int) -> dict[str, str]:
    return {f"p{p:02d}_{i}": f"p{p:02d}" for p in range(n_patients) for i in range(per_patient)}


def test_split_is_complete_disjoint_grouped_and_deterministic():
    groups = _groups(20, 3)
    split = make_split(groups, "fraction", 5, seed=7, test_fraction=0.2)
    assert split == make_split(groups, "fraction", 5, seed=7, test_fraction=0.2)
    assert split != make_split(groups, "fraction", 5, seed=8, test_fraction=0.2)
    test = set(split["test"])
    assert len({groups[c] for c in test}) == 4  # 20% of 20 patients
    vals = [set(f["val"]) for f in split["folds"]]
    assert set().union(*vals) | test == set(groups)  # complete
    assert sum(len(v) for v in vals) + len(test) == len(groups)  # disjoint
    for fold in split["folds"]:
        assert not set(fold["train"]) & set(fold["val"]) and not set(fold["train"]) & test
        # a patient is never on both sides
        assert not {groups[c] for c in fold["train"]} & {groups[c] for c in fold["val"]}
    assert max(map(len, vals)) - min(map(len, vals)) <= 3  # balanced to within one patient


def test_chase_rule_holds_out_the_last_children():
    groups = {f"Image_{k:02d}{e}": f"{k:02d}" for k in range(1, 15) for e in "LR"}
    split = make_split(groups, "last:4", 5, seed=0, test_fraction=0.2)
    assert split["test"] == [f"Image_{k:02d}{e}" for k in range(11, 15) for e in "LR"]  # the last 8 images


def test_split_errors_are_clear():
    with pytest.raises(SplitError, match="cannot make 5 folds"):
        make_split(_groups(5, 1), "fraction", 5, 0, 0.2)
    with pytest.raises(SplitError, match="needs more than 30 patient groups"):
        make_split(_groups(10, 1), "count:30", 2, 0, 0.2)


@pytest.mark.parametrize("seed", range(5))
def test_balanced_group_folds_are_scikit_learns_group_k_fold(seed):
    """The split stage's fold rule is GroupKFold's (without its 2 s import): same folds."""
    import numpy as np
    from sklearn.model_selection import GroupKFold

    from medfusion.data.splits import balanced_group_folds

    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 6, size=int(rng.integers(5, 40))).tolist()  # ties included
    labels = np.repeat(np.arange(len(sizes)), sizes)
    expected = np.zeros(len(sizes), dtype=int)
    for k, (_, val) in enumerate(GroupKFold(n_splits=5).split(labels, groups=labels)):
        expected[np.unique(labels[val])] = k
    assert balanced_group_folds(sizes, 5) == expected.tolist()
