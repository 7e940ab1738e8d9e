"""The model server's version handling: policy, failed loads, rollback by removal."""

import logging
import shutil

import numpy as np
import pytest
from conftest import DIGITS_CONFIG, copy_model_base
from reliability import record

from serving.model_server.servables import AVAILABLE, END, ServableManager, ServingError
from serving.tfserving.configs import read_model_config
from training.pipeline import write_warmup_requests


def manager_for(base, tmp_path, policy: str = "", labels: str = "") -> ServableManager:
    path = tmp_path / "models.config"
    path.write_text(DIGITS_CONFIG % (policy + labels))
    return ServableManager(read_model_config(path), {"/models": str(base)})


def serving_version_1(trained, tmp_path):
    """A copy of the trained model base, and a manager that has polled it: version 1 serving."""
    base = copy_model_base(trained, tmp_path / "models")
    manager = manager_for(base, tmp_path)
    manager.poll_once()
    return base, manager, manager.servable("digits")


@pytest.fixture
def two_versions(trained, tmp_path):
    base = copy_model_base(trained, tmp_path / "models")
    shutil.copytree(base / "digits" / "1", base / "digits" / "2")
    return base


def test_latest_policy_serves_the_newest_version(two_versions, tmp_path):
    manager = manager_for(two_versions, tmp_path)
    manager.poll_once()
    assert manager.servable("digits").version == 2
    assert [(v, state) for v, state, _ in manager.status("digits")] == [(2, AVAILABLE)]


def corrupt_graph(version):
    (version / "saved_model.pb").write_bytes(b"half written garbage")


def truncate_variables(version):  # a copy that stopped half way through the weights
    data = next((version / "variables").glob("variables.data-*"))
    data.write_bytes(data.read_bytes()[:data.stat().st_size // 2])


def fail_warmup(version):
    """A sound model whose warmup record asks for 5x5 images: it can only fail if the model
    server runs the version's warmup records before it serves the version, as TF Serving does."""
    write_warmup_requests(version, "digits", [{"image": np.zeros((1, 5, 5), np.float32)}])


@pytest.mark.parametrize("corrupt", [corrupt_graph, truncate_variables, fail_warmup])
def test_a_version_that_fails_to_load_is_skipped_and_the_old_one_keeps_serving(
        trained, tmp_path, caplog, corrupt):
    base, manager, serving = serving_version_1(trained, tmp_path)
    broken = base / "digits" / "2"
    shutil.copytree(base / "digits" / "1", broken)
    corrupt(broken)
    with caplog.at_level(logging.ERROR, logger="scribe.model_server"):
        manager.poll_once()
        # The very poll that failed to load version 2 left version 1 loaded: the same servable,
        # never unloaded and reloaded, so no request found the model without a version.
        assert manager.servable("digits") is serving
        assert manager.status("digits", 1) == [(1, AVAILABLE, "")]
        manager.poll_once()  # a failed version is not retried until its files change
    assert manager.servable("digits") is serving
    status = {v: (state, error) for v, state, error in manager.status("digits")}
    failed_loads = len([r for r in caplog.records if "Failed to load version 2" in r.message])
    record(f"newest_version_broken_{corrupt.__name__}", versions_on_disk=2,
           serving_version=manager.servable("digits").version,
           broken_version_state="END" if status[2][0] == END else status[2][0],
           failed_load_attempts_in_2_polls=failed_loads, error=status[2][1].rsplit(": ", 1)[-1][:120])
    assert status[1] == (AVAILABLE, "")
    assert status[2][0] == END and "Failed to load version 2 of digits" in status[2][1]
    assert failed_loads == 1


def test_two_new_versions_at_once_the_newest_broken_the_other_takes_over_in_the_same_poll(
        trained, tmp_path):
    """Version 1 serves until version 2 does: the newest, 3, fails to load, and the same poll
    loads 2 (the newest that can load) before it unloads 1."""
    base = copy_model_base(trained, tmp_path / "models")
    manager = manager_for(base, tmp_path)
    manager.poll_once()
    for version in (2, 3):
        shutil.copytree(base / "digits" / "1", base / "digits" / str(version))
    corrupt_graph(base / "digits" / "3")
    manager.poll_once()
    assert manager.servable("digits").version == 2
    status = {v: state for v, state, _ in manager.status("digits")}
    assert status == {3: END, 2: AVAILABLE, 1: END}


def keeps_version_1_serving(trained, tmp_path, change) -> None:
    """Version 1 serving, then a broken version 2 on disk and `change(base, manager)`: through the
    poll that fails to load version 2 and the next, version 1's servable keeps serving and its
    status says AVAILABLE (so /readyz stays 200 while it answers)."""
    base, manager, serving = serving_version_1(trained, tmp_path)
    shutil.copytree(base / "digits" / "1", base / "digits" / "2")
    corrupt_graph(base / "digits" / "2")
    change(base, manager)
    for _ in range(2):
        manager.poll_once()
        assert manager.servable("digits") is serving
    status = {v: state for v, state, _ in manager.status("digits")}
    assert status == {2: END, 1: AVAILABLE}


def test_a_policy_whose_versions_all_fail_to_load_keeps_the_newest_version_serving(trained, tmp_path):
    """As TF Serving's availability-preserving policy: a config naming only a version that cannot
    load leaves the version already serving in place."""
    def pin_version_2(base, manager):
        specific = tmp_path / "specific.config"
        specific.write_text(DIGITS_CONFIG % "model_version_policy { specific { versions: 2 } }")
        manager.apply_config(read_model_config(specific))

    keeps_version_1_serving(trained, tmp_path, pin_version_2)


def test_the_version_serving_stays_available_when_its_folder_goes_and_the_new_one_cannot_load(
        trained, tmp_path):
    keeps_version_1_serving(trained, tmp_path, lambda base, _: shutil.rmtree(base / "digits" / "1"))


def move_base_path(manager, tmp_path, folder: str) -> None:
    """Reload the config with the digits model's base path moved to /models/<folder>."""
    moved = tmp_path / "moved.config"
    moved.write_text(DIGITS_CONFIG.replace("/models/digits", f"/models/{folder}") % "")
    manager.apply_config(read_model_config(moved))


def test_a_moved_base_path_keeps_the_old_versions_serving_until_the_new_ones_load(
        trained, tmp_path):
    """A config reload pointing the model at another folder: the version loaded from the old one
    answers until the poll that loads the new folder's version, which replaces it even under
    the same number."""
    base, manager, old = serving_version_1(trained, tmp_path)
    shutil.copytree(base / "digits", base / "moved")
    move_base_path(manager, tmp_path, "moved")
    assert manager.servable("digits") is old  # between the reload and the next poll
    manager.poll_once()
    new = manager.servable("digits")
    assert new is not old and (new.version, new.path) == (1, base / "moved" / "1")
    assert old not in manager.models["digits"].loaded.values()  # unloaded
    assert manager.status("digits") == [(1, AVAILABLE, "")]
    shutil.copytree(base / "moved" / "1", base / "moved" / "2")
    manager.poll_once()
    assert manager.servable("digits").path == base / "moved" / "2"


def test_a_base_path_moved_to_a_folder_with_no_versions_yet_keeps_the_old_one_serving(
        trained, tmp_path):
    """A reload that points at a folder not filled (or mounted) yet must not take the model down."""
    base, manager, old = serving_version_1(trained, tmp_path)
    move_base_path(manager, tmp_path, "not-there-yet")
    for _ in range(2):
        manager.poll_once()
        assert manager.servable("digits") is old
    shutil.copytree(base / "digits", base / "not-there-yet")
    manager.poll_once()
    assert manager.servable("digits").path == base / "not-there-yet" / "1"


def test_a_moved_base_path_whose_versions_cannot_load_keeps_the_old_one_serving(trained, tmp_path):
    def move_to_a_broken_version_2(base, manager):
        shutil.copytree(base / "digits" / "2", base / "moved" / "2")
        move_base_path(manager, tmp_path, "moved")

    keeps_version_1_serving(trained, tmp_path, move_to_a_broken_version_2)


def test_a_moved_base_path_whose_version_of_the_same_number_cannot_load_keeps_the_old_one(
        trained, tmp_path):
    base, manager, old = serving_version_1(trained, tmp_path)
    shutil.copytree(base / "digits", base / "moved")
    corrupt_graph(base / "moved" / "1")
    move_base_path(manager, tmp_path, "moved")
    for _ in range(2):  # the failed load is not retried until its files change
        manager.poll_once()
        assert manager.servable("digits") is old
    [(version, state, error)] = manager.status("digits")
    assert (version, state) == (1, AVAILABLE)
    assert f"Failed to load version 1 of digits from {base / 'moved' / '1'}" in error
    shutil.copytree(base / "digits" / "1", base / "moved" / "2")
    manager.poll_once()
    assert manager.servable("digits").path == base / "moved" / "2"
    assert {v: state for v, state, _ in manager.status("digits")} == {2: AVAILABLE, 1: END}


@pytest.mark.parametrize("iterations", [1, 4])
def test_each_warmup_record_runs_the_configured_number_of_times(trained, tmp_path, iterations):
    """TF Serving's --num_request_iterations_for_warmup: every record of a loading version runs
    that many times before the version is AVAILABLE. Counted by the version's batcher, which
    every model run goes through."""
    base = copy_model_base(trained, tmp_path / "models")
    write_warmup_requests(base / "digits" / "1", "digits", [
        {"image": np.zeros((1, 28, 28), np.float32)}, {"image": np.ones((3, 28, 28), np.float32)}])
    path = tmp_path / "models.config"
    path.write_text(DIGITS_CONFIG % "")
    manager = ServableManager(read_model_config(path), {"/models": str(base)}, batching={},
                              warmup_iterations=iterations)
    manager.poll_once()
    assert [(v, state) for v, state, _ in manager.status("digits")] == [(1, AVAILABLE)]
    batcher = manager.servable("digits").batchers["serving_default"]
    assert (batcher.requests_run, batcher.batches_run) == (2 * iterations, 2 * iterations)


def test_removing_the_newest_version_rolls_serving_back(two_versions, tmp_path):
    manager = manager_for(two_versions, tmp_path)
    manager.poll_once()
    shutil.rmtree(two_versions / "digits" / "2")
    manager.poll_once()
    assert manager.servable("digits").version == 1


def test_specific_policy_and_labels_pin_versions(two_versions, tmp_path):
    manager = manager_for(two_versions, tmp_path,
                          policy="model_version_policy { specific { versions: 1 versions: 2 } }",
                          labels=' version_labels { key: "stable" value: 1 }'
                                 ' version_labels { key: "canary" value: 2 }')
    manager.poll_once()
    assert manager.servable("digits").version == 2
    assert manager.servable("digits", label="stable").version == 1
    assert manager.servable("digits", version=1).version == 1
    with pytest.raises(ServingError) as unknown:
        manager.servable("digits", label="nope")
    assert unknown.value.code == "INVALID_ARGUMENT"
