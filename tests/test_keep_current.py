"""Keeping a model current, through the CLI: `backtest` on an export with known answers,
`retrain` promoting a better challenger and refusing a worse one, `rollback`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from imt_ml.export_track_data import TFRecordShardWriter, encode_example
from imt_ml.utils import FEATURE_SCHEMA, ModelRegistry

from conftest import only_export_dir, read_export, run_mode, sample_root_fixture

REPO = Path(__file__).resolve().parents[1]
KEEPER = REPO / "src/imt_ml/keep_model_current.py"
DAY = 86_400.0
#: 2024-01-01 00:00 Boston (a Monday), in Unix seconds.
MONDAY = 1704085200.0

sample_root = sample_root_fixture(3000, seed=21)


def write_records(root: Path, records: list[tuple]) -> Path:
    with TFRecordShardWriter(root, 1000) as writer:
        for record in records:
            writer.write(encode_example(record))
        return writer.commit({"total_records": len(records)})


def as_tuple(row: dict) -> tuple:
    return tuple(row[name] for name in FEATURE_SCHEMA)


# ---------------------------------------------------------------------------
# backtest
# ---------------------------------------------------------------------------


def test_backtest_predicts_a_moved_train_right_from_the_first_origin_after_the_move(tmp_path):
    """Twelve trains, each daily on its own track, for five weeks; train 520 moves from
    track 1 to track 9 on day 14 (week 3). Weekly origins from day 7: the window of day 14
    holds the move the model could not know (11 of 12 trains right); from the origin of day
    21 on, whose training records include a week of the new track, everything is right."""

    def rec(day: int, train: int, track: str) -> tuple:
        when = MONDAY + day * DAY + (6 + train % 12) * 3600.0
        return ("place-sstat", "CR-Worcester", f"CR-Weekday-Winter-24-{train}",
                "Worcester - Worcester Ln", 0, "historical", track, when, when, when, 0, 0, 0)  # fmt: skip

    records = []
    for day in range(35):
        for i in range(12):
            train = 520 + 2 * i
            track = str(i + 1)
            if train == 520 and day >= 14:
                track = "9"
            records.append(rec(day, train, track))
    export = write_records(tmp_path / "exports", records)
    result, run_dir = run_mode(export, "backtest", "--start", "2024-01-08", "--every", "7",
                               "--horizon", "7", "--epochs", "8", "--batch-size", "64",
                               "--recency-half-life", "3", out=tmp_path / "out")  # fmt: skip
    results = json.loads((run_dir / "backtest_results.json").read_text())
    windows = results["windows"]
    assert [round((w["start"] - MONDAY) / DAY) for w in windows] == [7, 14, 21, 28]
    assert all(w["records"] == 84 for w in windows)
    top1 = [w["model_top1"] for w in windows]
    assert top1[0] == 1.0
    assert top1[1] == pytest.approx(11 / 12)  # the move, unknowable at its origin
    assert top1[2:] == [1.0, 1.0]  # learnt from the first origin after it
    assert windows[1]["station_trip"] == pytest.approx(11 / 12)
    for w in windows:  # the paired margin over the window's strongest table
        assert w["margin"] == pytest.approx(w["model_top1"] - w[w["strongest_table"]])
        assert w["margin_interval"] >= 0
    total = results["total"]
    assert total["records"] == 336
    assert total["model_top1"] == pytest.approx(np.mean(top1))
    assert {"model_ece", "model_coverage_80", "station_train_weighted", "stations"} <= set(total)
    answers = np.load(run_dir / "backtest_records.npz")  # one row per scored record
    assert len(answers["correct"]) == 336 and answers["correct"].mean() == pytest.approx(
        np.mean(top1)
    )
    moved = (answers["trip_id"] == "CR-Weekday-Winter-24-520") & (
        answers["window"] == windows[1]["start"]
    )
    assert not answers["correct"][moved].any() and set(answers["station_id"]) == {"place-sstat"}
    report = (run_dir / "backtest_report.md").read_text()
    assert "| **total** | 336 |" in report and (run_dir / "backtest.png").stat().st_size > 0
    # Only the last origin's model is kept unless asked.
    assert [p.name for p in run_dir.glob("origin_*")] == ["origin_2024-01-29"]
    assert "backtest origins" in result.stderr or "Done:" in result.stderr


def test_backtest_warm_start_is_not_worse_and_bad_starts_are_one_line(sample_root, tmp_path):
    export = only_export_dir(sample_root)
    rows = read_export(export)
    first = min(r["scheduled_timestamp"] for r in rows)
    import datetime as dt

    start = (dt.datetime.fromtimestamp(first, dt.UTC) + dt.timedelta(days=6)).date().isoformat()
    common = ["backtest", "--start", start, "--every", "3", "--horizon", "3", "--epochs", "3",
              "--batch-size", "128", "--no-refit"]  # fmt: skip
    _, cold_dir = run_mode(sample_root, *common, out=tmp_path / "cold")
    _, warm_dir = run_mode(sample_root, *common, "--warm-start", out=tmp_path / "warm")
    cold = json.loads((cold_dir / "backtest_results.json").read_text())["total"]
    warm = json.loads((warm_dir / "backtest_results.json").read_text())["total"]
    assert warm["records"] == cold["records"]
    assert warm["model_top1"] >= cold["model_top1"] - 0.01

    from click.testing import CliRunner

    from imt_ml import keep_model_current

    for bad, message in (("1999-01-01", "no record before the first origin"),
                         ("2099-01-01", "after the export's newest record"),
                         ("yesterday", "not a date")):  # fmt: skip
        result = CliRunner().invoke(keep_model_current.cli, [str(sample_root), "backtest", "--start", bad],
                                    env={"IMT_ML_OUTPUT_DIR": str(tmp_path / "bad")})  # fmt: skip
        assert result.exit_code == 1 and message in result.output, result.output


# ---------------------------------------------------------------------------
# retrain and rollback
# ---------------------------------------------------------------------------


def keeper(*args: str, out: Path) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, str(KEEPER), *args], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "IMT_ML_OUTPUT_DIR": str(out),
                                            "IMT_ML_NO_PROGRESS": "1"})  # fmt: skip


def shuffled_tracks(rows: list[dict], seed: int) -> list[dict]:
    tracks = [r["track_number"] for r in rows]
    np.random.default_rng(seed).shuffle(tracks)
    return [r | {"track_number": t} for r, t in zip(rows, tracks, strict=True)]


def test_retrain_promotes_a_better_challenger_refuses_a_worse_one_and_rolls_back(sample_root,
                                                                                tmp_path):  # fmt: skip
    real = only_export_dir(sample_root)
    rows = sorted(read_export(real), key=lambda r: r["scheduled_timestamp"])
    cut = rows[-1]["scheduled_timestamp"] - 3 * DAY
    early = [r for r in rows if r["scheduled_timestamp"] <= cut]
    late = [r for r in rows if r["scheduled_timestamp"] > cut]

    def champion(registry: Path, training_rows: list[dict], name: str) -> None:
        export = write_records(tmp_path / name, [as_tuple(r) for r in training_rows])
        _, run_dir = run_mode(export, "train", "--epochs", "3", "--batch-size", "128",
                              "--test-days", "0", out=tmp_path / f"{name}-out")  # fmt: skip
        promoted = keeper("-", "promote", "--registry", str(registry), "--model",
                          str(run_dir / "track_prediction_model_best.keras"), out=tmp_path)  # fmt: skip
        assert promoted.returncode == 0, promoted.stderr

    # A champion that learnt nothing (shuffled tracks) loses to a challenger that learnt.
    weak = tmp_path / "weak-registry"
    champion(weak, shuffled_tracks(early, 1), "weak")
    retrained = keeper(str(real), "retrain", "--registry", str(weak), "--holdout-days", "3",
                       "--epochs", "3", "--batch-size", "128", out=tmp_path / "r1")  # fmt: skip
    assert retrained.returncode == 0, retrained.stderr
    assert "Promote:" in retrained.stderr
    registry = ModelRegistry(weak)
    assert registry.current_version() == 2
    metadata = registry.metadata(2)
    assert metadata["champion"]["model_top1"] < metadata["held_out"]["top1_accuracy"]
    assert metadata["trained_until"] == pytest.approx(rows[-1]["scheduled_timestamp"], abs=60)
    report = (Path(retrained.stdout.strip()) / "retrain_report.md").read_text()
    assert "champion (version 1)" in report and "installed as version 2" in report

    # Nothing newer than the new champion: nothing to judge, nothing changes.
    again = keeper(
        str(real), "retrain", "--registry", str(weak), "--epochs", "1", out=tmp_path / "r2"
    )
    assert again.returncode == 0 and "nothing to judge" in again.stderr
    assert registry.current_version() == 2

    # rollback makes version 1 current again; there is nothing before it.
    back = keeper("-", "rollback", "--registry", str(weak), out=tmp_path)
    assert back.returncode == 0 and registry.current_version() == 1
    none = keeper("-", "rollback", "--registry", str(weak), out=tmp_path)
    assert none.returncode == 1 and "no version before 1" in none.stderr
    assert "Traceback" not in none.stderr

    # A good champion is kept against a challenger trained on shuffled tracks; --dry-run
    # never installs.
    good = tmp_path / "good-registry"
    champion(good, early, "good")
    garbage = write_records(
        tmp_path / "garbage", [as_tuple(r) for r in shuffled_tracks(early, 2) + late]
    )
    refused = keeper(str(garbage), "retrain", "--registry", str(good), "--holdout-days", "3",
                     "--epochs", "3", "--batch-size", "128", out=tmp_path / "r3")  # fmt: skip
    assert refused.returncode == 0, refused.stderr
    assert "Keep:" in refused.stderr and "below the champion's" in refused.stderr
    assert ModelRegistry(good).versions() == [1] and ModelRegistry(good).current_version() == 1
    dry = keeper(str(real), "retrain", "--registry", str(tmp_path / "empty"), "--dry-run",
                 "--epochs", "1", "--batch-size", "128", out=tmp_path / "r4")  # fmt: skip
    assert dry.returncode == 0 and "Promote:" in dry.stderr
    assert ModelRegistry(tmp_path / "empty").versions() == []
