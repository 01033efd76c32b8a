"""Ensemble benchmark on sample data.

    uv run python tests/benchmarks/bench_ensemble.py [--records 200000] [--num-models 5] [--epochs 8]

Trains an ensemble on N sample records and prints the ensemble's validation
accuracy (soft and majority vote) against its best member and the best possible
accuracy, and the fit time per member.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import click

from imt_ml import tfrecord_reader as tr
from imt_ml.sample_data import write_export


def pct(x: float) -> str:
    return f"{100 * x:.2f}%"


@click.command()
@click.option("--records", "-n", default=200_000, show_default=True)
@click.option("--num-models", default=5, show_default=True)
@click.option("--epochs", default=8, show_default=True)
def main(records: int, num_models: int, epochs: int) -> None:
    os.environ.setdefault("IMT_ML_NO_PROGRESS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        export = write_export(Path(tmp) / "exports", records, seed=42, records_per_file=10_000)
        os.environ["IMT_ML_OUTPUT_DIR"] = str(Path(tmp) / "output")
        opts = tr.TrainOptions(epochs=epochs, model_path=tr.DEFAULT_ENSEMBLE_MODEL_PATH)
        result = tr.run_ensemble(export, opts, num_models)

    soft = result.soft_vote
    best = soft.best_possible["accuracy"] if soft.best_possible else float("nan")
    print(f"\nEnsemble benchmark: {records:,} sample records, {num_models} members, "
          f"{epochs} epochs max, {os.cpu_count()} cores")  # fmt: skip
    for i, (acc, sec) in enumerate(zip(result.member_accuracy, result.member_seconds, strict=True)):
        print(f"  member {i}: top-1 {pct(acc)}, fit {sec:.1f} s")
    print(f"Soft vote (combined model): {pct(soft.metrics['top1_accuracy'])}")
    print(f"Majority vote:              {pct(result.majority_vote_accuracy)}")
    print(f"Best member:                {pct(max(result.member_accuracy))}")
    print(f"Best possible:              {pct(best)}")
    for name, accuracy in soft.baselines.items():
        print(f"Baseline {name + ':':<18}{pct(accuracy)}")
    print(f"Members all agree on {pct(result.agreement['all_agree'])} of records")
    print(f"Mean fit time per member:   {sum(result.member_seconds) / num_models:.1f} s")


if __name__ == "__main__":
    main()
