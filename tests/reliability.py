"""Figures from the reliability tests, for docs/reliability.md.

Each scenario writes test-output/reliability/<scenario>.json: what was sent, what failed, how
long recovery took, memory before and after. `python tests/reliability.py` prints them as a
Markdown table."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "test-output" / "reliability"


def record(scenario: str, **figures) -> None:
    """Write one scenario's figures (numbers or short strings), replacing the previous run's."""
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{scenario}.json").write_text(json.dumps(figures, indent=1, sort_keys=True) + "\n")


def rss_mb(pid: int | None = None) -> float:
    """Resident memory of a process (this one by default), in MB, from /proc."""
    status = Path(f"/proc/{pid or os.getpid()}/status").read_text()
    kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
    return round(kb / 1024, 1)


def table() -> str:
    rows = ["| scenario | figures |", "| --- | --- |"]
    for path in sorted(OUT.glob("*.json")):
        figures = json.loads(path.read_text())
        rows.append(f"| {path.stem} | " + ", ".join(f"{k}: {v}" for k, v in figures.items()) + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
    sys.exit(0)
