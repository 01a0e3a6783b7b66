"""The ``fedpsmos`` command: apply a trained model to new scans, or hand it to nnU-Net.

``fedpsmos predict -m MODEL -i INPUT -o OUTPUT`` segments every CT in a folder (or one file) with a model the
workflow trained (:mod:`fedpsmos.inference.apply`); ``fedpsmos export-nnunet -m MODEL -o FOLDER`` writes an
nnU-Net v2 trained-model folder (:mod:`fedpsmos.inference.nnunet_export`). Errors print one line naming the
file and the problem and exit with status 1.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedpsmos", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    predict = commands.add_parser(
        "predict",
        help="segment CT scans with a trained model",
        description="Segment every CT in INPUT (NIfTI .nii/.nii.gz, .mha, .nrrd, or DICOM series folders) "
        "and write one label file per scan in the scan's own geometry.",
    )
    predict.add_argument("-m", "--model", required=True, help="a model checkpoint (.pt) the workflow wrote")
    predict.add_argument(
        "-i", "--input", required=True, help="a CT file or a folder of CT files / DICOM series"
    )
    predict.add_argument("-o", "--output", required=True, help="output folder (created; written whole)")
    predict.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: cuda if available)")
    predict.add_argument("--step", type=float, default=0.5, help="sliding-window step, fraction of the patch")
    predict.add_argument(
        "--mirror",
        action="store_true",
        help="test-time mirroring (never left-right, see docs/orientation.md)",
    )
    predict.add_argument(
        "--save-probabilities",
        action="store_true",
        help="also write {case}.npz with the class probabilities on the scan's grid",
    )
    predict.add_argument(
        "--ending", default=".nii.gz", choices=(".nii.gz", ".nii", ".mha", ".nrrd"), help="output file ending"
    )
    predict.add_argument(
        "--precision",
        default="auto",
        choices=("auto", "bf16", "fp16", "fp32"),
        help="inference precision (auto: bf16 on GPUs that have it, fp16 on older GPUs, fp32 on the CPU)",
    )
    predict.add_argument("--quiet", action="store_true", help="no progress bar")

    export = commands.add_parser(
        "export-nnunet",
        help="write an nnU-Net v2 trained-model folder",
        description="Write dataset.json, plans.json and fold_0/checkpoint_final.pth so that nnU-Net v2's "
        "nnUNetPredictor (initialize_from_trained_model_folder) loads the model.",
    )
    export.add_argument("-m", "--model", required=True, help="a model checkpoint (.pt) the workflow wrote")
    export.add_argument("-o", "--output", required=True, help="the trained-model folder to write")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedpsmos`` console script; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "predict":
            from fedpsmos.inference.apply import predict_folder

            predict_folder(
                model_path=args.model,
                input_path=args.input,
                output_dir=args.output,
                device=args.device,
                step=args.step,
                mirror=args.mirror,
                save_probabilities=args.save_probabilities,
                ending=args.ending,
                precision=args.precision,
                progress=not args.quiet,
            )
        else:
            from fedpsmos.inference.nnunet_export import export_nnunet

            export_nnunet(model_path=args.model, out_dir=args.output)
    except (ValueError, OSError, RuntimeError) as error:
        print(f"fedpsmos {args.command}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
