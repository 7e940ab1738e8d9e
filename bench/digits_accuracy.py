"""The digits profiles on the talk's data: accuracy on the official 10,000 MNIST test digits.

Trains each profile (`python -m training digits --profile P --data full`), with and without
augmentation, each into a model folder of its own, and reads its metrics.json: the test
accuracy of the export, the best and the "stable" figure of its test-accuracy curve (the
median of the curve's last quarter: the talk's "99.5% stable"), the validation accuracy
(where every choice of schedule was made; the test split is only reported), and the seconds
of training. Writes bench/results/digits_accuracy.json, a plot of the curves beside the
talk's figures, and the table between the markers in docs/benchmarks.md. A run of some
profiles only keeps the rows of the others from the last run, each row saying which commit
measured it.

    python bench/digits_accuracy.py [--profiles cpu,gpu,best] [--augment both|on|off]

About 70 minutes on 2 CPU cores for all six runs (`make bench-accuracy`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DOCS = ROOT / "docs" / "benchmarks.md"
PLOT = ROOT / "docs" / "digits-accuracy.png"
START, END = "<!-- digits-accuracy:start -->", "<!-- digits-accuracy:end -->"
TALK_STABLE, TALK_MAX = 0.995, 0.9958
# What issue 24 asks of each profile: test accuracy, and at most this many seconds of training
# on 2 CPU cores (None: no time asked).
TARGETS = {("cpu", True): (0.994, 360), ("gpu", True): (0.995, None), ("gpu", False): (0.995, None),
           ("best", True): (0.9965, 1800)}


def train(profile: str, augmented: bool, work: Path) -> dict:
    name = f"{profile}-{'augmented' if augmented else 'plain'}"
    models, runs = work / name / "models", work / name / "runs"
    command = [sys.executable, "-m", "training", "digits", "--profile", profile, "--data", "full",
               "--model-base", str(models), "--runs-dir", str(runs)]
    if not augmented:
        command.append("--no-augment")
    print(f"{name}: {' '.join(command[1:])}", flush=True)
    started = time.monotonic()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if result.returncode not in (0, 3):  # 3: trained and measured, but not blessed
        raise RuntimeError(f"{name} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    metrics = json.loads(next(runs.glob("digits/*/metrics.json")).read_text())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "training"], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    curve = metrics["test_accuracy_curve"]
    last_quarter = sorted(p["test_accuracy"] for p in curve[-max(1, len(curve) // 4):])
    row = {
        "profile": profile, "augmented": augmented, "steps": metrics["settings"]["steps"],
        "test_accuracy": metrics["test_accuracy"], "test_examples": metrics["test_examples"],
        "validation_accuracy": metrics["validation_accuracy"],
        "curve_max": max(p["test_accuracy"] for p in curve),
        "curve_stable": last_quarter[len(last_quarter) // 2],
        "train_seconds": metrics["train_seconds"], "wall_seconds": round(time.monotonic() - started, 1),
        "images_per_second": metrics["images_per_second"], "data": metrics["data"],
        "commit": commit + ("+changes" if dirty else ""), "curve": curve,
        "command": f"python -m training digits --profile {profile} --data full"
                   + ("" if augmented else " --no-augment"),
    }
    print(f"{name}: test accuracy {row['test_accuracy']:.2%} (curve: max {row['curve_max']:.2%}, "
          f"stable {row['curve_stable']:.2%}), validation {row['validation_accuracy']:.2%}, "
          f"{row['train_seconds'] / 60:.1f} min of training", flush=True)
    return row


def verdict(row: dict) -> str:
    target = TARGETS.get((row["profile"], row["augmented"]))
    if target is None:
        return "reported"
    accuracy, seconds = target
    met = row["test_accuracy"] >= accuracy and (seconds is None or row["train_seconds"] <= seconds)
    wanted = f">= {accuracy:.2%}" + ("" if seconds is None else f" in <= {seconds // 60} min")
    return f"{'met' if met else 'NOT met'} ({wanted})"


def table(rows: list[dict], machine: str) -> str:
    lines = [
        f"Measured by `python bench/digits_accuracy.py` (`make bench-accuracy`) on {machine}, on the "
        f"official 10,000 MNIST test digits, training on 55,000 digits (5,000 held out for "
        f"validation). The talk reports 99.5% stable and 99.58% at best for its recipe (the gpu "
        f"profile, without augmentation). \"stable\" is the median of the test-accuracy curve's "
        f"last quarter; the curve is recorded, never used to choose anything.",
        "",
        "| profile | augmentation | steps | test accuracy | curve max | curve stable | validation "
        "| training | target | commit |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['profile']} | {'yes' if r['augmented'] else 'no'} | {r['steps']:,} "
            f"| **{r['test_accuracy']:.2%}** | {r['curve_max']:.2%} | {r['curve_stable']:.2%} "
            f"| {r['validation_accuracy']:.2%} | {r['train_seconds'] / 60:.1f} min "
            f"({r['images_per_second']:,.0f} images/s) | {verdict(r)} | {r['commit']} |")
    lines += ["", "Commands: " + "; ".join(f"`{r['command']}`" for r in rows) + ".", "",
              f"![test accuracy of each run along its training]({PLOT.name})"]
    return "\n".join(lines)


def plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for r in rows:
        steps = [p["step"] for p in r["curve"]]
        ax.plot(steps, [100 * p["test_accuracy"] for p in r["curve"]], marker=".",
                linestyle="-" if r["augmented"] else "--",
                label=f"{r['profile']}{'' if r['augmented'] else ', no augmentation'}")
    ax.axhline(100 * TALK_STABLE, color="grey", linewidth=0.8, linestyle=":")
    ax.axhline(100 * TALK_MAX, color="grey", linewidth=0.8, linestyle="-.")
    ax.text(0, 100 * TALK_STABLE, " the talk: 99.5% stable", va="bottom", fontsize=8, color="grey")
    ax.text(0, 100 * TALK_MAX, " the talk: 99.58% max", va="bottom", fontsize=8, color="grey")
    ax.set(xlabel="training step (batches of 100)", ylabel="test accuracy (%)", ylim=(98.8, 99.85),
           title="Görner's batch-norm CNN on the official 10,000 MNIST test digits")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(PLOT, dpi=90)
    plt.close(fig)


def write_docs(text: str) -> None:
    doc = DOCS.read_text()
    if START in doc:
        before, rest = doc.split(START, 1)
        after = rest.split(END, 1)[1]
        doc = before + START + "\n" + text + "\n" + END + after
    else:  # first run: the section comes first, after the page's introduction
        intro, _, sections = doc.partition("\n## ")
        doc = (f"{intro}\n## Digits accuracy on full MNIST, every profile\n\n{START}\n{text}\n"
               f"{END}\n\n## {sections}")
    DOCS.write_text(doc)


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profiles", default="cpu,gpu,best")
    parser.add_argument("--augment", choices=("both", "on", "off"), default="both")
    parser.add_argument("--no-docs", action="store_true", help="do not write docs/benchmarks.md")
    args = parser.parse_args()
    work = RESULTS / "digits-accuracy"
    shutil.rmtree(work, ignore_errors=True)
    augment = {"both": (True, False), "on": (True,), "off": (False,)}[args.augment]
    measured = [train(profile, augmented, work) for profile in args.profiles.split(",")
                for augmented in augment]
    saved = RESULTS / "digits_accuracy.json"
    earlier = json.loads(saved.read_text()) if saved.exists() else []
    again = {(r["profile"], r["augmented"]) for r in measured}
    order = {profile: i for i, profile in enumerate(("cpu", "gpu", "best", "quick"))}
    rows = sorted(measured + [r for r in earlier if (r["profile"], r["augmented"]) not in again],
                  key=lambda r: (order.get(r["profile"], 9), not r["augmented"]))
    machine = f"{cpu_name()}, {os.cpu_count()} cores"
    RESULTS.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(rows, indent=2) + "\n")
    text = table(rows, machine)
    print("\n" + text)
    if not args.no_docs:
        plot(rows)
        write_docs(text)
    return 0 if all("NOT" not in verdict(r) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
