"""Deterministic, disjoint train/validation splits of case ids (hold-out fraction or k folds)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np


def split_cases(
    case_ids: Sequence[str],
    *,
    val_fraction: float | None = 0.2,
    num_folds: int | None = None,
    fold: int | None = None,
    seed: int = 0,
) -> tuple[list[str], list[str]]:
    """Splits case ids into training and validation ids.

    The ids are sorted, then shuffled with ``seed``, so the result depends only on the set of ids and
    the seed (not on the input order). With ``num_folds``/``fold`` the shuffled ids are cut into
    ``num_folds`` near-equal folds and fold ``fold`` is the validation set; the folds of one seed
    partition the ids. Otherwise the first ``round(val_fraction * n)`` shuffled ids (at least one, at
    most ``n - 1``) are the validation set.

    Args:
        case_ids: Unique case ids.
        val_fraction: Validation share in ``(0, 1)``; ignored when ``num_folds`` is given.
        num_folds: Number of cross-validation folds (>= 2).
        fold: Validation fold in ``[0, num_folds)``.
        seed: Shuffle seed.

    Returns:
        ``(train_ids, val_ids)``, each sorted, disjoint, together all ``case_ids``.

    Raises:
        ValueError: For duplicate ids, fewer than 2 ids, or invalid fraction/fold arguments.
    """
    ids = sorted(case_ids)
    if len(set(ids)) != len(ids):
        duplicates = sorted(i for i, n in Counter(ids).items() if n > 1)
        raise ValueError(f"case_ids has duplicates {duplicates[:5]}; pass each case once.")
    if len(ids) < 2:
        raise ValueError(f"case_ids has {len(ids)} id(s); a split needs at least 2.")
    order = np.random.default_rng(seed).permutation(len(ids))
    shuffled = [ids[i] for i in order]
    if num_folds is not None or fold is not None:
        if num_folds is None or fold is None:
            raise ValueError(f"num_folds={num_folds}, fold={fold}; pass both (e.g. num_folds=5, fold=0).")
        if not 2 <= num_folds <= len(ids):
            raise ValueError(f"num_folds={num_folds}; pass 2 <= num_folds <= number of cases ({len(ids)}).")
        if not 0 <= fold < num_folds:
            raise ValueError(f"fold={fold}; pass 0 <= fold < num_folds ({num_folds}).")
        folds = np.array_split(np.arange(len(ids)), num_folds)
        val = {shuffled[i] for i in folds[fold]}
    else:
        if val_fraction is None or not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction={val_fraction!r}; pass a fraction in (0, 1), e.g. 0.2.")
        count = min(len(ids) - 1, max(1, round(val_fraction * len(ids))))
        val = set(shuffled[:count])
    return [i for i in ids if i not in val], [i for i in ids if i in val]
