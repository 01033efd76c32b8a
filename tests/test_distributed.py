"""distributed_launcher.py with real processes on 127.0.0.1 and free ports."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from imt_ml import tfrecord_reader as tr
from imt_ml.utils import free_port

from conftest import NORTH_STATION_ASSIGNMENT, sample_root_fixture

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = str(REPO / "src/imt_ml/distributed_launcher.py")


sample_root = sample_root_fixture(1500, seed=13)


def launch(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    # One TensorFlow thread pool each: two processes share this machine's cores.
    env = {**os.environ, "IMT_ML_NO_PROGRESS": "1", "TF_NUM_INTRAOP_THREADS": "1", **env}
    return subprocess.Popen([sys.executable, LAUNCHER, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


def finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"process did not finish in {timeout} s:\n{err[-3000:]}")
    return proc.returncode, out, err


def test_sync_workers_train_in_lock_step_and_only_the_chief_writes(sample_root, tmp_path):
    workers = f"127.0.0.1:{free_port()},127.0.0.1:{free_port()}"
    common = ["sync-tune", "--workers", workers, "--data-dir", str(sample_root), "--max-epochs", "2",
              "--factor", "2", "--batch-size", "64", "--test-days", "1", "--project-name", "sync"]  # fmt: skip
    outputs = {i: tmp_path / f"out{i}" for i in (0, 1)}
    procs = {
        i: launch([*common, "--index", str(i), "--tuner-directory", str(tmp_path / f"kt{i}")],
                  {"IMT_ML_OUTPUT_DIR": str(outputs[i])})
        for i in (1, 0)
    }  # fmt: skip
    results = {i: finish(p) for i, p in procs.items()}
    for i, (code, _, err) in results.items():
        assert code == 0, f"worker {i}:\n{err[-3000:]}"

    # Every trial ended with the same weights on both workers.
    digests = {i: re.findall(r"weights sha256 ([0-9a-f]+)", results[i][2]) for i in (0, 1)}
    assert len(digests[0]) >= 3
    assert digests[0] == digests[1]

    # Only the chief wrote a model, vocab, config and report.
    run_dir = Path(results[0][1].strip().splitlines()[-1])
    assert run_dir.parent == outputs[0] and run_dir.name.startswith("sync-tune_")
    for name in ("track_prediction_model_best.keras", "track_prediction_model_vocab.json",
                 "track_prediction_model_config.json", "training_report.md"):  # fmt: skip
        assert (run_dir / name).exists(), name
    assert not outputs[1].exists() and not (tmp_path / "kt1").exists()
    assert results[1][1].strip() == ""
    report = (run_dir / "training_report.md").read_text()
    assert "MultiWorkerMirroredStrategy" in report and "Synchronous Multi-Worker Search" in report
    predictor = tr.load_predictor(run_dir / "track_prediction_model_best.keras")
    assert predictor.labels[0] == "1"


def test_sync_index_outside_the_worker_list_is_refused(sample_root):
    code, _, err = finish(launch(["sync-tune", "--workers", "127.0.0.1:1,127.0.0.1:2", "--index", "2",
                                  "--data-dir", str(sample_root)], {}), timeout=60)  # fmt: skip
    assert code == 1 and "--index 2 is outside the 2 workers" in err and "Traceback" not in err


def test_sync_peer_that_never_comes_up_is_a_clear_error(sample_root, tmp_path):
    workers = f"127.0.0.1:{free_port()},127.0.0.1:{free_port()}"
    started = time.monotonic()
    code, _, err = finish(launch(["sync-tune", "--workers", workers, "--index", "0", "--data-dir",
                                  str(sample_root), "--peer-timeout", "8"],
                                 {"IMT_ML_OUTPUT_DIR": str(tmp_path / "out")}), timeout=120)  # fmt: skip
    assert code == 1
    assert "could not join the other workers" in err and "Traceback" not in err
    assert time.monotonic() - started < 60
    assert not (tmp_path / "out").exists()


def expected_hyperband_trials(max_epochs: int, factor: int) -> int:
    import keras_tuner as kt

    oracle = kt.oracles.HyperbandOracle(
        objective=kt.Objective("val_accuracy", "max"), max_epochs=max_epochs, factor=factor
    )
    return sum(
        oracle._get_size(bracket, r)
        for bracket in range(oracle._get_num_brackets())
        for r in range(oracle._get_num_rounds(bracket))
    )


def seed_tuner_parallel(tuner_id: str, directory: Path, data_dir: Path, out: Path,
                        taskfile: bool) -> subprocess.Popen:  # fmt: skip
    """The seed README's tuner-parallel command (no oracle address), or its Taskfile form
    (only TUNER_DIRECTORY, TUNER_ID and DATA_DIR in the environment), with a tiny search."""
    tiny = ["--max-epochs", "3", "--factor", "3", "--batch-size", "64", "--test-days", "1"]
    env = {"IMT_ML_OUTPUT_DIR": str(out)}
    if not taskfile:
        return launch(["tuner-parallel", "--tuner-directory", str(directory), "--tuner-id", tuner_id,
                       "--data-dir", str(data_dir), "--project-name", "track_tuning", *tiny], env)  # fmt: skip
    task = shutil.which("task", path=str(Path(sys.executable).parent)) or shutil.which("task")
    if task is None or shutil.which("uv") is None:
        pytest.skip("go-task or uv not installed")
    env |= {"TUNER_DIRECTORY": str(directory), "TUNER_ID": tuner_id, "DATA_DIR": str(data_dir)}
    return subprocess.Popen(
        [task, "distributed-tuner-parallel", "--", *tiny], cwd=REPO,
        env={**os.environ, "IMT_ML_NO_PROGRESS": "1", "TF_NUM_INTRAOP_THREADS": "1", **env},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.mark.parametrize("order", ["chief first", "worker first, Taskfile form"])
def test_seed_tuner_parallel_commands_meet_through_the_shared_directory(sample_root, tmp_path,
                                                                         order):  # fmt: skip
    directory = tmp_path / "kt"
    oracle_file = directory / "track_tuning" / "oracle.json"
    taskfile = order != "chief first"
    start = {
        name: (lambda name=name: seed_tuner_parallel(
            name, directory, sample_root, tmp_path / f"out_{name}", taskfile))
        for name in ("chief", "tuner0")
    }  # fmt: skip
    if order == "chief first":
        chief = start["chief"]()
        wait_for(oracle_file.exists, 120, "the chief to publish its address")
        worker = start["tuner0"]()
    else:
        worker = start["tuner0"]()
        time.sleep(8)  # the worker is up and waiting before the chief exists
        assert worker.poll() is None
        chief = start["chief"]()
    (code0, out0, err0), (code1, _, err1) = finish(chief), finish(worker)
    assert code0 == 0, err0[-3000:]
    assert code1 == 0, err1[-3000:]
    if order != "chief first":
        assert "waiting for the chief's address" in err1

    ran = {
        name: json.loads((directory / "track_tuning" / "instances" / f"{name}.json").read_text())[
            "trials"
        ]
        for name in ("chief", "tuner0")
    }
    assert ran["chief"] and ran["tuner0"]  # both trained
    assert not set(ran["chief"]) & set(ran["tuner0"])  # no trial twice
    total = len(ran["chief"]) + len(ran["tuner0"])
    assert total == expected_hyperband_trials(3, 3) == 6
    assert len(list((directory / "track_tuning").glob("trial_*"))) == total
    published = json.loads(oracle_file.read_text())
    assert published["finished"] is True and published["beat"] >= 1

    run_dir = Path(out0.strip().splitlines()[-1])
    assert run_dir.name.startswith("tuner-parallel_")
    predictor = tr.load_predictor(run_dir / "track_prediction_model_best.keras")
    answer = predictor.predict([NORTH_STATION_ASSIGNMENT])[0]
    assert answer[0][0] in {str(t) for t in range(1, 11)}
    assert "Parallel Tuner Search" in (run_dir / "training_report.md").read_text()
    assert not (tmp_path / "out_tuner0").exists()  # by default only the chief trains the best


@pytest.mark.parametrize("finished", [False, True])
def test_a_stale_address_from_an_earlier_search_is_never_used(sample_root, tmp_path, finished):
    """An oracle.json left by a crashed (or finished) chief: the worker waits for a live one
    and gives up in one line, without ever connecting to the old address."""
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.1)
    directory = tmp_path / "kt"
    (directory / "track_tuning").mkdir(parents=True)
    (directory / "track_tuning" / "oracle.json").write_text(json.dumps({
        "host": "127.0.0.1", "port": listener.getsockname()[1], "bind": "127.0.0.1",
        "chief_host": "old", "pid": 1, "search_id": "earlier", "beat": 41, "finished": finished,
    }))  # fmt: skip
    proc = launch(["tuner-parallel", "--tuner-directory", str(directory), "--tuner-id", "tuner0",
                   "--data-dir", str(sample_root), "--test-days", "1", "--oracle-wait", "4"], {})  # fmt: skip
    code, _, err = finish(proc, timeout=120)
    with pytest.raises(TimeoutError):
        listener.accept()  # nobody ever connected to the stale address
    listener.close()
    assert code == 1, err[-2000:]
    assert "no chief published a live oracle address" in err and "Traceback" not in err


def test_leftover_generic_environment_variables_change_nothing(sample_root, tmp_path):
    """BATCH_SIZE=oops INDEX=7 (and friends) in a shell: read by no command."""
    stray = {"BATCH_SIZE": "oops", "INDEX": "7", "WORKERS": "nonsense", "DATA_DIR": "/nowhere",
             "MAX_EPOCHS": "x", "MODEL_PATH": "/nope/m", "TUNER_ID": "chief",
             "PROJECT_NAME": "other", "FACTOR": "0"}  # fmt: skip
    workers = f"127.0.0.1:{free_port()}"  # one worker: sync-tune runs alone
    proc = launch(["sync-tune", "--workers", workers, "--index", "0", "--data-dir", str(sample_root),
                   "--max-epochs", "1", "--factor", "2", "--batch-size", "64", "--test-days", "1",
                   "--tuner-directory", str(tmp_path / "kt")],
                  {**stray, "IMT_ML_OUTPUT_DIR": str(tmp_path / "out")})  # fmt: skip
    code, out, err = finish(proc)
    assert code == 0, err[-3000:]
    run_dir = Path(out.strip().splitlines()[-1])
    assert (run_dir / "track_prediction_model_best.keras").exists()
    config = json.loads((run_dir / "track_prediction_model_config.json").read_text())
    assert (
        config["search"]["batch_size"] == 64 and config["search"]["project_name"] == "track_tuning"
    )
    # The search space is tune's, and the winner was retrained with its trial's recipe.
    assert set(config["hyperparameters"]) == set(tr.SEARCH_SPACE)
    training = config["training"]
    assert training["class_weight"] == "none" and training["batch_size"] == 64
    assert training["recency_half_life"] == config["hyperparameters"]["recency_half_life"]
    assert training["learning_rate"] == config["hyperparameters"]["learning_rate"]
    assert (tmp_path / "kt" / "track_tuning").is_dir()

    from click.testing import CliRunner

    from imt_ml import distributed_launcher, export_track_data

    for command in (distributed_launcher.cli, tr.cli, export_track_data.cli):
        for args in ([], *[[name] for name in getattr(command, "commands", {})]):
            help_text = CliRunner().invoke(command, ["-", *args, "--help"] if command is tr.cli
                                           else [*args, "--help"], env=stray).output  # fmt: skip
            for name in stray:
                assert f"env: {name}]" not in help_text and f"[env: {name}" not in help_text


def test_tuner_worker_with_an_address_but_no_chief_gives_up_cleanly(sample_root, tmp_path):
    code, _, err = finish(launch(["tuner-parallel", "--tuner-directory", str(tmp_path / "kt"),
                                  "--tuner-id", "tuner0", "--oracle-address", f"127.0.0.1:{free_port()}",
                                  "--data-dir", str(sample_root), "--test-days", "1", "--oracle-wait", "3"],
                                 {}), timeout=120)  # fmt: skip
    assert code == 1
    assert "no Keras Tuner oracle answers" in err and "Traceback" not in err


def test_console_scripts_exist():
    bin_dir = Path(sys.executable).parent
    for name in ("distributed-launcher", "distributed-sync-tune", "distributed-tuner-parallel"):
        assert (bin_dir / name).exists(), name
