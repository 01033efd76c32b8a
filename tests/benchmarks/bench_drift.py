"""Drift benchmark: `train` defaults against every lookup table, on worlds it was not tuned to.

    uv run python tests/benchmarks/bench_drift.py [--records 200000] [--seeds 1,2,3]
        [--levels 0.03,0.15,0.30] [--windows before,new,new+14]

A matrix of cells: generator seeds (each draws a world of its own: how firmly trains
keep their home track, how a zone station spreads its trains, cancellations, trains
whose track depends on the weekday; see sample_data.World) x home-move shares (the
share of trains whose home moves at each change of schedule season) x three held-out
windows around the last change of season C in the history:

- `before`: the 28 days before C, trained on everything earlier (the easy weeks);
- `new`: the first 28 days of the new season, trained on everything before C (the day a
  schedule changes: no record of the new season in training);
- `new+14`: days 14-41 of the new season, trained on everything before C + 14 days.

In each cell `train` runs with its defaults, as its own process, on the training
records (written in the tracker's real UTC format), and its saved `_best.keras` is
scored on the held-out weeks beside every lookup table of the same training records,
plain and recency-weighted. Targets in every cell: top-1 above every lookup table;
ECE <= 0.03; coverage at 80% precision >= the strongest table's; top-1 >= 97% of the
best possible where the new season is in training (`before`, `new+14`) and >= 97% of
what an answer knowing only last season can reach where it is not (`new`, printed as
the ceiling); and `train` in <= 120 s. A failing cell is printed, not hidden. Beside
each cell's margins over the strongest table (top-1, coverage at 80% precision) go
their 95% intervals: a margin inside its interval is a tie on these records,
whichever side of zero it falls.
"""

from __future__ import annotations

import datetime as dt
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np

from imt_ml import tfrecord_reader as tr
from imt_ml.evaluation import paired_margin
from imt_ml.export_track_data import (
    ExportStats,
    TFRecordShardWriter,
    encode_example,
    parse_assignment,
)
from imt_ml.sample_data import SEASONS, Drift, SampleHistory, save_truth, season_of
from imt_ml.utils import SAMPLE_TRUTH_FILE, TRACKER_TIMEZONE

READER = Path(__file__).resolve().parents[2] / "src/imt_ml/tfrecord_reader.py"
WINDOW_DAYS = 28
TRAIN_SECONDS_TARGET = 120
#: window -> (training ends, test starts, test ends), in days after the change of season.
WINDOWS = {
    "before": (-WINDOW_DAYS, -WINDOW_DAYS, 0),
    "new": (0, 0, WINDOW_DAYS),
    "new+14": (14, 14, 14 + WINDOW_DAYS),
}


def season_start(day: dt.date) -> dt.date:
    name, year = season_of(day)
    return dt.date(year, (12, 3, 6, 9)[SEASONS.index(name)], 1)


#: (a difference, the half-width of its 95% interval)
Margin = tuple[float, float]


@dataclass
class Cell:
    seed: int
    level: float
    window: str
    train_records: int
    test_records: int
    seconds: float
    evaluation: tr.Evaluation
    ceiling: float  # best possible, or what last season's distributions reach
    margin: Margin  # top-1 minus the strongest table's
    coverage_margin: Margin  # the same for coverage at 80% precision

    @property
    def top1(self) -> float:
        return self.evaluation.metrics["top1_accuracy"]

    @property
    def strongest(self) -> tuple[str, float]:
        return tr.strongest_baseline(self.evaluation.baselines) or ("", float("nan"))

    def checks(self) -> dict[str, bool]:
        ev = self.evaluation
        name, accuracy = self.strongest
        return {
            "above every table": self.top1 > accuracy,
            "ECE <= 0.03": ev.metrics["expected_calibration_error"] <= 0.03,
            "@80% >= table": ev.answerable["model"][0.8] >= ev.answerable[name][0.8],
            ">= 97% of ceiling": self.top1 >= 0.97 * self.ceiling,
            f"train <= {TRAIN_SECONDS_TARGET} s": self.seconds <= TRAIN_SECONDS_TARGET,
        }


def write_export(root: Path, name: str, rows: list) -> Path:
    stats = ExportStats()
    with TFRecordShardWriter(root / name, 20_000) as writer:
        for _, record in rows:
            writer.write(encode_example(record))
            stats.add(record)
        save_truth(writer.partial_dir / SAMPLE_TRUTH_FILE, [e.truth_key for e, _ in rows],
                   [e.best_probability for e, _ in rows],
                   [e.last_season_probability for e, _ in rows])  # fmt: skip
        return writer.commit(stats.metadata(source="bench_drift"))


def history_windows(root: Path, records: int, seed: int, level: float, windows: list[str]):
    """Yield (window, training export, test export, description) for one generated history."""
    from zoneinfo import ZoneInfo

    boston = ZoneInfo(TRACKER_TIMEZONE)
    events = SampleHistory(seed, Drift(level)).generate(records)
    clean = [(e, parse_assignment(e.payload)) for e in events if e.kind == "clean"]
    days = [dt.datetime.fromtimestamp(e.score, boston).date() for e, _ in clean]
    last_day = max(days)
    change = season_start(last_day - dt.timedelta(days=max(WINDOWS[w][2] for w in windows)))
    for window in windows:
        train_end, test_start, test_end = (change + dt.timedelta(days=d) for d in WINDOWS[window])
        train = [row for row, day in zip(clean, days, strict=True) if day < train_end]
        test = [row for row, day in zip(clean, days, strict=True) if test_start <= day < test_end]
        if not test:
            raise SystemExit(f"seed {seed}: no records after {test_start}: use more --records")
        described = (f"seed {seed}, moves {level:.2f}, {window}: {len(train):,} training records "
                     f"before {train_end}, {len(test):,} held out {test_start} to "
                     f"{test_end - dt.timedelta(days=1)} (season change {change})")  # fmt: skip
        yield (window, write_export(root / window, "train", train),
               write_export(root / window, "test", test), described)  # fmt: skip


def run_train(export: Path, out: Path, extra: Sequence[str] = ()) -> tuple[Path, float]:
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(READER), str(export), "train", *extra], capture_output=True, text=True,
        env={**os.environ, "IMT_ML_OUTPUT_DIR": str(out), "IMT_ML_NO_PROGRESS": "1"},
    )  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(f"train failed:\n{proc.stderr[-3000:]}")
    return Path(proc.stdout.strip().splitlines()[-1]), time.perf_counter() - started


def coverage_margin(model: tuple[np.ndarray, np.ndarray], table: tuple[np.ndarray, np.ndarray],
                    draws: int = 400) -> Margin:  # fmt: skip
    """(the model's coverage at 80% precision minus the table's, the half-width of a 95%
    bootstrap interval of that difference): each draw resamples the records, the same
    ones for both."""

    def at80(pair: tuple[np.ndarray, np.ndarray], rows: np.ndarray) -> float:
        return tr.coverage_at_precision(pair[0][rows], pair[1][rows], 0.8)

    everything = np.arange(len(model[0]))
    observed = at80(model, everything) - at80(table, everything)
    rng = np.random.default_rng(0)
    diffs = []
    for _ in range(draws):
        rows = rng.integers(0, len(everything), len(everything))
        diffs.append(at80(model, rows) - at80(table, rows))
    low, high = np.percentile(diffs, [2.5, 97.5])
    return observed, float(high - low) / 2


def score(run_dir: Path, test: Path, window: str) -> tuple[tr.Evaluation, float, Margin, Margin]:
    """The saved `_best` model on the test records beside the tables of its training records
    (what `evaluate` computes), the ceiling, and the margins over the strongest table."""
    model_file = run_dir / "track_prediction_model_best.keras"
    export_dir = tr.find_export_dir(test)
    columns = tr.read_export_columns(export_dir)
    idx = np.arange(len(columns["track_number"]))
    tables = tr.json.loads(tr.vocab_file_for(model_file).read_text())["baselines"]
    evaluation = tr.evaluate_model(tr.load_saved_model(model_file), columns, idx, tables,
                                   tr.load_sample_truth(export_dir))  # fmt: skip
    truth = np.load(test / SAMPLE_TRUTH_FILE)
    ceiling = truth["last_season_probability" if window == "new" else "best_probability"]
    # The strongest table's answers beside the model's, record by record.
    name, _ = tr.strongest_baseline(evaluation.baselines) or ("", 0.0)
    table, share = tr.baseline_answers(tables, columns, idx)[name]
    truth_tracks = columns["track_number"][idx]
    model_hits = evaluation.metrics["predicted_tracks"] == truth_tracks
    margin = paired_margin(model_hits, table == truth_tracks)
    coverage = coverage_margin((evaluation.probabilities.max(axis=1), model_hits),
                               (share, table == truth_tracks))  # fmt: skip
    return evaluation, float(ceiling.mean()), margin, coverage


def pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def print_matrix(cells: list[Cell], records: int, train_args: str = "") -> int:
    short = {
        n: n.replace("station_", "").replace("_weighted", "~w").replace("_recent", "~14d")
        for n in tr.BASELINE_NAMES
    }
    print(f"\nDrift matrix: {records:,} sample records per history, "
          f"{f'`train {train_args}`' if train_args else '`train` defaults'}, "
          f"{os.cpu_count()} cores; tables from the same training records (~w: recency-weighted)")  # fmt: skip
    header = ["seed", "moves", "window", "train", "test", "top-1", "strongest table", "margin",
              "ceiling", "of ceil", "ECE", "@80 model", "@80 table", "@80 margin", "train s",
              "verdict"]  # fmt: skip
    rows = []
    failed = 0
    for c in cells:
        name, accuracy = c.strongest
        checks = c.checks()
        bad = [k for k, ok in checks.items() if not ok]
        failed += bool(bad)
        ceiling = ("last season " if c.window == "new" else "best ") + pct(c.ceiling)
        rows.append([
            str(c.seed), f"{c.level:.2f}", c.window, f"{c.train_records:,}", f"{c.test_records:,}",
            pct(c.top1), f"{short[name]} {pct(accuracy)}",
            f"{100 * c.margin[0]:+.2f} ±{100 * c.margin[1]:.2f}", ceiling,
            f"{100 * c.top1 / c.ceiling:.1f}%",
            f"{c.evaluation.metrics['expected_calibration_error']:.3f}",
            pct(c.evaluation.answerable["model"][0.8]), pct(c.evaluation.answerable[name][0.8]),
            f"{100 * c.coverage_margin[0]:+.2f} ±{100 * c.coverage_margin[1]:.2f}",
            f"{c.seconds:.0f}", "PASS" if not bad else "FAIL: " + "; ".join(bad),
        ])  # fmt: skip
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(v.rjust(w) if i < 15 else v for i, (v, w) in
                        enumerate(zip(row, widths, strict=True))))  # fmt: skip
    print("\nmargin: the model's top-1 minus the strongest table's, in points, with the 95% "
          "interval of that difference over the same records (paired); @80 margin: the same for "
          "coverage at 80% precision (95% bootstrap interval, the same records resampled for both).")  # fmt: skip
    for what, of in (
        ("top-1", lambda c: c.margin),
        ("coverage at 80%", lambda c: c.coverage_margin),
    ):
        unclear = [c for c in cells if abs(of(c)[0]) <= of(c)[1]]
        if unclear:
            print(f"{what}: in {len(unclear)} cell(s) the interval holds 0, so on these records the "
                  "model and the table cannot be told apart, whichever way the check went: "
                  + ", ".join(f"seed {c.seed} moves {c.level:.2f} {c.window}" for c in unclear))  # fmt: skip
    print("\nEvery lookup table's top-1 per cell (plain / recency-weighted):")
    for c in cells:
        tables = ", ".join(f"{short[n]} {pct(a)}" for n, a in c.evaluation.baselines.items())
        print(f"  seed {c.seed} moves {c.level:.2f} {c.window:>6}: {tables}")
    tied = [c for c in cells if c.strongest[1] >= c.ceiling - 0.5 / c.test_records]
    if tied:
        print(f"\nIn {len(tied)} cell(s) the strongest table already reaches the ceiling, so nothing "
              "that knows only what the ceiling assumes can be above it there: "
              + ", ".join(f"seed {c.seed} moves {c.level:.2f} {c.window}" for c in tied))  # fmt: skip
    print(f"\n{len(cells) - failed} of {len(cells)} cells PASS"
          + (f"; {failed} FAIL" if failed else ""))  # fmt: skip
    return failed


@click.command()
@click.option("--records", "-n", default=200_000, show_default=True)
@click.option("--seeds", default="1,2,3", show_default=True, help="Generator seeds.")
@click.option("--levels", default="0.03,0.15,0.30", show_default=True,
              help="Home-move shares, comma-separated.")  # fmt: skip
@click.option("--windows", default=",".join(WINDOWS), show_default=True)
@click.option("--train-args", default="", metavar="ARGS",
              help="Extra `train` options for an experiment (e.g. \"--refit-epochs 0\"); "
              "the matrix's header says which.")  # fmt: skip
def main(records: int, seeds: str, levels: str, windows: str, train_args: str) -> None:
    chosen = [w.strip() for w in windows.split(",")]
    unknown = set(chosen) - set(WINDOWS)
    if unknown:
        raise click.BadParameter(f"unknown window(s) {sorted(unknown)}", param_hint="--windows")
    cells = []
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("IMT_ML_NO_PROGRESS", "1")
        for seed in (int(s) for s in seeds.split(",")):
            for level in (float(x) for x in levels.split(",")):
                root = Path(tmp) / f"seed{seed}_moves{level}"
                for window, train, test, described in history_windows(root, records, seed, level,
                                                                       chosen):  # fmt: skip
                    print(described, file=sys.stderr, flush=True)
                    run_dir, seconds = run_train(train, root / "out", shlex.split(train_args))
                    evaluation, ceiling, margin, coverage = score(run_dir, test, window)
                    n_train = int(
                        tr.json.loads((train / "metadata.json").read_text())["total_records"]
                    )
                    cell = Cell(seed, level, window, n_train, evaluation.metrics["records"],
                                seconds, evaluation, ceiling, margin, coverage)  # fmt: skip
                    cells.append(cell)
                    print(f"  top-1 {pct(cell.top1)}, strongest table {pct(cell.strongest[1])}, "
                          f"ceiling {pct(ceiling)}, {seconds:.0f} s", file=sys.stderr, flush=True)  # fmt: skip
                    import shutil

                    shutil.rmtree(run_dir, ignore_errors=True)
    sys.exit(1 if print_matrix(cells, records, train_args) else 0)


if __name__ == "__main__":
    main()
