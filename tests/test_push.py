"""Pushes are atomic: a push, or the trainer around it, killed at any moment leaves no partial
version."""

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import DIGITS_CONFIG, ROOT
from reliability import record

from serving.tfserving.versions import pushed_versions
from training.push import HIGH_WATER, LOCK, STAGING_PREFIX, push_version

PUSH = "import sys; from training.push import push_version; push_version(sys.argv[1], sys.argv[2])"
# The end of every training job, as in training/digits.py run(): export, verify the export in a
# fresh process with saved_model_cli, bless, push. Training itself is skipped (an untrained model
# exports and pushes the same way), so one trainer costs seconds and can be killed many times.
TRAINER_END = """
import sys
from pathlib import Path
import numpy as np
from training import digits, pipeline
model_dir, run_dir = Path(sys.argv[1]), Path(sys.argv[2])
model = digits.build_model()
print("exporting", flush=True)
digits.export(model, run_dir / "export", np.random.default_rng(0).random((8, 28, 28), dtype=np.float32))
pipeline.verify_export(run_dir / "export", {"image": np.zeros((2, 28, 28), np.float32)},
                       ["probabilities", "digit"])
sys.exit(pipeline.finish("digits", run_dir, run_dir / "export", model_dir, {},
                         lambda _: ({}, pipeline.Blessing(True, "kill test")), "kill test"))
"""


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


def test_concurrent_pushes_among_stale_staging_folders_all_land_with_distinct_numbers(
        trained, tmp_path):
    """Eight pushes at once, each removing the staging folders that dead pushes left behind:
    none may fail because another push renamed or removed a folder it had just listed, and the
    highest-version mark must end at the highest number."""
    export = export_copy(trained, tmp_path)
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    host = socket.gethostname()
    for n in range(40):  # PIDs above the kernel's pid_max: certainly dead
        (model_dir / f"{STAGING_PREFIX}{host}-{99_999_000 + n}-{n:08x}").mkdir()
    script = PUSH + "; print('pushed')"
    pushers = [subprocess.Popen([sys.executable, "-c", script, str(export), str(model_dir)],
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for _ in range(8)]
    outcomes = [p.communicate(timeout=120) for p in pushers]
    assert [p.returncode for p in pushers] == [0] * 8, [err[-500:] for _, err in outcomes]
    assert pushed_versions(model_dir) == list(range(1, 9))
    assert (model_dir / HIGH_WATER).read_text().strip() == "8"
    assert not list(model_dir.glob(STAGING_PREFIX + "*"))
    assert_every_version_complete(model_dir, export)


def test_a_push_takes_its_number_only_while_it_holds_the_model_s_lock(trained, tmp_path):
    """The race above cannot be forced on every run; this shows, every time, that numbers are
    taken under the lock: while another holder has it, a push copies but lands nothing, and the
    number it then takes follows what the holder recorded."""
    import fcntl

    export = export_copy(trained, tmp_path)
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    with open(model_dir / LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        pusher = subprocess.Popen([sys.executable, "-c", PUSH + "; print('pushed')", str(export),
                                   str(model_dir)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while not any((p / "saved_model.pb").exists() for p in model_dir.glob(STAGING_PREFIX + "*")):
            assert pusher.poll() is None and time.monotonic() < deadline  # copying, then waiting
            time.sleep(0.05)
        time.sleep(1)
        assert pusher.poll() is None
        assert pushed_versions(model_dir) == []
        # Another pusher, holding the lock, took numbers up to 5 and its versions were rolled
        # back: the waiting push must read the mark after it gets the lock, not before.
        (model_dir / HIGH_WATER).write_text("5\n")
    assert pusher.communicate(timeout=60)[0].strip() == "pushed"
    assert pushed_versions(model_dir) == [6]
    assert_every_version_complete(model_dir, export)


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


def start_trainer_end(model_dir, run_dir) -> subprocess.Popen:
    """The trainer's export-verify-push in its own process group (it runs saved_model_cli as a
    child), so a kill takes the whole job down, as stopping its container would."""
    run_dir.mkdir(parents=True)
    with open(run_dir / "stderr.txt", "w") as log:
        trainer = subprocess.Popen([sys.executable, "-c", TRAINER_END, str(model_dir), str(run_dir)],
                                   cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True,
                                   start_new_session=True)
    trainer.run_dir = run_dir
    return trainer


def trainer_log(trainer: subprocess.Popen) -> str:
    return (trainer.run_dir / "stderr.txt").read_text()[-2000:]


def wait_until_exporting(trainer: subprocess.Popen) -> float:
    assert trainer.stdout.readline().strip() == "exporting", trainer_log(trainer)
    return time.monotonic()


def kill_job(trainer: subprocess.Popen) -> bool:
    """SIGKILL the trainer and its children; True if it was still running."""
    running = trainer.poll() is None
    try:
        os.killpg(trainer.pid, signal.SIGKILL)
    except ProcessLookupError:  # it had finished, children and all
        pass
    trainer.wait(timeout=30)
    return running


@pytest.mark.timeout(1800)  # 7 to 9 trainer runs: about 2 minutes here, more on a slower machine
def test_trainer_killed_during_export_verify_and_push_never_shows_a_partial_version(tmp_path):
    from serving.model_server.servables import END, ServableManager
    from serving.tfserving.configs import read_model_config

    base, runs = tmp_path / "models", tmp_path / "runs"
    model_dir = base / "digits"
    config = tmp_path / "models.config"
    config.write_text(DIGITS_CONFIG % "model_version_policy { all {} }")
    # A model server watching all along: it loads every version the moment it becomes visible,
    # so a partial one would fail to load and show up in its status.
    server = ServableManager(read_model_config(config), {"/models": str(base)}, poll_seconds=0.05)
    server.start()
    try:
        trainer = start_trainer_end(model_dir, runs / "calibration")
        exporting = wait_until_exporting(trainer)
        assert trainer.wait(timeout=300) == 0, trainer_log(trainer)
        window = time.monotonic() - exporting  # export -> verify -> bless -> push -> exit
        assert pushed_versions(model_dir) == [1]

        # Kills spread across the window: during export, saved_model_cli, and the push.
        rng = random.Random(11)
        moments, kills, landed = [(i + rng.random()) / 4 * 0.9 * window for i in range(4)], 0, 0
        for i, moment in enumerate(moments):
            trainer = start_trainer_end(model_dir, runs / f"killed-{i}")
            time.sleep(max(0.0, wait_until_exporting(trainer) + moment - time.monotonic()))
            kills, landed = kills + 1, landed + kill_job(trainer)
        # And kills aimed at the push itself: the moment its staging folder appears.
        staging_left = 0
        for i in range(3):
            trainer = start_trainer_end(model_dir, runs / f"killed-in-push-{i}")
            wait_until_exporting(trainer)
            while trainer.poll() is None and not any(
                    p.name.startswith(STAGING_PREFIX) for p in model_dir.iterdir()):
                time.sleep(0.0005)
            kills, landed = kills + 1, landed + kill_job(trainer)
            staging_left = sum(p.name.startswith(STAGING_PREFIX) for p in model_dir.iterdir())
            if staging_left:
                break
        assert staging_left, "no kill landed inside a push: the leftovers case went untested"
        before_final = max([int(p.name) for p in model_dir.iterdir() if p.name.isdigit()]
                           + [int((model_dir / HIGH_WATER).read_text())])

        trainer = start_trainer_end(model_dir, runs / "final")
        wait_until_exporting(trainer)
        assert trainer.wait(timeout=300) == 0, trainer_log(trainer)  # despite the leftovers
        final = max(pushed_versions(model_dir))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and final not in server.models["digits"].loaded:
            time.sleep(0.05)
        status = server.status("digits")
    finally:
        server.stop()
    record("trainer_killed_during_export_and_push", kills=kills, kills_landed=landed,
           window_s=round(window, 1), staging_left_by_a_kill=staging_left,
           versions_pushed=len(pushed_versions(model_dir)), final_version=final,
           partial_versions_seen=sum(1 for _, state, error in status if state == END and error))
    assert landed >= 3, "most kills came after the trainer had finished: the test proved little"
    assert final == before_final + 1
    assert not [p for p in model_dir.iterdir() if p.name.startswith(STAGING_PREFIX)]
    assert not [p for p in model_dir.iterdir() if p.name.isdigit() and not (p / "saved_model.pb").is_file()]
    # Every version directory the model server ever saw was whole: it loaded, none failed.
    assert [(v, error) for v, _, error in status if error] == []
    assert {v for v, _, _ in status} == set(pushed_versions(model_dir))
    assert final in server.models["digits"].loaded
