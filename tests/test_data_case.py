"""Case records: CaseFiles refuses descriptions its loader cannot honour, naming the case and the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from medtuning_peft.data import (
    CaseFiles,
    channel_key,
    channel_order,
    list_brats_cases,
    list_kits19_cases,
    read_msd_task,
)


def test_label_values_above_255_are_refused_for_a_labelled_case():
    # VolumeCase.label is uint8: a label of 256 would be read as 0 (background) and 300 as 44.
    with pytest.raises(ValueError, match=r"case_id='atlas_01'.*label_values=\(0, 256, 300\).*0\.\.255"):
        CaseFiles(
            case_id="atlas_01",
            images=(Path("t1.nii.gz"),),
            label=Path("aseg.nii.gz"),
            channel_names=("t1",),
            label_values=(0, 256, 300),
            modality="MRI",
        )


@pytest.mark.parametrize(
    ("reader", "what"),
    [
        (list_kits19_cases, "KiTS19 data_dir"),
        (list_brats_cases, "BraTS data_dir"),
        (read_msd_task, "MSD task folder"),
    ],
)
def test_readers_given_a_file_or_a_missing_folder_say_which(tmp_path, reader, what):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a data set")
    with pytest.raises(FileNotFoundError, match=rf"{what} '.*notes.txt' is a file, not a folder; pass"):
        reader(notes)
    with pytest.raises(FileNotFoundError, match=rf"{what} '.*nowhere' does not exist; pass"):
        reader(tmp_path / "nowhere")


@pytest.mark.parametrize(
    ("names", "expected", "order"),
    [
        (("ADC", "T2"), ("T2", "ADC"), [1, 0]),
        (("T2", "ADC"), ("T2", "ADC"), [0, 1]),
        (("FLAIR", "T1w", "t1gd", "T2w"), ("flair", "t1", "t1ce", "t2"), [0, 1, 2, 3]),  # Decathlon, BraTS
        (("t1n", "t1c", "t2w", "t2f"), ("flair", "t1", "t1ce", "t2"), [3, 0, 1, 2]),  # BraTS 2023
        (
            ("T1wCE", "FLAIR", "T2w", "T1w"),
            ("flair", "t1", "t1ce", "t2"),
            [1, 3, 0, 2],
        ),  # RSNA-ASNR-MICCAI 2021
        (("T2*", "T1"), ("T1", "T2"), None),  # T2-star is another sequence than T2
        (("T2*", "T1"), ("T1", "T2-star"), [1, 0]),
        (("T2", "DWI"), ("T2", "ADC"), None),
        (("T2", "T2w"), ("T2", "ADC"), None),  # one sequence twice
        (("CT",), ("CT", "PET"), None),
    ],
)
def test_channel_order_matches_the_spellings_of_one_sequence(names, expected, order):
    assert channel_order(names, expected) == order


@pytest.mark.parametrize(
    ("name", "key"), [("T1wCE", "t1ce"), ("T2*", "t2star"), ("t2_star", "t2star"), ("T2w", "t2")]
)
def test_channel_key_names_each_sequence_once(name, key):
    assert channel_key(name) == key
