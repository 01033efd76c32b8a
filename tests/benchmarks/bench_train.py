"""Training benchmark on sample data: input pipeline throughput, seconds per epoch, accuracy.

    uv run python tests/benchmarks/bench_train.py [--records 200000] [--epochs 8]
        [--compare-class-weights]

1. Writes N sample records as an export (with their generating probabilities).
2. Input pipeline: records/s of one pass over `train_ds` against a bare
   TFRecordDataset -> batch -> parse_example read of the same files at the same
   batch size (target: at least 80% of it). The one-off load (read, split,
   vocabularies) is printed separately.
3. Trains with the `train` defaults for --epochs and prints seconds per epoch and
   validation top-1 against the strongest lookup table and the best possible
   accuracy (targets: above every baseline, at least 95% of the best possible).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import click

from imt_ml import tfrecord_reader as tr
from imt_ml.sample_data import write_export
from imt_ml.utils import SHARD_GLOB


def records_per_second(dataset, count_key) -> tuple[float, int]:
    started = time.perf_counter()
    n = 0
    for batch in dataset:
        n += int(count_key(batch))
    return n / (time.perf_counter() - started), n


@click.command()
@click.option("--records", "-n", default=200_000, show_default=True)
@click.option("--epochs", default=8, show_default=True)
@click.option(
    "--compare-class-weights", is_flag=True, help="Also train with balanced and no class weights."
)
def main(records: int, epochs: int, compare_class_weights: bool) -> None:
    os.environ.setdefault("IMT_ML_NO_PROGRESS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "exports"
        export = write_export(root, records, seed=42, records_per_file=10_000)
        os.environ["IMT_ML_OUTPUT_DIR"] = str(Path(tmp) / "output")
        opts = tr.TrainOptions(epochs=epochs)
        files = sorted(str(p) for p in export.glob(SHARD_GLOB))

        # Input pipeline
        bare = tr.make_raw_dataset(files, batch_size=opts.batch_size)
        records_per_second(bare, lambda b: len(b["track_number"]))  # warm the page cache
        bare_rate, _ = max(
            records_per_second(bare, lambda b: len(b["track_number"])) for _ in range(3)
        )
        started = time.perf_counter()
        data = tr.prepare_data(export, opts.batch_size, augment=False)
        load_s = time.perf_counter() - started
        train_rate, n_train = max(
            records_per_second(data.train_ds, lambda b: len(b[1])) for _ in range(3)
        )

        # Training with the defaults
        runs = {}
        for mode in ["sqrt", "balanced", "none"] if compare_class_weights else [opts.class_weight]:
            result = tr.run_train(export, tr.TrainOptions(epochs=epochs, class_weight=mode))
            runs[mode] = result

    print(f"\nTraining benchmark: {records:,} sample records, {os.cpu_count()} cores")
    print(f"Input: bare TFRecordDataset+parse_example {bare_rate:,.0f} rec/s; "
          f"train_ds {train_rate:,.0f} rec/s ({n_train:,} records/epoch) = "
          f"{100 * train_rate / bare_rate:.0f}% of bare (target >= 80%: "
          f"{'PASS' if train_rate >= 0.8 * bare_rate else 'FAIL'})")  # fmt: skip
    print(f"One-off load (read all shards, split, vocabularies, datasets): {load_s:.1f} s")
    print(f"{'class weights':>14} {'epochs':>6} {'s/epoch':>8} {'top-1':>7} {'top-3':>7} "
          f"{'baseline':>9} {'best':>7} {'of best':>8}")  # fmt: skip
    for mode, result in runs.items():
        ev = result.evaluation
        top1, base, best = (
            ev.metrics["top1_accuracy"],
            tr.strongest_baseline(ev.baselines)[1],
            ev.best_possible["accuracy"],
        )
        print(f"{mode:>14} {result.epochs_run:>6} {result.fit_seconds / result.epochs_run:>8.1f} "
              f"{100 * top1:>6.2f}% {100 * ev.metrics['top3_accuracy']:>6.2f}% {100 * base:>8.2f}% "
              f"{100 * best:>6.2f}% {100 * top1 / best:>7.1f}%")  # fmt: skip
    default = runs[opts.class_weight].evaluation
    top1 = default.metrics["top1_accuracy"]
    print(f"Default: above every baseline: "
          f"{'PASS' if top1 > tr.strongest_baseline(default.baselines)[1] else 'FAIL'}; "
          f">= 95% of best possible: {'PASS' if top1 >= 0.95 * default.best_possible['accuracy'] else 'FAIL'}")  # fmt: skip
    print("(baseline: the strongest lookup table of the training period (station + route, "
          "+ train number, + trip id); best: mean generating probability of the likeliest track)")  # fmt: skip


if __name__ == "__main__":
    main()
