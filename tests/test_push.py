"""Pushes are atomic: a push killed at any moment leaves no partial version."""

import os
import random
import shutil
import signal
import subprocess
import sys
import time

from conftest import ROOT

from training.push import STAGING_PREFIX, push_version, pushed_versions

PUSH = "import sys; from training.push import push_version; push_version(sys.argv[1], sys.argv[2])"


def export_copy(trained, tmp_path, padding_mb: int = 0):
    export = tmp_path / "export"
    shutil.copytree(trained.version_dir, export)
    if padding_mb:  # a bigger export widens the window in which a kill lands mid-copy
        (export / "assets.extra" / "padding.bin").write_bytes(os.urandom(padding_mb << 20))
    return export


def assert_every_version_complete(model_dir, export):
    expected = {p.relative_to(export): p.stat().st_size for p in export.rglob("*") if p.is_file()}
    for version in (p for p in model_dir.iterdir() if p.name.isdigit()):
        found = {p.relative_to(version): p.stat().st_size for p in version.rglob("*") if p.is_file()}
        assert found == expected, f"version {version.name} is incomplete"


def test_push_creates_the_next_integer_version(trained, tmp_path):
    export = export_copy(trained, tmp_path)
    assert push_version(export, tmp_path / "m") == 1
    assert push_version(export, tmp_path / "m") == 2
    assert pushed_versions(tmp_path / "m") == [1, 2]
    assert_every_version_complete(tmp_path / "m", export)


def test_version_numbers_are_never_reused_after_a_rollback(trained, tmp_path):
    export = export_copy(trained, tmp_path)
    model_dir = tmp_path / "m"
    assert [push_version(export, model_dir) for _ in range(3)] == [1, 2, 3]
    shutil.rmtree(model_dir / "3")  # roll back by removing the newest version
    assert push_version(export, model_dir) == 4  # a client pinned to 3 never gets another model


def test_push_killed_at_random_moments_never_leaves_a_partial_version(trained, tmp_path):
    export = export_copy(trained, tmp_path, padding_mb=40)
    model_dir = tmp_path / "models" / "digits"
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", PUSH, str(export), str(model_dir)], cwd=ROOT, check=True)
    duration = time.perf_counter() - started
    shutil.rmtree(model_dir)

    rng = random.Random(7)
    killed_mid_copy = 0
    for _ in range(25):
        child = subprocess.Popen([sys.executable, "-c", PUSH, str(export), str(model_dir)], cwd=ROOT)
        time.sleep(rng.uniform(0, duration))
        child.send_signal(signal.SIGKILL)
        child.wait()
        if model_dir.exists():
            killed_mid_copy += any(p.name.startswith(STAGING_PREFIX) for p in model_dir.iterdir())
            assert_every_version_complete(model_dir, export)
    assert killed_mid_copy > 0, "no kill landed during a copy: the test proved nothing"

    version = push_version(export, model_dir)  # the next run succeeds and cleans up
    assert version == max(pushed_versions(model_dir))
    assert not [p for p in model_dir.iterdir() if p.name.startswith(STAGING_PREFIX)]
    assert_every_version_complete(model_dir, export)
