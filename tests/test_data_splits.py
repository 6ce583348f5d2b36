"""Case splits are deterministic, disjoint and complete; folds partition the cases."""

from __future__ import annotations

import pytest

from medtuning_peft.data import split_cases

IDS = [f"case_{i:05d}" for i in range(23)]


def test_split_is_deterministic_and_independent_of_input_order():
    train, val = split_cases(IDS, val_fraction=0.2, seed=5)
    assert (train, val) == split_cases(list(reversed(IDS)), val_fraction=0.2, seed=5)
    assert split_cases(IDS, val_fraction=0.2, seed=6) != (train, val)


def test_split_is_disjoint_and_complete():
    train, val = split_cases(IDS, val_fraction=0.2)
    assert not set(train) & set(val) and sorted(train + val) == IDS and len(val) == 5


def test_folds_partition_the_cases():
    vals = [split_cases(IDS, num_folds=5, fold=k, seed=1)[1] for k in range(5)]
    assert sorted(sum(vals, [])) == IDS
    assert {len(v) for v in vals} == {4, 5}
    train, val = split_cases(IDS, num_folds=5, fold=2, seed=1)
    assert not set(train) & set(val) and len(train) + len(val) == len(IDS)


def test_tiny_sets_keep_one_case_on_each_side():
    train, val = split_cases(["a", "b"], val_fraction=0.01)
    assert len(train) == 1 and len(val) == 1
    train, val = split_cases(["a", "b", "c"], val_fraction=0.99)
    assert len(train) == 1 and len(val) == 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"val_fraction": 1.5}, "val_fraction"),
        ({"num_folds": 5}, "pass both"),
        ({"num_folds": 1, "fold": 0}, "num_folds=1"),
        ({"num_folds": 5, "fold": 5}, "fold=5"),
    ],
)
def test_invalid_arguments_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        split_cases(IDS, **kwargs)


def test_duplicates_are_refused():
    with pytest.raises(ValueError, match="duplicates"):
        split_cases(["a", "a", "b"])


# Two scans of each patient, spelled as the releases that encode the patient in the case id spell them.
SCANS_OF_ONE_PATIENT = {
    "brats2023": [f"BraTS-GLI-{p:05d}-{t}" for p in range(12) for t in ("100", "101")],
    "acdc": [f"patient{p:03d}_frame{f:02d}" for p in range(1, 13) for f in (1, 12)],
}


def _patient(case_id: str) -> str:
    return case_id.rsplit("-", 1)[0] if case_id.startswith("BraTS") else case_id.split("_")[0]


@pytest.mark.parametrize("release", sorted(SCANS_OF_ONE_PATIENT))
def test_cases_of_one_patient_never_straddle_a_split(release):
    ids = SCANS_OF_ONE_PATIENT[release]
    splits = [split_cases(ids, val_fraction=0.3, seed=s) for s in range(4)]
    splits += [split_cases(ids, num_folds=5, fold=k, seed=1) for k in range(5)]
    for train, val in splits:
        assert val and not {_patient(i) for i in train} & {_patient(i) for i in val}
        assert sorted(train + val) == sorted(ids)
    folds = [split_cases(ids, num_folds=5, fold=k, seed=1)[1] for k in range(5)]
    assert sorted(sum(folds, [])) == sorted(ids)


def test_one_patient_cannot_be_split_unless_asked():
    ids = ["patient001_frame01", "patient001_frame12"]
    with pytest.raises(ValueError, match=r"1 patient \('patient001'\).*patient_of="):
        split_cases(ids)
    train, val = split_cases(ids, val_fraction=0.5, patient_of=lambda case_id: case_id)
    assert len(train) == len(val) == 1 and sorted(train + val) == ids
