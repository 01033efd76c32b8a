"""Tune benchmark on sample data: a Ray Tune + ASHA search against the `train` defaults.

    uv run python tests/benchmarks/bench_tune.py [--records 200000] [--num-samples 16]
        [--max-epochs 8] [--final-epochs 8]

Prints the search's wall time, how many trials ASHA stopped early, the best trial's
validation accuracy, and the retrained best configuration's validation top-1
beside a `train` run with default options for the same number of epochs.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from pathlib import Path

import click

from imt_ml import tfrecord_reader as tr
from imt_ml.sample_data import write_export


@click.command()
@click.option("--records", "-n", default=200_000, show_default=True)
@click.option("--num-samples", default=16, show_default=True)
@click.option("--max-epochs", default=8, show_default=True)
@click.option("--final-epochs", default=8, show_default=True)
def main(records: int, num_samples: int, max_epochs: int, final_epochs: int) -> None:
    os.environ.setdefault("IMT_ML_NO_PROGRESS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        export = write_export(Path(tmp) / "exports", records, seed=42, records_per_file=10_000)
        os.environ["IMT_ML_OUTPUT_DIR"] = str(Path(tmp) / "output")
        started = time.perf_counter()
        tuned = tr.run_tune(export, tr.TuneOptions(
            num_samples=num_samples, max_epochs=max_epochs, final_epochs=final_epochs,
            asha_grace_period=2, asha_reduction_factor=3, ray_dir=str(Path(tmp) / "ray"),
        ))  # fmt: skip
        total = time.perf_counter() - started
        report = (tuned.run_dir / "training_report.md").read_text()
        default = tr.run_train(export, tr.TrainOptions(epochs=final_epochs))

    wall = re.search(r"Search wall time: ([\d.]+) s", report).group(1)
    early = re.search(r"stopped early by ASHA: (\d+)", report).group(1)
    best_trial = re.search(r"^\| 1 \|.*\| ([\d.]+) \|$", report, re.M).group(1)
    print(f"\nTune benchmark: {records:,} sample records, {num_samples} samples, ASHA max "
          f"{max_epochs} epochs (grace 2, factor 3), {os.cpu_count()} cores, 1 CPU per trial")  # fmt: skip
    print(f"Search wall time: {wall} s (whole tune run incl. final training: {total:.0f} s)")
    print(f"Trials stopped early by ASHA: {early} of {num_samples}")
    print(f"Best trial's best validation accuracy (Keras): {best_trial}")
    ev, dv = tuned.evaluation, default.evaluation
    print(
        f"Tuned config retrained {final_epochs} epochs: top-1 {100 * ev.metrics['top1_accuracy']:.2f}%"
    )
    print(
        f"train defaults, {final_epochs} epochs:        top-1 {100 * dv.metrics['top1_accuracy']:.2f}%"
    )
    print(f"Baseline (station + train number): {100 * dv.baselines['station_train']:.2f}%; "
          f"best possible {100 * dv.best_possible['accuracy']:.2f}%")  # fmt: skip


if __name__ == "__main__":
    main()
