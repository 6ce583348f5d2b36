"""Train a Med-Adapter segmenter on a Medical Segmentation Decathlon task (any task with a dataset.json).

Without --data-dir this trains on the 12-case sample of real MSD Task04 Hippocampus MRI shipped in
examples/data/msd_hippocampus_sample (CC-BY-SA 4.0, see its ATTRIBUTION.md). With a full task and a GPU:

    accelerate launch examples/train_msd.py --data-dir Task04_Hippocampus --crop-size 32 64 48 \\
        --backbone microsoft/swin-tiny-patch4-window7-224 --decoder-channels 512 --samples-per-case 1 --epochs 250 \\
        --sw-overlap 0.671875 --val-every 1000

Channels come from the task's "modality", classes from its "labels"; the metrics are per-class Dice and HD95
and their means. See examples/README.md for the layout, multi-GPU and multi-machine commands, and resume.
"""

from pathlib import Path

from medtuning_peft.training import run_example

SAMPLE = Path(__file__).resolve().parent / "data" / "msd_hippocampus_sample"

# CPU demo defaults, sized for the hippocampus crops (about 36 x 50 x 35 voxels).
DEFAULTS = {
    "output_dir": "outputs/train_msd",
    "crop_size": [32, 48, 40],
    "decoder_channels": 32,
    "max_steps": 150,
    "val_every": 50,
    "samples_per_case": 8,
    "sw_overlap": 0.5,
}

if __name__ == "__main__":
    run_example(
        __doc__,
        dataset="msd",
        default_data_dir=SAMPLE,
        data_note="real MSD Task04 Hippocampus MRI, 12-case sample shipped with the repository (CC-BY-SA 4.0)",
        **DEFAULTS,
    )
