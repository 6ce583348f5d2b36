"""Train a Med-Adapter segmenter on KiTS19 (kidney and kidney tumour CT).

Without --data-dir this writes a small synthetic KiTS19-like set (not patient data) in the KiTS19 file layout
into the cache folder and trains on it through the same reader, so the whole pipeline runs on a laptop CPU in a
few minutes. With the real data and a GPU:

    accelerate launch examples/train_kits.py --data-dir kits19/data --backbone microsoft/swin-tiny-patch4-window7-224 \\
        --crop-size 128 128 128 --decoder-channels 512 --samples-per-case 1 --epochs 250 --sw-overlap 0.671875 \\
        --val-every 1000

See examples/README.md for the data layout, multi-GPU and multi-machine commands, and resume.
"""

from medtuning_peft.training import run_example

# CPU demo defaults; the reference recipe's sizes are in the docstring above.
DEFAULTS = {
    "output_dir": "outputs/train_kits",
    "crop_size": [32, 64, 64],
    "decoder_channels": 32,
    "max_steps": 300,
    "val_every": 100,
    "samples_per_case": 8,
    "sw_overlap": 0.5,
}

if __name__ == "__main__":
    run_example(__doc__, dataset="kits19", default_data="synthetic-kits19", **DEFAULTS)
