"""``feather-export calibrate``: the subcommand's arguments and handler (wired into ``cli/main.py``)."""
from __future__ import annotations

import argparse


def add_calibrate_parser(subparsers) -> argparse.ArgumentParser:
    from feather_export.quality.calibrate import CalibrateOptions

    d = CalibrateOptions()
    p = subparsers.add_parser(
        "calibrate", help="per-layer image-token similarity and a suggested BTP --schedule",
        description=("Run the unpruned model on calibration items and measure, per decoder layer, the "
                     "mean cosine similarity of the image tokens entering and leaving it; write "
                     "calibration.json and similarity.png and print a BTP --schedule suggested by a "
                     "documented deterministic rule (README, 'BTP')."))
    p.add_argument("--model", default=d.model,
                   help=f"checkpoint directory or built-in name (default: {d.model})")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", metavar="FILE.jsonl",
                     help="calibration items, the eval --data format (image, question[, answers]); "
                          "no default: give this or --synthetic")
    src.add_argument("--synthetic", type=int, metavar="N",
                     help="N items of the shapes task (val split); no default: give this or --data")
    p.add_argument("--seed", type=int, default=d.seed, help=f"shapes-task seed (default {d.seed})")
    p.add_argument("--out", help="directory for calibration.json and similarity.png (default: "
                   "print only)")
    p.add_argument("--threads", type=int, default=d.threads,
                   help=f"torch intra-op threads (0: torch's default; default {d.threads})")
    p.set_defaults(func=cmd_calibrate)
    return p


def cmd_calibrate(args) -> int:
    import json

    from feather_export.cli.eval import command_line
    from feather_export.quality.calibrate import CalibrateOptions, calibrate

    result = calibrate(CalibrateOptions(model=args.model, data=args.data, synthetic=args.synthetic,
                                        seed=args.seed, out=args.out, threads=args.threads),
                       command=command_line("calibrate"))
    print(json.dumps({k: result[k] for k in ("similarity", "suggested_schedule", "usage")}))
    return 0
