"""Case records: CaseFiles refuses descriptions its loader cannot honour, naming the case and the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from medtuning_peft.data import CaseFiles


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
