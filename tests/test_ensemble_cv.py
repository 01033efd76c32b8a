"""`ensemble` and `cv` through the CLI on small sample data."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from imt_ml import evaluation
from imt_ml import tfrecord_reader as tr

from conftest import NORTH_STATION_ASSIGNMENT, run_mode, sample_root_fixture

PREFIX = "track_prediction_ensemble_model"


sample_root = sample_root_fixture(2500, seed=5)
#: The sample covers about ten days: hold out the newest two (the default is seven).
TEST_DAYS = "2"


@pytest.fixture(scope="module")
def ensemble_run(sample_root, tmp_path_factory) -> Path:
    # --no-refit: the report's figures then describe the saved members exactly
    result, run_dir = run_mode(sample_root, "ensemble", "--num-models", "3", "--epochs", "2",
                               "--batch-size", "64", "--no-refit", "--test-days", TEST_DAYS,
                               out=tmp_path_factory.mktemp("output"))  # fmt: skip
    assert "Member 3/3" in result.stderr  # progress names the member and the total
    assert re.fullmatch(r"ensemble_\d{8}_\d{6}", run_dir.name)
    return run_dir


def validation(sample_root: Path) -> tuple[dict, np.ndarray]:
    columns = tr.read_export_columns(tr.find_export_dir(sample_root))
    _, val_idx, _, _ = tr.split_records(columns["scheduled_timestamp"], "time", seed=0,
                                        test_days=float(TEST_DAYS))  # fmt: skip
    return columns, val_idx


def test_ensemble_files_are_named_as_the_tracker_loads_them(ensemble_run):
    for i in range(3):
        for kind in ("best", "final"):
            model = tr.load_saved_model(ensemble_run / f"{PREFIX}_{i}_{kind}.keras")
            assert tr.model_labels(model)[0] == "1"
    assert (ensemble_run / f"{PREFIX}_vocab.json").exists()
    assert (ensemble_run / f"{PREFIX}_combined.keras").exists()
    assert (ensemble_run / "training_report.md").exists()


def test_every_ensemble_file_loads_in_a_fresh_process_after_import_imt_ml(ensemble_run):
    """As the tracker's worker loads them: plain keras.saving.load_model, compile=False."""
    import subprocess
    import sys

    files = [
        ensemble_run / f"{PREFIX}_{i}_{kind}.keras" for i in range(3) for kind in ("best", "final")
    ]
    files.append(ensemble_run / f"{PREFIX}_combined.keras")
    code = (
        "import sys, imt_ml, keras\n"
        "for path in sys.argv[1:]:\n"
        "    model = keras.saving.load_model(path, compile=False)\n"
        "    print(model.get_layer('track_probabilities').labels[0])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, *map(str, files)], capture_output=True,
                          text=True, timeout=180)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["1"] * len(files)
    assert (ensemble_run / f"{PREFIX}_serving" / "saved_model.pb").is_file()


def test_members_differ_in_architecture(ensemble_run):
    sizes = {
        tr.load_saved_model(ensemble_run / f"{PREFIX}_{i}_best.keras").count_params()
        for i in range(3)
    }
    assert len(sizes) == 3


def weighted_mean(combined, members: list) -> np.ndarray:
    """The members' probabilities weighted as the saved combined model weighs them."""
    weights = [combined.get_layer(f"member_weight_{i}").scale for i in range(len(members))]
    assert min(weights) >= 0 and sum(weights) == pytest.approx(1.0, abs=1e-3)
    return np.tensordot(weights, np.stack(members), axes=1).astype(np.float32)


def assert_is_calibrated_mean(combined, members: list, features) -> None:
    """The combined model answers the members' weighted mean probabilities through its
    confidence map."""
    calibrate = combined.get_layer("track_probabilities")
    expected = np.asarray(calibrate(weighted_mean(combined, members)))
    np.testing.assert_allclose(tr.predict_probabilities(combined, features), expected, atol=1e-5)
    assert calibrate.confidence_map is not None


def test_member_weights_favour_the_member_that_fits_the_records():
    labels = np.array([0, 1, 0, 1, 0, 1, -1])
    right = np.eye(2)[np.maximum(labels, 0)] * 0.8 + 0.1
    wrong = right[:, ::-1]
    assert tr.member_weights([right, wrong], labels) == pytest.approx([1.0, 0.0], abs=1e-3)
    assert tr.member_weights([right, right.copy()], labels) == pytest.approx([0.5, 0.5])
    assert tr.member_weights([right, wrong], np.full(7, -1)) == [0.5, 0.5]  # nothing to fit on


def test_refit_ensemble_members_and_their_calibrated_mean(sample_root, tmp_path):
    _, run_dir = run_mode(sample_root, "ensemble", "--num-models", "2", "--epochs", "1",
                          "--batch-size", "128", "--test-days", TEST_DAYS, out=tmp_path)  # fmt: skip
    assert "Every member was then refit on all" in (run_dir / "training_report.md").read_text()
    columns = tr.read_export_columns(tr.find_export_dir(sample_root))
    idx = np.arange(200)
    features = tr.model_features(columns, idx)
    members = [tr.predict_probabilities(tr.load_saved_model(run_dir / f"{PREFIX}_{i}_best.keras"),
                                        features) for i in range(2)]  # fmt: skip
    combined = tr.load_saved_model(run_dir / f"{PREFIX}_combined.keras")
    assert_is_calibrated_mean(combined, members, features)
    vocab = json.loads((run_dir / f"{PREFIX}_vocab.json").read_text())
    assert vocab["record_counts"]["train"] == vocab["record_counts"]["total"]  # every record


def test_combined_model_is_the_weighted_mean_of_the_members(ensemble_run, sample_root):
    columns, val_idx = validation(sample_root)
    features = tr.model_features(columns, val_idx)
    members = [
        tr.predict_probabilities(
            tr.load_saved_model(ensemble_run / f"{PREFIX}_{i}_best.keras"), features
        )
        for i in range(3)
    ]
    combined = tr.load_saved_model(ensemble_run / f"{PREFIX}_combined.keras")
    assert_is_calibrated_mean(combined, members, features)

    report = (ensemble_run / "training_report.md").read_text()
    labels = np.array(tr.model_labels(combined))
    truth = columns["track_number"][val_idx]
    soft = (labels[weighted_mean(combined, members).argmax(axis=1)] == truth).mean()
    majority = (labels[tr.majority_vote(members)] == truth).mean()
    assert (
        f"soft vote (weighted mean probability; the combined model) | {100 * soft:.2f}% |" in report
    )
    assert (
        f"majority vote (ties to the higher mean probability) | {100 * majority:.2f}% |" in report
    )
    for i, probs in enumerate(members):
        acc = (labels[probs.argmax(axis=1)] == truth).mean()
        assert re.search(rf"\| {i} \| dense .*\| {100 * acc:.2f}% \| [01]\.\d{{3}} \|", report), i
    assert "Baseline: most frequent track for the station + train number" in report
    assert "### Accuracy at coverage" in report
    agree = (np.stack([p.argmax(axis=1) for p in members]) == members[0].argmax(axis=1)).all(axis=0)
    assert f"Members agree on every validation record's track {100 * agree.mean():.2f}%" in report


def test_evaluate_and_predict_accept_the_combined_model(ensemble_run, sample_root, tmp_path):
    model_file = ensemble_run / f"{PREFIX}_combined.keras"
    result = CliRunner().invoke(tr.cli, [str(sample_root), "evaluate", "--model", str(model_file)],
                                env={"IMT_ML_OUTPUT_DIR": str(tmp_path)})  # fmt: skip
    assert result.exit_code == 0, result.output
    line = json.dumps(NORTH_STATION_ASSIGNMENT)
    result = CliRunner().invoke(tr.cli, ["-", "predict", "--model", str(model_file)], input=line)
    assert result.exit_code == 0, result.output
    predictions = json.loads(result.stdout)["predictions"]
    assert {p["track"] for p in predictions} <= {str(t) for t in range(1, 11)}
    assert sum(p["probability"] for p in predictions) == pytest.approx(1.0, abs=1e-3)


# ---------------------------------------------------------------------------
# cv
# ---------------------------------------------------------------------------


def test_cv_folds_partition_the_records_in_time(sample_root, tmp_path):
    result = CliRunner().invoke(tr.cli, [str(sample_root), "cv", "--k-folds", "3", "--epochs", "1",
                                         "--batch-size", "128", "--test-days", TEST_DAYS],
                                env={"IMT_ML_OUTPUT_DIR": str(tmp_path)})  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "Fold 3/3" in result.stderr
    run_dir = Path(result.stdout.strip())
    assert run_dir.name.startswith("cv_")
    columns = tr.read_export_columns(tr.find_export_dir(sample_root))
    fold = np.load(run_dir / "fold_assignment.npy")
    assert len(fold) == len(columns["trip_id"]) and set(fold) == {-1, 0, 1, 2}
    ts = columns["scheduled_timestamp"]
    # -1: the newest 2 days, in no fold; every fold model is scored there as well.
    assert ts[fold == -1].min() > ts.max() - 2 * 86_400 >= ts[fold >= 0].max()
    for j in range(2):  # contiguous blocks: every record of fold j precedes fold j+1
        assert ts[fold == j].max() < ts[fold == j + 1].min()

    results = json.loads((run_dir / "cv_results.json").read_text())
    assert [f["validation_records"] for f in results["folds"]] == [
        int((fold == j).sum()) for j in range(3)
    ]

    # The report's mean and interval come from the fold accuracies it lists (t, 2 df = 4.303).
    report = (run_dir / "training_report.md").read_text()
    accs = [float(x) for x in re.findall(r"^\| \d \| [^|]+ \| [\d,]+ \| ([\d.]+) \|", report, re.M)]
    assert len(accs) == 3
    mean, std = np.mean(accs), np.std(accs, ddof=1)
    half = 4.3027 * std / np.sqrt(3)
    match = re.search(
        r"Mean validation accuracy: ([\d.]+) \(std ([\d.]+); 95% CI ([\d.]+) to ([\d.]+)\)", report
    )
    assert match
    got = [float(g) for g in match.groups()]
    np.testing.assert_allclose(got, [mean, std, mean - half, mean + half], atol=2e-4)
    assert "contiguous periods of time" in report
    assert "Model minus baseline" in report
    test_accs = [f["test_accuracy"] for f in results["folds"]]
    assert f"Mean test accuracy: {np.mean(test_accs):.4f}" in report
    assert "share most of their training records" in report  # what the interval does not cover
    for j in range(3):
        assert (
            run_dir / f"track_prediction_cv_model_fold_{j}_serving" / "saved_model.pb"
        ).is_file()


def test_shuffled_folds_are_disjoint_and_cover_everything():
    ts = np.arange(100, dtype=float)
    folds = tr.fold_indices(ts, 4, shuffle=True, seed=1)
    assert sorted(np.concatenate(folds).tolist()) == list(range(100))
    assert not any(set(folds[0]) & set(f) for f in folds[1:])


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["ensemble", "--num-models", "0"], 2, "--num-models"),
        (["cv", "--k-folds", "1"], 2, "--k-folds"),
        (["cv", "--k-folds", "100000"], 1, "more than the"),
    ],
)
def test_bad_ensemble_and_cv_options_fail_before_training(
    sample_root, tmp_path, args, code, message
):
    result = CliRunner().invoke(tr.cli, [str(sample_root), *args],
                                env={"IMT_ML_OUTPUT_DIR": str(tmp_path / "out")})  # fmt: skip
    assert result.exit_code == code
    assert message in result.stderr and "Traceback" not in result.output
    assert "Epoch" not in result.output
    assert not (tmp_path / "out").exists()


def test_a_fold_without_validation_records_is_refused():
    ts = np.array([1.0] * 50 + [2.0])  # 50 records share one time: 3 contiguous folds impossible
    with pytest.raises(tr.UserError, match="no validation records"):
        tr.fold_indices(ts, 3, shuffle=False, seed=0)


def test_student_t_quantiles():
    for df, expected in [(1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (30, 2.042)]:
        assert evaluation.student_t_quantile(0.975, df) == pytest.approx(expected, abs=2e-3)
