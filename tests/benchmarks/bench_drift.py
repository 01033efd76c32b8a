"""Drift benchmark: `train` defaults against every lookup table as schedules change.

    uv run python tests/benchmarks/bench_drift.py [--records 200000] [--levels 0.03,0.15,0.30]

For each home-move share (the share of trains whose home track moves at each change
of schedule season; North Station keeps only to zones of tracks throughout):

1. N sample records are generated. The 28 days before the last change of season in
   them are held out (a later season is dropped): the weeks after a cut-off, as the
   tracker will ask about them.
2. `train` runs with its defaults on everything before the cut-off, as its own
   process (validation split, calibration and refit on every record included).
3. The saved `_best.keras`, loaded from disk, is scored on the held-out weeks beside
   the lookup tables of the same training records (station + route, station + train
   number, station + trip id falling back to the train number), with the best
   possible accuracy from the generating probabilities.

Targets at every level: top-1 >= 97% of the best possible and above every lookup
table; ECE <= 0.03; share of records answerable at 80% precision >= the strongest
lookup table's. With --ensemble-level, `ensemble --num-models 3` at that level too:
the combined model at least as good as its best member.
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

from imt_ml import tfrecord_reader as tr
from imt_ml.export_track_data import (
    ExportStats,
    TFRecordShardWriter,
    encode_example,
    parse_assignment,
)
from imt_ml.sample_data import SEASONS, Drift, SampleHistory, save_truth, season_of
from imt_ml.utils import SAMPLE_TRUTH_FILE

READER = Path(__file__).resolve().parents[2] / "src/imt_ml/tfrecord_reader.py"
HELD_OUT_DAYS = 28


def season_start(day: dt.date) -> dt.date:
    name, year = season_of(day)
    month = (12, 3, 6, 9)[SEASONS.index(name)]
    return dt.date(year, month, 1)


def write_split_exports(
    root: Path, records: int, drift: Drift, seed: int
) -> tuple[Path, Path, str]:
    """(training export, held-out export, description of the split)."""
    events = [e for e in SampleHistory(seed, drift).generate(records)]
    clean = [(e, parse_assignment(e.payload)) for e in events if e.kind == "clean"]
    last_day = max(dt.datetime.fromtimestamp(e.score, dt.UTC).date() for e, _ in clean)
    change = season_start(last_day)
    cut = change - dt.timedelta(days=HELD_OUT_DAYS)

    def local_day(event) -> dt.date:
        return dt.date.fromisoformat(event.member_key.rsplit(":", 1)[1][:10])

    parts = {"train": [], "test": []}
    for event, record in clean:
        day = local_day(event)
        if day < cut:
            parts["train"].append((event, record))
        elif day < change:
            parts["test"].append((event, record))
    paths = {}
    for name, rows in parts.items():
        stats = ExportStats()
        with TFRecordShardWriter(root / name, 20_000) as writer:
            for _, record in rows:
                writer.write(encode_example(record))
                stats.add(record)
            save_truth(writer.partial_dir / SAMPLE_TRUTH_FILE,
                       [e.truth_key for e, _ in rows], [e.best_probability for e, _ in rows])  # fmt: skip
            paths[name] = writer.commit(stats.metadata(source="bench_drift"))
    described = (f"{len(parts['train']):,} training records before {cut}, "
                 f"{len(parts['test']):,} held out from {cut} to {change - dt.timedelta(days=1)}")  # fmt: skip
    return paths["train"], paths["test"], described


def run_mode(export: Path, out: Path, *args: str) -> tuple[Path, float]:
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(READER), str(export), *args], capture_output=True, text=True,
        env={**os.environ, "IMT_ML_OUTPUT_DIR": str(out), "IMT_ML_NO_PROGRESS": "1"},
    )  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(f"{args[0]} failed:\n{proc.stderr[-3000:]}")
    return Path(proc.stdout.strip().splitlines()[-1]), time.perf_counter() - started


def score(model_file: Path, test_export: Path) -> tr.Evaluation:
    _, evaluation = tr.run_evaluate(test_export, model_file)
    return evaluation


def pct(x: float) -> str:
    return f"{100 * x:6.2f}%"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


@click.command()
@click.option("--records", "-n", default=200_000, show_default=True)
@click.option("--levels", default="0.03,0.15,0.30", show_default=True,
              help="Home-move shares, comma-separated.")  # fmt: skip
@click.option("--ensemble-level", type=float, default=0.15, show_default=True,
              help="Also run a 3-member ensemble at this level (negative: skip).")  # fmt: skip
@click.option("--seed", default=42, show_default=True)
def main(records: int, levels: str, ensemble_level: float, seed: int) -> None:
    rows, checks = [], []
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["IMT_ML_OUTPUT_DIR"] = str(Path(tmp) / "evaluations")
        for level in [float(x) for x in levels.split(",")]:
            root = Path(tmp) / f"level_{level}"
            train, test, described = write_split_exports(root, records, Drift(level), seed)
            print(f"home-move share {level:.2f}: {described}", file=sys.stderr, flush=True)
            run_dir, seconds = run_mode(train, root / "out", "train")
            ev = score(run_dir / "track_prediction_model_best.keras", test)
            rows.append((level, ev, seconds))
            if level == ensemble_level:
                ens_dir, ens_seconds = run_mode(
                    train, root / "out", "ensemble", "--num-models", "3"
                )
                prefix = "track_prediction_ensemble_model"
                members = [score(ens_dir / f"{prefix}_{i}_best.keras", test) for i in range(3)]
                combined_file = ens_dir / f"{prefix}_combined.keras"
                weights = [tr.load_saved_model(combined_file).get_layer(f"member_weight_{i}").scale
                           for i in range(3)]  # fmt: skip
                checks.append((level, members, score(combined_file, test), ens_seconds, weights))

    names = list(tr.BASELINE_NAMES)
    print(f"\nDrift benchmark: {records:,} sample records per level, held-out {HELD_OUT_DAYS} days "
          f"before a season change, {os.cpu_count()} cores")  # fmt: skip
    print(f"{'moves':>5} {'top-1':>7} {'best':>7} {'of best':>7} "
          + " ".join(f"{n:>13}" for n in names)
          + f" {'ECE':>6} {'@80% model':>10} {'@80% lookup':>11} {'seconds':>8}")  # fmt: skip
    verdicts = []
    for level, ev, seconds in rows:
        m = ev.metrics
        top1, best = m["top1_accuracy"], ev.best_possible["accuracy"]
        strongest, strongest_acc = tr.strongest_baseline(ev.baselines)
        model80, lookup80 = ev.answerable["model"][0.8], ev.answerable[strongest][0.8]
        ece = m["expected_calibration_error"]
        print(f"{level:>5.2f} {pct(top1)} {pct(best)} {100 * top1 / best:>6.1f}% "
              + " ".join(f"{pct(ev.baselines[n]):>13}" for n in names)
              + f" {ece:>6.3f} {pct(model80):>10} {pct(lookup80):>11} {seconds:>8.0f}")  # fmt: skip
        verdicts.append((level, top1 >= 0.97 * best, top1 > strongest_acc, ece <= 0.03,
                         model80 >= lookup80))  # fmt: skip
    print(
        "(baselines: most frequent track per station + route / + train number / + trip id "
        "falling back to the train number, from the same training records; @80%: share of "
        "held-out records answerable at 80% precision, model vs strongest lookup table)"
    )
    for level, of_best, above, ece_ok, cover_ok in verdicts:
        print(f"moves {level:.2f}: >= 97% of best {verdict(of_best)}; above every baseline "
              f"{verdict(above)}; ECE <= 0.03 {verdict(ece_ok)}; coverage at 80% >= lookup "
              f"{verdict(cover_ok)}")  # fmt: skip
    for level, members, combined, seconds, weights in checks:
        accs = [e.metrics["top1_accuracy"] for e in members]
        top = combined.metrics["top1_accuracy"]
        print(f"ensemble of 3 at moves {level:.2f} ({seconds:.0f} s): members "
              + ", ".join(pct(a).strip() for a in accs)
              + f" (weights {', '.join(f'{w:.2f}' for w in weights)}); combined {pct(top).strip()}"
              f", ECE {combined.metrics['expected_calibration_error']:.3f} -> at least its best "
              f"member {verdict(top >= max(accs))}")  # fmt: skip


if __name__ == "__main__":
    main()
