"""Train a Med-Adapter segmenter on BraTS 2019 or 2020 (glioma MRI: FLAIR, T1, T1ce, T2).

Without --data-dir this writes a small synthetic BraTS-like set (not patient data) in the real file layout of
the chosen --year into the cache folder and trains on it through the same reader. With the real data and a GPU:

    accelerate launch examples/train_brats.py --year 2020 --data-dir MICCAI_BraTS2020_TrainingData \\
        --backbone microsoft/swin-tiny-patch4-window7-224 --crop-size 128 128 128 --decoder-channels 512 \\
        --samples-per-case 1 --epochs 250 --sw-overlap 0.671875 --val-every 1000

Labels 0/1/2/4 are trained as classes 0-3 and scored as the regions ET = {4}, TC = {1, 4}, WT = {1, 2, 4};
predicted ET under --et-min-voxels (500) is relabelled NCR before scoring. See examples/README.md.
"""

from medtuning_peft.training import build_parser, train_from_args

# CPU demo defaults; the reference recipe's sizes are in the docstring above.
DEFAULTS = {
    "output_dir": "outputs/train_brats",
    "crop_size": [32, 64, 64],
    "decoder_channels": 32,
    "max_steps": 300,
    "val_every": 100,
    "samples_per_case": 8,
    "sw_overlap": 0.5,
}

if __name__ == "__main__":
    parser = build_parser(__doc__, **DEFAULTS)
    parser.add_argument(
        "--year",
        type=int,
        choices=[2019, 2020],
        default=2020,
        help="BraTS release: the file layout of the built-in synthetic data (the reader accepts both layouts).",
    )
    args = parser.parse_args()
    train_from_args(parser, args, dataset="brats", default_data=f"synthetic-brats{args.year}")
