"""Training throughput per profile, and minutes to 98% test accuracy for the digits CNN.

Runs the real trainer (`python -m training`) for each profile this machine can run and reads
each run's metrics.json:
  digits: images per second of training steps (validation excluded), and the training time at
          the first evaluation interval where test accuracy reached 98%;
  bard:   characters per second of training steps, over a short run (--steps): throughput
          does not depend on how long the run is.
The cpu-profile runs push their models to --model-base, so the serving benchmarks that follow
in `make bench` measure models trained in the same run (bard's with few steps: generation speed
depends on the network's size, not on how well it is trained). The gpu profiles need a GPU.

    python bench/training_speed.py [--model-base bench/results/models] [--bard-steps 60]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET_ACCURACY = 0.98


def train(model: str, profile: str, model_base: Path, runs_dir: Path, *extra: str) -> dict:
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "training", model, "--profile", profile,
                             "--model-base", str(model_base), "--runs-dir", str(runs_dir), *extra],
                            cwd=ROOT, capture_output=True, text=True)
    if result.returncode not in (0, 3):  # 3: trained and measured, but not blessed
        raise RuntimeError(f"{model} {profile} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    run_dir = max((runs_dir / model).iterdir(), key=lambda p: p.stat().st_mtime)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics["wall_seconds"] = round(time.monotonic() - started, 1)
    print(result.stdout.strip().splitlines()[-1], flush=True)
    return metrics


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-base", type=Path, default=ROOT / "bench" / "results" / "models")
    parser.add_argument("--bard-steps", type=int, default=60)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "training.json")
    args = parser.parse_args()
    runs_dir = args.model_base.parent / "runs"
    for folder in (args.model_base, runs_dir):  # versions and runs of this benchmark run only
        shutil.rmtree(folder, ignore_errors=True)

    # Only the cpu-profile models are kept for the serving benchmarks.
    bases = {"quick": runs_dir / "quick-models", "cpu": args.model_base}
    rows = []
    for profile in ("quick", "cpu"):
        m = train("digits", profile, bases[profile], runs_dir, "--data", "mnist-5k")
        reached = next((p for p in m["test_accuracy_curve"] if p["test_accuracy"] >= TARGET_ACCURACY), None)
        rows.append({"model": "digits", "profile": profile, "steps": m["settings"]["steps"],
                     "images_per_second": m["images_per_second"], "train_seconds": m["train_seconds"],
                     "test_accuracy": m["test_accuracy"],
                     "minutes_to_98": None if reached is None else round(reached["train_seconds"] / 60, 2),
                     "step_reaching_98": None if reached is None else reached["step"],
                     "evaluated_every_steps": m["settings"]["eval_every"], "wall_seconds": m["wall_seconds"]})
    for profile in ("quick", "cpu"):
        m = train("bard", profile, bases[profile], runs_dir, "--steps", str(args.bard_steps),
                  "--max-val-loss", "100")  # a short run: pushed for the generation benchmark
        rows.append({"model": "bard", "profile": profile, "steps": m["settings"]["steps"],
                     "characters_per_second": m["characters_per_second"],
                     "train_seconds": m["train_seconds"], "wall_seconds": m["wall_seconds"]})

    print(f"\n{'model':7s} {'profile':8s} {'throughput':>22s}  minutes to 98% test accuracy")
    for row in rows:
        if row["model"] == "digits":
            to98 = ("not reached in " + str(row["steps"]) + " steps" if row["minutes_to_98"] is None
                    else f"{row['minutes_to_98']:.2f} (step {row['step_reaching_98']})")
            print(f"{'digits':7s} {row['profile']:8s} {row['images_per_second']:>14,.0f} images/s  {to98}")
        else:
            print(f"{'bard':7s} {row['profile']:8s} {row['characters_per_second']:>15,.0f} chars/s")
    print("gpu profiles: not run (no GPU on this machine)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"benchmark": "training", "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
