"""distributed_launcher.py with real processes on 127.0.0.1 and free ports."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from imt_ml import tfrecord_reader as tr
from imt_ml.sample_data import write_export
from imt_ml.utils import free_port

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = str(REPO / "src/imt_ml/distributed_launcher.py")


@pytest.fixture(scope="module")
def sample_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("exports")
    write_export(root, 1500, seed=13, records_per_file=1000)
    return root


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
              "--factor", "2", "--batch-size", "64", "--project-name", "sync"]  # fmt: skip
    outputs = {i: tmp_path / f"out{i}" for i in (0, 1)}
    procs = {
        i: launch([*common, "--index", str(i)],
                  {"IMT_ML_OUTPUT_DIR": str(outputs[i]), "TUNER_DIRECTORY": str(tmp_path / f"kt{i}")})
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
    assert run_dir.parent == outputs[0] and run_dir.name.startswith("tune_")
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


def test_tuner_parallel_instances_split_the_trials(sample_root, tmp_path):
    oracle = f"127.0.0.1:{free_port()}"
    directory = tmp_path / "kt"
    common = ["tuner-parallel", "--tuner-directory", str(directory), "--oracle-address", oracle,
              "--data-dir", str(sample_root), "--max-epochs", "3", "--factor", "3",
              "--batch-size", "64", "--project-name", "parallel"]  # fmt: skip
    chief = launch([*common, "--tuner-id", "chief"], {"IMT_ML_OUTPUT_DIR": str(tmp_path / "out0")})
    worker = launch(
        [*common, "--tuner-id", "tuner0"], {"IMT_ML_OUTPUT_DIR": str(tmp_path / "out1")}
    )
    (code0, out0, err0), (code1, _, err1) = finish(chief), finish(worker)
    assert code0 == 0, err0[-3000:]
    assert code1 == 0, err1[-3000:]

    ran = {
        name: json.loads((directory / "parallel" / "instances" / f"{name}.json").read_text())[
            "trials"
        ]
        for name in ("chief", "tuner0")
    }
    assert ran["chief"] and ran["tuner0"]  # both trained
    assert not set(ran["chief"]) & set(ran["tuner0"])  # no trial twice
    total = len(ran["chief"]) + len(ran["tuner0"])
    assert total == expected_hyperband_trials(3, 3) == 6
    assert len(list((directory / "parallel").glob("trial_*"))) == total

    run_dir = Path(out0.strip().splitlines()[-1])
    predictor = tr.load_predictor(run_dir / "track_prediction_model_best.keras")
    answer = predictor.predict([{
        "station_id": "place-north", "route_id": "CR-Lowell", "trip_id": "CR-Weekday-Spring-24-301",
        "headsign": "North Station - Lowell Ln", "direction_id": 1,
        "scheduled_time": "2024-03-20T08:10:00-04:00",
    }])[0]  # fmt: skip
    assert answer[0][0] in {str(t) for t in range(1, 11)}
    assert "Parallel Tuner Search" in (run_dir / "training_report.md").read_text()
    assert not (tmp_path / "out1").exists()  # by default only the chief trains the best


def test_tuner_worker_without_a_chief_gives_up_cleanly(sample_root, tmp_path):
    code, _, err = finish(launch(["tuner-parallel", "--tuner-directory", str(tmp_path / "kt"),
                                  "--tuner-id", "tuner0", "--oracle-address", f"127.0.0.1:{free_port()}",
                                  "--data-dir", str(sample_root), "--oracle-wait", "3"], {}), timeout=120)  # fmt: skip
    assert code == 1
    assert "no Keras Tuner oracle answers" in err and "Traceback" not in err


def test_console_scripts_exist():
    bin_dir = Path(sys.executable).parent
    for name in ("distributed-launcher", "distributed-sync-tune", "distributed-tuner-parallel"):
        assert (bin_dir / name).exists(), name
