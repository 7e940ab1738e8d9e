"""TF Serving's version folders: what a model base path holds, as training writes it and the
model servers read it.

`<base>/<version>/` holds one SavedModel, `<version>` an integer; anything else there (a staging
folder of a push, a lock file) is not a version. A version is complete once its
`saved_model.pb` exists: pushes write that file last and rename the folder into place.
"""

from __future__ import annotations

from pathlib import Path

# Where a version keeps its warmup records (a TFRecord of PredictionLogs), as TF Serving looks
# for them.
WARMUP_FILE = Path("assets.extra") / "tf_serving_warmup_requests"
GRAPH_FILE = "saved_model.pb"

# TF Serving's ModelVersionStatus.State values, and their names in its APIs.
START, LOADING, AVAILABLE, UNLOADING, END = 10, 20, 30, 40, 50
STATE_NAMES = {START: "START", LOADING: "LOADING", AVAILABLE: "AVAILABLE", UNLOADING: "UNLOADING",
               END: "END"}


def version_folders(base: Path) -> dict[int, Path]:
    """The complete versions under `base`: {version: its folder}. A folder's name is its version
    in decimal, leading zeros allowed (`00000123` is version 123, as TF Serving reads it); of two
    folders of one version, the shorter name wins."""
    base = Path(base)
    if not base.is_dir():
        return {}
    found: dict[int, Path] = {}
    for path in sorted(base.iterdir(), key=lambda p: (len(p.name), p.name), reverse=True):
        if path.name.isascii() and path.name.isdigit() and (path / GRAPH_FILE).is_file():
            found[int(path.name)] = path
    return found


def pushed_versions(base: Path) -> list[int]:
    """The complete versions under `base`, ascending."""
    return sorted(version_folders(base))


def latest_version(base: Path) -> int | None:
    versions = pushed_versions(base)
    return versions[-1] if versions else None
