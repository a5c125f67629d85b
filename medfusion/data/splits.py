"""Held-out test split and k-fold cross-validation folds, grouped by patient. Pure functions.

The split is an artifact (data/splits/<dataset>.json), written once by the split stage and only
read by training and evaluation. Units are test cases (an image, or a whole volume); a patient
group is never divided between test and training, nor between folds.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from medfusion.common import UserError


class SplitError(UserError, ValueError):
    pass


def select_test_groups(
    groups: list[str], rule: str, test_fraction: float, rng: np.random.Generator
) -> list[str]:
    """Choose the held-out test groups by `rule` ("fraction", "last:N" or "count:N", see DatasetSpec)."""
    groups = sorted(groups)
    kind, _, arg = rule.partition(":")
    if kind == "fraction":
        n = max(1, round(test_fraction * len(groups)))
    elif kind in ("last", "count"):
        n = int(arg)
    else:
        raise SplitError(f"unknown test rule {rule!r}; expected fraction, last:N or count:N")
    if n >= len(groups):
        raise SplitError(f"test rule {rule!r} needs more than {n} patient groups; found {len(groups)}")
    if kind == "last":
        return groups[-n:]
    return sorted(rng.permutation(groups)[:n].tolist())


def make_split(
    case_groups: dict[str, str], test_rule: str, n_folds: int, seed: int, test_fraction: float
) -> dict:
    """Test split and folds.

    Args:
        case_groups: case_id -> patient group.
        test_rule: see `select_test_groups`.
        n_folds: cross-validation folds inside the training part.
        seed: makes the split reproducible.
        test_fraction: used by the "fraction" rule.

    Returns:
        {"test": [case ids], "folds": [{"train": [...], "val": [...]}, ...]}, all lists sorted.
        Folds are balanced by number of cases (`balanced_group_folds`, scikit-learn's GroupKFold
        rule), a patient group in exactly one fold; `seed` shuffles which groups go together.
    """
    rng = np.random.default_rng(seed)
    sizes = Counter(case_groups.values())
    test_groups = set(select_test_groups(list(sizes), test_rule, test_fraction, rng))
    train_groups = [g for g in rng.permutation(sorted(sizes)).tolist() if g not in test_groups]
    if len(train_groups) < n_folds:
        raise SplitError(
            f"cv.n_folds = {n_folds}: the {len(train_groups)} patient groups left for training (after "
            f"{len(test_groups)} held out for testing) cannot make {n_folds} folds; set cv.n_folds to at "
            f"most {len(train_groups)}"
        )
    # The seeded order of the groups is their label: the balancing breaks ties by label, so which
    # groups share a fold depends on `seed`.
    fold_list = balanced_group_folds([sizes[g] for g in train_groups], n_folds)
    fold_of = dict(zip(train_groups, fold_list, strict=True))
    folds = []
    for k in range(n_folds):
        val = sorted(c for c, g in case_groups.items() if fold_of.get(g) == k)
        train = sorted(c for c, g in case_groups.items() if g in fold_of and fold_of[g] != k)
        folds.append({"train": train, "val": val})
    test = sorted(c for c, g in case_groups.items() if g in test_groups)
    return {"test": test, "folds": folds}


def balanced_group_folds(sizes: list[int], n_folds: int) -> list[int]:
    """The fold of each group (given by its number of cases, in label order): the largest group
    first, each to the fold with the fewest cases so far (ties: the lower fold; equal sizes: the
    higher label first). This is scikit-learn's GroupKFold without shuffling, written out so that
    the split stage does not import scikit-learn (2 s); tests/test_splits_stats.py checks that
    both agree."""
    counts = np.asarray(sizes)
    order = np.argsort(counts, kind="stable")[::-1]
    per_fold = np.zeros(n_folds)
    fold = np.zeros(len(counts), dtype=int)
    for group in order:
        lightest = int(np.argmin(per_fold))
        per_fold[lightest] += counts[group]
        fold[group] = lightest
    return fold.tolist()
