"""Deterministic, disjoint train/validation splits of case ids (hold-out fraction or k folds), by patient.

Several cases of one patient (time points, cardiac phases) always land on the same side of a split, so a
validation score is never measured on a patient the model was trained on. :func:`patient_id` reads the
patient from the case ids of the releases that encode it (:data:`PATIENT_ID_PATTERNS`); other ids are one
patient each.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np

# Case-id spellings that name the patient and one of several scans of that patient; group "patient" is the patient.
PATIENT_ID_PATTERNS: dict[str, re.Pattern[str]] = {
    # BraTS 2023+ (GLI, MEN, MET, PED, SSA, ...): BraTS-GLI-<patient>-<time point>, e.g. BraTS-GLI-02073-101.
    "brats2023": re.compile(r"^(?P<patient>BraTS-[A-Za-z]+-\d+)-\d+$"),
    # ACDC and nnU-Net's Dataset027_ACDC: patient<NNN>_frame<NN> (end-diastole and end-systole of one heart).
    "acdc": re.compile(r"^(?P<patient>patient\d+)_frame\d+$"),
}


def patient_id(case_id: str) -> str:
    """The patient a case belongs to: ``"BraTS-GLI-02073-101"`` -> ``"BraTS-GLI-02073"``, ``"patient001_frame12"``
    -> ``"patient001"``; an id no pattern of :data:`PATIENT_ID_PATTERNS` matches is its own patient."""
    for pattern in PATIENT_ID_PATTERNS.values():
        match = pattern.match(case_id)
        if match is not None:
            return match.group("patient")
    return case_id


def split_cases(
    case_ids: Sequence[str],
    *,
    val_fraction: float | None = 0.2,
    num_folds: int | None = None,
    fold: int | None = None,
    seed: int = 0,
    patient_of: Callable[[str], str] = patient_id,
) -> tuple[list[str], list[str]]:
    """Splits case ids into training and validation ids, keeping each patient's cases together.

    The patients (``patient_of`` of each id) are sorted, then shuffled with ``seed``, so the result depends
    only on the set of ids and the seed (not on the input order). With ``num_folds``/``fold`` the shuffled
    patients are cut into ``num_folds`` near-equal folds and fold ``fold`` is the validation set; the folds
    of one seed partition the ids. Otherwise the first shuffled patients until they hold at least
    ``round(val_fraction * n)`` cases (at least one patient, never all) are the validation set. When every
    case is its own patient this is a split of the shuffled case ids.

    Args:
        case_ids: Unique case ids.
        val_fraction: Validation share in ``(0, 1)``; ignored when ``num_folds`` is given.
        num_folds: Number of cross-validation folds (>= 2).
        fold: Validation fold in ``[0, num_folds)``.
        seed: Shuffle seed.
        patient_of: Maps a case id to its patient (default :func:`patient_id`); ``lambda case_id: case_id``
            splits cases regardless of patient.

    Returns:
        ``(train_ids, val_ids)``, each sorted, disjoint, together all ``case_ids``; no patient on both sides.

    Raises:
        ValueError: For duplicate ids, fewer than 2 patients, or invalid fraction/fold arguments.
    """
    ids = sorted(case_ids)
    if len(set(ids)) != len(ids):
        duplicates = sorted(i for i, n in Counter(ids).items() if n > 1)
        raise ValueError(f"case_ids has duplicates {duplicates[:5]}; pass each case once.")
    if len(ids) < 2:
        raise ValueError(f"case_ids has {len(ids)} id(s); a split needs at least 2.")
    patient = {i: patient_of(i) for i in ids}
    patients = sorted(set(patient.values()))
    if len(patients) < 2:
        raise ValueError(
            f"case_ids {ids[:5]} belong to {len(patients)} patient ({patients[0]!r}); a split needs cases of at "
            "least 2 patients (pass patient_of=lambda case_id: case_id to split one patient's cases)."
        )
    order = np.random.default_rng(seed).permutation(len(patients))
    shuffled = [patients[i] for i in order]
    if num_folds is not None or fold is not None:
        if num_folds is None or fold is None:
            raise ValueError(f"num_folds={num_folds}, fold={fold}; pass both (e.g. num_folds=5, fold=0).")
        if not 2 <= num_folds <= len(patients):
            raise ValueError(
                f"num_folds={num_folds}; pass 2 <= num_folds <= number of patients ({len(patients)}, "
                f"of {len(ids)} cases)."
            )
        if not 0 <= fold < num_folds:
            raise ValueError(f"fold={fold}; pass 0 <= fold < num_folds ({num_folds}).")
        folds = np.array_split(np.arange(len(patients)), num_folds)
        val_patients = {shuffled[i] for i in folds[fold]}
    else:
        if val_fraction is None or not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction={val_fraction!r}; pass a fraction in (0, 1), e.g. 0.2.")
        size = Counter(patient.values())
        wanted = min(len(ids) - 1, max(1, round(val_fraction * len(ids))))
        val_patients, count = set(), 0
        for name in shuffled[:-1]:  # the last patient always trains
            if count >= wanted:
                break
            val_patients.add(name)
            count += size[name]
    return (
        [i for i in ids if patient[i] not in val_patients],
        [i for i in ids if patient[i] in val_patients],
    )
