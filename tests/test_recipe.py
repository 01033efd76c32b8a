"""One recipe: `train`, `retrain`, a backtest origin and cv's deployable model are the
same fit -> calibrate -> refit, so with deterministic ops and one seed they save models
that answer a fixed set of requests alike (to 1e-5), each loaded in a fresh process the
way a consumer loads it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from imt_ml.export_track_data import TFRecordShardWriter, encode_example
from imt_ml.utils import FEATURE_SCHEMA, ModelRegistry

from conftest import only_export_dir, read_export, sample_root_fixture

REPO = Path(__file__).resolve().parents[1]
READER = REPO / "src/imt_ml/tfrecord_reader.py"
KEEPER = REPO / "src/imt_ml/keep_model_current.py"
#: The options every run below shares: small, quick, and the same for all.
COMMON = ["--epochs", "2", "--batch-size", "256", "--refit-epochs", "1", "--seed", "7"]

sample_root = sample_root_fixture(2500, seed=33)


def run(script: Path, *args: str, out: Path) -> Path:
    """A stage script in its own process with deterministic ops; the run directory it printed."""
    env = {**os.environ, "IMT_ML_OUTPUT_DIR": str(out), "IMT_ML_DETERMINISTIC": "1"}
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,
                          timeout=900, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return Path(proc.stdout.strip().splitlines()[-1])


def probabilities(models: dict[str, Path], requests: list[dict], tmp_path: Path) -> dict:
    """Each model's probabilities for the requests, computed in a fresh process that
    imports only `imt_ml` and Keras."""
    script = (
        "import json, sys\nimport numpy as np\nimport imt_ml\nimport keras\n"
        "models, requests, out = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]\n"
        "dtypes = {'direction_id': 'int64', 'scheduled_timestamp': 'float64'}\n"
        "batch = {k: np.array([r[k] for r in requests], dtype=dtypes.get(k, object)) for k in requests[0]}\n"
        "np.savez(out, **{name: np.asarray(keras.saving.load_model(path, compile=False).predict(batch, verbose=0))\n"
        "                 for name, path in models.items()})\n"
    )  # fmt: skip
    out = tmp_path / "probabilities.npz"
    proc = subprocess.run([sys.executable, "-c", script, json.dumps({k: str(v) for k, v in models.items()}),
                           json.dumps(requests), str(out)], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(np.load(out))


def fixed_requests(rows: list[dict]) -> list[dict]:
    """Every 20th record of the export, as raw model inputs."""
    keys = ("station_id", "route_id", "trip_id", "headsign", "direction_id", "scheduled_timestamp")
    return [{k: row[k] for k in keys} for row in rows[::20]]


def test_train_retrain_backtest_and_cv_save_the_same_model(sample_root, tmp_path):
    export = only_export_dir(sample_root)
    rows = read_export(export)  # in the export's order, which the recipe's shuffle follows
    first = min(r["scheduled_timestamp"] for r in rows)
    last = max(r["scheduled_timestamp"] for r in rows)
    assert last - first > 10 * 86_400, "the sample must span more than the held-out days"

    trained = run(
        READER, str(sample_root), "train", *COMMON, "--test-days", "3", out=tmp_path / "t"
    )
    registry = tmp_path / "registry"
    run(KEEPER, str(sample_root), "retrain", "--registry", str(registry), "--holdout-days", "3",
        *COMMON, out=tmp_path / "r")  # fmt: skip
    cv = run(READER, str(sample_root), "cv", "--k-folds", "2", *COMMON, "--test-days", "3",
             "--model-path", "track_prediction_model", out=tmp_path / "c")  # fmt: skip

    # A backtest origin trains on the records before it, validating on its horizon: the
    # same as `train` on an export of only those records, with that validation window.
    origin_day = 1 + int((last - first) // 86_400) - 4
    import datetime as dt
    from zoneinfo import ZoneInfo

    boston = ZoneInfo("America/New_York")
    start = (dt.datetime.fromtimestamp(first, boston) + dt.timedelta(days=origin_day)).date()
    origin = dt.datetime.combine(start, dt.time(), tzinfo=boston).timestamp()
    backtest = run(KEEPER, str(sample_root), "backtest", "--start", start.isoformat(), "--every",
                   "30", "--horizon", "3", "--keep-models", *COMMON, out=tmp_path / "b")  # fmt: skip
    before = tmp_path / "before"
    earlier = [row for row in rows if row["scheduled_timestamp"] < origin]
    with TFRecordShardWriter(before, 1000) as writer:
        for row in earlier:
            writer.write(encode_example(tuple(row[name] for name in FEATURE_SCHEMA)))
        writer.commit({"total_records": len(earlier)})
    trained_before = run(READER, str(before), "train", *COMMON, "--test-days", "0",
                         "--validation-days", "3", out=tmp_path / "tb")  # fmt: skip

    (origin_dir,) = backtest.glob("origin_*")
    best = "track_prediction_model_best.keras"
    p = probabilities({"train": trained / best, "retrain": ModelRegistry(registry).model_file(1),
                       "cv": cv / best, "backtest": origin_dir / best,
                       "train_before": trained_before / best}, fixed_requests(rows), tmp_path)  # fmt: skip
    assert p["train"].shape == (len(rows[::20]), p["train"].shape[1]) and p["train"].shape[1] > 1
    np.testing.assert_allclose(p["retrain"], p["train"], atol=1e-5)
    np.testing.assert_allclose(p["cv"], p["train"], atol=1e-5)
    np.testing.assert_allclose(p["backtest"], p["train_before"], atol=1e-5)
    # And the recipe is not a constant: a model of other records answers otherwise.
    assert np.abs(p["train_before"] - p["train"]).max() > 1e-3
