"""Ablation benchmark: what each mechanism of the model and the recipe earns, measured.

    uv run task bench-ablation                          # every mechanism (about an hour)
    uv run task bench-ablation -- --only evidence,dropout   # a part
    uv run task bench-ablation -- --report              # the table of every part run so far

Worlds: sample histories of --seeds generator seeds (each draws a world of its own;
15% of homes moving at each change of season; South Station's platforms 5 and 6 closed
from two to five weeks after the last change C). Windows, each scored on records no
choice saw, trained on everything before it:

- `before`: the 28 days before C (ordinary weeks);
- `new`: the first 28 days of the new season (no record of it in training);
- `closure`: days 21-34 after C, the closure's second and third weeks.

In each cell the default recipe (`fit_track_model` with `train`'s defaults) and, for each
mechanism, the same recipe without it (or, for an option that is off by default, with
it) train on the same records and answer the same held-out records, so each difference
is paired. Per mechanism: the top-1 cost of removing it (default minus without, in
points, with its 95% interval) per cell and pooled, the change of ECE without it, and
the mean train seconds. A mechanism earns its place when removing it is significantly
worse in some cell or pooled (interval above 0), or worsens ECE by more than 0.005.

Each run stores its cells' per-record answers under --results (default
output/bench_ablation/), the default model's once per cell, so parts can run separately
and `--report` prints the table of everything measured.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_backtest import history  # noqa: E402
from bench_drift import write_export  # noqa: E402

from imt_ml import tfrecord_reader as tr  # noqa: E402
from imt_ml.evaluation import evaluate_predictions, expected_calibration_error, paired_margin  # noqa: E402
from imt_ml.utils import TRACKER_TIMEZONE  # noqa: E402

#: window -> (training ends, test starts, test ends), in days after the change of season C.
WINDOWS = {"before": (-28, -28, 0), "new": (0, 0, 28), "closure": (21, 21, 35)}
ECE_TOLERANCE = 0.005

Variant = tuple[str, Callable[[tr.TrainOptions, tr.ModelConfig], tuple]]


def config(**changes: Any) -> Callable:
    return lambda opts, cfg: (opts, dataclasses.replace(cfg, **changes), None)


def options(**changes: Any) -> Callable:
    return lambda opts, cfg: (dataclasses.replace(opts, **changes), cfg, None)


#: name -> (what the variant is, how it changes (options, model config) -> (options,
#: config, augmented: None for the default)). "+": an option off by default, measured by
#: turning it on. Removed after the run of 2026-12-04: thin_trip+ (young trips), and the
#: per-batch hiding of trains above 10,000 records (now hide_identities+).
MECHANISMS: dict[str, tuple[str, Callable]] = {
    "trip_table": ("without the station + trip id table", config(trip_history=False)),
    "train_table": ("without the station + train number tables", config(train_history=False)),
    "weekday_history": ("without the station + train + weekday table", config(weekday_history=False)),
    "evidence": ("without the tables' log-shares in the logits", config(evidence=False)),
    "other_days": ("training reads its own days' counts too", config(other_days=False)),
    "new_trip_shrinkage": ("no record reads its trip as new (hide_trip 0)", config(hide_trip=0.0)),
    "whole_train": ("a new trip's train keeps only its other trips", config(new_trip_whole_train=False)),
    "hide_identities+": ("+ each batch hides 3% of trains (augmentation on)",
                         lambda opts, cfg: (opts, cfg, True)),
    "closed_tracks": ("without the closed-platform mask", config(closed_tracks=False)),
    "recency": ("every record weighs the same (--recency-half-life 0)", options(recency_half_life=0.0)),
    "regimes": ("no train's older records set aside (--change-threshold 0)",
                options(change_threshold=0.0)),
    "class_weights+": ("+ balanced class weights", options(class_weight="balanced")),
    "refit": ("no refit on every record (--no-refit)", options(no_refit=True)),
    "calibration": ("the model's own probabilities, no confidence maps", None),
    "dense_tower": ("no hidden layers (logits straight from the features)", config(hidden_units=())),
    "hidden_units": ("one layer of 64 instead of 256-128", config(hidden_units=(64,))),
    "batch_norm": ("without batch normalisation", config(batch_norm=False)),
    "dropout": ("without dropout", config(dropout=0.0)),
    "station_embedding": ("without the station embedding", config(station_embedding=0)),
    "route_embedding": ("without the route embedding", config(route_embedding=0)),
    "headsign_embedding": ("without the headsign embedding", config(headsign_embedding=0)),
    "train_embedding": ("without the train-number embedding", config(train_embedding=0)),
    # the removals together: what the ties above add up to
    "lean": ("no dropout or embeddings; one layer of 64",
             lambda opts, cfg: (opts, dataclasses.replace(
                 cfg, dropout=0.0, hidden_units=(64,), station_embedding=0, route_embedding=0,
                 headsign_embedding=0, train_embedding=0), None)),
    "lean_embedded": ("no dropout; one layer of 64; embeddings kept",
                      lambda opts, cfg: (opts, dataclasses.replace(
                          cfg, dropout=0.0, hidden_units=(64,)), None)),
}  # fmt: skip


def histories(records: int, seed: int, root: Path):
    """Yield (window, training export, test export) of one world's history (bench-backtest's:
    the closure starts two weeks after the last change of season C)."""
    from zoneinfo import ZoneInfo

    boston = ZoneInfo(TRACKER_TIMEZONE)
    weeks_after = -(-max(end for *_, end in WINDOWS.values()) // 7)
    clean, change, _ = history(records, seed, weeks_after)
    days = [dt.datetime.fromtimestamp(e.score, boston).date() for e, _ in clean]
    for window, (train_end, test_start, test_end) in WINDOWS.items():
        train_end, test_start, test_end = (change + dt.timedelta(days=d)
                                           for d in (train_end, test_start, test_end))  # fmt: skip
        train = [row for row, day in zip(clean, days, strict=True) if day < train_end]
        test = [row for row, day in zip(clean, days, strict=True) if test_start <= day < test_end]
        yield (
            window,
            write_export(root / window, "train", train),
            write_export(root / window, "test", test),
        )


def answers(model: Any, columns: dict, raw: bool = False) -> dict[str, np.ndarray]:
    """Per held-out record: right or not, and the stated confidence."""
    idx = np.arange(len(columns["track_number"]))
    labels = tr.model_labels(model)
    source = tr.uncalibrated(model) if raw else model
    probs = tr.predict_probabilities(source, tr.model_features(columns, idx))
    metrics = evaluate_predictions(probs, columns["track_number"], labels, columns["station_id"])
    return {
        "hits": metrics["predicted_tracks"] == columns["track_number"],
        "confidence": probs.max(axis=1),
    }


def train_variant(train: Path, opts: tr.TrainOptions, cfg: tr.ModelConfig,
                  augmented: bool | None, out: Path) -> tuple[Any, float]:  # fmt: skip
    data = tr.prepare_training_data(train, opts)
    if augmented is not None:
        data = dataclasses.replace(data, augmented=augmented)
    started = time.perf_counter()
    fitted = tr.fit_track_model(data, opts, tr.ModelFiles.under(out, "model"), cfg)
    return fitted.load(), time.perf_counter() - started


def run_cell(cell: str, train: Path, test: Path, names: list[str], results: Path) -> None:
    """The default and each named variant on one cell; answers saved per variant."""
    columns = tr.read_export_columns(tr.find_export_dir(test))
    opts, cfg = tr.TrainOptions(), tr.ModelConfig()
    target = results / cell
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        if not (target / "default.npz").is_file():  # once per cell: every part pairs with it
            default, seconds = train_variant(train, opts, cfg, None, Path(tmp) / "default")
            np.savez(target / "default.npz", seconds=seconds, **answers(default, columns))
            # calibration: the same model's own probabilities, before its confidence maps
            np.savez(target / "calibration.npz", seconds=0.0, **answers(default, columns, raw=True))
            print(f"  {cell} default: {seconds:.0f} s", file=sys.stderr, flush=True)
        for name in names:
            _, change = MECHANISMS[name]
            if change is None:  # measured with the default
                continue
            variant_opts, variant_cfg, augmented = change(opts, cfg)
            model, seconds = train_variant(train, variant_opts, variant_cfg, augmented,
                                           Path(tmp) / name)  # fmt: skip
            np.savez(target / f"{name}.npz", seconds=seconds, **answers(model, columns))
            print(f"  {cell} {name}: {seconds:.0f} s", file=sys.stderr, flush=True)


def report(results: Path) -> None:
    cells = sorted(p.name for p in results.iterdir() if (p / "default.npz").is_file())
    if not cells:
        raise SystemExit(f"no measured cell under {results}")
    load = {c: {p.stem: dict(np.load(p)) for p in (results / c).glob("*.npz")} for c in cells}
    print(f"\nAblation: the top-1 cost of removing each mechanism (default minus without, points, "
          f"95% paired interval) per cell and pooled; ECE change without it; {os.cpu_count()} cores")  # fmt: skip
    print("cells: " + ", ".join(cells))
    header = [
        "mechanism",
        *[c.replace("seed", "s") for c in cells],
        "pooled",
        "ΔECE",
        "train s",
        "verdict",
    ]
    rows = []
    for name, (what, _) in MECHANISMS.items():
        measured = [c for c in cells if name in load[c]]
        if not measured:
            continue
        per_cell, hits_d, hits_v, conf_d, conf_v, secs = [], [], [], [], [], []
        significant = False
        for c in cells:
            if c not in measured:
                per_cell.append("-")
                continue
            d, v = load[c]["default"], load[c][name]
            margin, half = paired_margin(d["hits"], v["hits"])
            significant |= margin - half > 0
            per_cell.append(f"{100 * margin:+.1f}±{100 * half:.1f}")
            hits_d.append(d["hits"]), hits_v.append(v["hits"])
            conf_d.append(d["confidence"]), conf_v.append(v["confidence"])
            secs.append(float(v["seconds"]))
        hd, hv = np.concatenate(hits_d), np.concatenate(hits_v)
        margin, half = paired_margin(hd, hv)
        significant |= margin - half > 0
        ece = expected_calibration_error(np.concatenate(conf_v), hv) - expected_calibration_error(
            np.concatenate(conf_d), hd
        )
        worse_ece = ece > ECE_TOLERANCE
        off_by_default = name.endswith("+")
        if off_by_default:  # the variant adds it: it earns a place only if adding is better
            verdict = "keep (helps)" if margin + half < 0 and ece <= ECE_TOLERANCE else "remove"
        else:
            verdict = "keep" if significant or worse_ece else "remove"
        rows.append([f"{name}: {what}", *per_cell, f"{100 * margin:+.2f}±{100 * half:.2f}",
                     f"{ece:+.4f}", f"{np.mean(secs):.0f}", verdict])  # fmt: skip
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(v.ljust(w) if i == 0 else v.rjust(w)
                        for i, (v, w) in enumerate(zip(row, widths, strict=True))))  # fmt: skip
    print("\nA positive cost: the model is worse without the mechanism; its interval above 0 "
          "is significant. For a `+` option (off by default) the variant adds it, so a "
          "negative cost means adding it helps.")  # fmt: skip
    default_secs = np.mean([float(load[c]["default"]["seconds"]) for c in cells])
    print(f"Default recipe: {default_secs:.0f} s per cell on average.")


@click.command()
@click.option("--records", "-n", default=45_000, show_default=True, help="Records per world.")
@click.option("--seeds", default="1,2,3", show_default=True, help="Generator seeds (worlds).")
@click.option("--only", default="", help="Comma-separated mechanisms (default: all).")
@click.option("--results", type=click.Path(path_type=Path), default=Path("output/bench_ablation"),
              show_default=True)  # fmt: skip
@click.option("--report", "report_only", is_flag=True, help="Print the table of what is stored.")
def main(records: int, seeds: str, only: str, results: Path, report_only: bool) -> None:
    names = [n.strip() for n in only.split(",") if n.strip()] or list(MECHANISMS)
    unknown = set(names) - set(MECHANISMS)
    if unknown:
        raise click.BadParameter(f"unknown mechanism(s) {sorted(unknown)}; known: "
                                 f"{', '.join(MECHANISMS)}", param_hint="--only")  # fmt: skip
    os.environ.setdefault("IMT_ML_NO_PROGRESS", "1")
    os.environ.setdefault("IMT_ML_OUTPUT_DIR", tempfile.mkdtemp(prefix="bench-ablation-"))
    if not report_only:
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            for seed in (int(s) for s in seeds.split(",")):
                for window, train, test in histories(records, seed, Path(tmp) / f"seed{seed}"):
                    run_cell(f"seed{seed}-{window}", train, test, names, results)
        (results / "runs.jsonl").open("a").write(json.dumps({
            "when": dt.datetime.now().isoformat(timespec="seconds"), "records": records,
            "seeds": seeds, "only": names, "seconds": round(time.perf_counter() - started)}) + "\n")  # fmt: skip
        print(f"Results: {results}", file=sys.stderr)
    report(results)


if __name__ == "__main__":
    main()
