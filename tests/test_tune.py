"""`tune`: a real Ray Tune search on small sample data, on this machine and on a two-node cluster."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from imt_ml import tfrecord_reader as tr
from imt_ml import utils
from imt_ml.utils import free_port

from conftest import assignment, sample_root_fixture

REPO = Path(__file__).resolve().parents[1]


sample_root = sample_root_fixture(2000, seed=8)


def tune_cli(sample_root: Path, tmp_path: Path, *args: str):
    return CliRunner().invoke(
        tr.cli,
        [
            str(sample_root),
            "tune",
            "--ray-dir",
            str(tmp_path / "ray"),
            "--final-epochs",
            "1",
            "--test-days",
            "2",
            *args,
        ],
        env={"IMT_ML_OUTPUT_DIR": str(tmp_path / "out")},
    )


def stopped_early(report: str) -> int:
    return int(re.search(r"stopped early by ASHA: (\d+)", report).group(1))


def test_a_search_stops_weak_trials_early_and_saves_the_best_model_with_its_config(
    sample_root, tmp_path
):
    """One small ASHA search (8 trials of at most 3 epochs): weak trials stop before the
    cap, and the winner is retrained with its own recipe and saved with its config."""
    result = tune_cli(sample_root, tmp_path, "--num-samples", "8", "--max-epochs", "3",
                      "--asha-grace-period", "1", "--asha-reduction-factor", "3",
                      "--project-name", "tiny")  # fmt: skip
    assert result.exit_code == 0, result.output[-3000:]
    run_dir = Path(result.stdout.strip().splitlines()[-1])
    assert re.fullmatch(r"tune_\d{8}_\d{6}", run_dir.name)
    for name in ("track_prediction_model_best.keras", "track_prediction_model_final.keras",
                 "track_prediction_model_vocab.json", "track_prediction_model_config.json",
                 "training_report.md"):  # fmt: skip
        assert (run_dir / name).exists(), name

    config = json.loads((run_dir / "track_prediction_model_config.json").read_text())
    assert set(config["hyperparameters"]) == set(tr.tune_search_space())
    assert config["training"]["batch_size"] == config["hyperparameters"]["batch_size"]
    assert config["model_config"]["dropout"] == pytest.approx(config["hyperparameters"]["dropout"])

    # The trial that won trained with exactly the options the winner was retrained with
    # (class weights, recency, augmentation, schedule): only the epoch cap may differ.
    def recipe_of(training: dict) -> dict:
        return {k: v for k, v in training.items() if k not in ("epochs", "model_path", "test_days")}

    retrained = recipe_of(config["training"])
    assert retrained["class_weight"] == "none"
    assert retrained["recency_half_life"] == config["hyperparameters"]["recency_half_life"]
    trials = [json.loads(p.read_text())["recipe"]
              for p in (tmp_path / "ray" / "tiny").rglob("state.json")]  # fmt: skip
    assert trials and all(t is not None for t in trials)
    assert retrained in [recipe_of(t) for t in trials]

    predictor = tr.load_predictor(run_dir / "track_prediction_model_best.keras")
    answer = predictor.predict([assignment("2024-03-20T17:35:00-04:00", trip="CR-1-520")])[0]
    assert answer[0][0] in predictor.labels and answer[0][1] >= answer[-1][1]

    report = (run_dir / "training_report.md").read_text()
    assert report.startswith("# Training Report - Tune")
    for text in ("## Hyperparameter Search", "ASHA: max 3 epochs", "Search space:", "Top trials:",
                 "Search wall time:", "Trials finished: 8", "station + train number",
                 "### Accuracy at coverage"):  # fmt: skip
        assert text in report, text
    assert len(re.findall(r"^\| [1-8] \| [123] \|", report, re.M)) == 8
    assert (tmp_path / "ray" / "tiny").is_dir()  # Ray's own results live in --ray-dir
    # ASHA: at least one trial stopped before the cap, which the best ones reached.
    assert stopped_early(report) >= 1
    epochs = [
        int(e) for e in re.findall(r"^\| \d+ \|(?: [^|]+ \|){9} (\d+) \| [\d.]+ \|$", report, re.M)
    ]
    assert epochs and max(epochs) == 3 and min(epochs) < 3


def test_resume_continues_an_interrupted_search(sample_root, tmp_path):
    args = [sys.executable, str(REPO / "src/imt_ml/tfrecord_reader.py"), str(sample_root), "tune",
            "--ray-dir", str(tmp_path / "ray"), "--project-name", "resumable",
            "--num-samples", "4", "--max-epochs", "3", "--final-epochs", "1"]  # fmt: skip
    env = {**os.environ, "IMT_ML_OUTPUT_DIR": str(tmp_path / "out"), "IMT_ML_NO_PROGRESS": "1"}
    experiment = tmp_path / "ray" / "resumable"
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            done = [
                p for p in experiment.glob("*/result.json") if len(p.read_text().splitlines()) >= 3
            ]
            if done and list(experiment.glob("experiment_state*.json")):
                break
            assert proc.poll() is None, "the search ended before it could be interrupted"
            time.sleep(0.5)
        else:
            pytest.fail("no trial finished in time")
        time.sleep(2)
        finished_before = {p.parent.name for p in done}
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())

    resumed = subprocess.run(
        [*args, "--resume"], env=env, capture_output=True, text=True, timeout=400
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming the search" in resumed.stderr
    report = (Path(resumed.stdout.strip().splitlines()[-1]) / "training_report.md").read_text()
    assert "Trials finished: 4" in report
    # Trials that had finished were not run again: still three epochs each, not six.
    for name in finished_before:
        lines = (experiment / name / "result.json").read_text().splitlines()
        assert [json.loads(x)["training_iteration"] for x in lines] == [1, 2, 3]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--num-samples", "0"], "--num-samples must be at least 1"),
        (["--ray-address", "127.0.0.1:{port}"], "cannot reach the Ray cluster"),
    ],
)
def test_bad_tune_input_fails_fast(sample_root, tmp_path, args, message):
    args = [a.format(port=free_port()) for a in args]
    started = time.monotonic()
    result = tune_cli(sample_root, tmp_path, *args)
    assert result.exit_code == 1
    assert message in result.stderr and "Traceback" not in result.output
    assert time.monotonic() - started < 60


def test_no_data_is_an_error_before_ray_starts(tmp_path):
    result = tune_cli(tmp_path / "nothing", tmp_path)
    assert result.exit_code == 1 and "does not exist" in result.stderr


def test_a_local_ray_dir_invisible_to_a_node_is_refused():
    utils.refuse_unshared_ray_dir("/data/ray", {"10.0.0.1": True, "10.0.0.2": True})
    with pytest.raises(tr.UserError, match="shared storage .* or a URI"):
        utils.refuse_unshared_ray_dir("/data/ray", {"10.0.0.1": True, "10.0.0.2": False})


# ---------------------------------------------------------------------------
# Two Ray nodes: a head and a second `ray start --address` node. Ray advertises a
# machine's routable address even when told 127.0.0.1, so the cluster and the
# driver run inside a network namespace of their own whose only interface is
# loopback: all of their traffic stays on that namespace's 127.0.0.1.
# ---------------------------------------------------------------------------


def ray_cli() -> str:
    found = Path(sys.executable).parent / "ray"
    return str(found) if found.exists() else str(shutil.which("ray"))


@pytest.fixture
def loopback_namespace():
    name = f"imt-ray-{os.getpid()}"
    if shutil.which("ip") is None:
        pytest.skip("iproute2's `ip` is not installed")
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot create a network namespace here: {made.stderr.strip()}")
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
        yield ["ip", "netns", "exec", name]
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


@pytest.fixture
def two_node_cluster(loopback_namespace):
    port = 6380
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    inside = [*loopback_namespace, ray_cli()]
    common = ["--num-cpus", "1", "--disable-usage-stats"]
    try:
        subprocess.run([*inside, "start", "--head", "--port", str(port), "--include-dashboard",
                        "false", *common], env=env, check=True, capture_output=True, timeout=120)  # fmt: skip
        subprocess.run([*inside, "start", "--address", f"127.0.0.1:{port}", *common], env=env,
                       check=True, capture_output=True, timeout=120)  # fmt: skip
        yield f"127.0.0.1:{port}"
    finally:  # the nodes this test started
        subprocess.run([*inside, "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_trials_spread_over_two_ray_nodes(
    two_node_cluster, loopback_namespace, sample_root, tmp_path
):
    env = {**os.environ, "RAY_AUTH_MODE": "token", "IMT_ML_OUTPUT_DIR": str(tmp_path / "out"),
           "IMT_ML_NO_PROGRESS": "1"}  # fmt: skip
    result = subprocess.run(
        [*loopback_namespace, sys.executable, str(REPO / "src/imt_ml/tfrecord_reader.py"),
         str(sample_root), "tune", "--ray-address", two_node_cluster, "--ray-dir",
         str(tmp_path / "ray"), "--num-samples", "4", "--max-epochs", "2", "--final-epochs", "1"],
        env=env, capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = (Path(result.stdout.strip().splitlines()[-1]) / "training_report.md").read_text()
    assert f"Ray cluster: {two_node_cluster}; nodes that ran trials: 2" in report
