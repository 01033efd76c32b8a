"""Ensemble benchmark on sample data.

    uv run python tests/benchmarks/bench_ensemble.py [--records 200000] [--num-models 5] [--epochs 8]

Trains an ensemble on N sample records and prints the ensemble's validation
accuracy (soft and majority vote) against its best member and the best possible
accuracy, and the fit time per member.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import click

from imt_ml import tfrecord_reader as tr
from imt_ml.sample_data import write_export


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
        run_dir = tr.run_ensemble(export, opts, num_models)
        report = (run_dir / "training_report.md").read_text()
        vocab = json.loads((run_dir / f"{opts.model_path}_vocab.json").read_text())

    def figure(pattern: str) -> str:
        match = re.search(pattern, report)
        return match.group(1) if match else "?"

    print(f"\nEnsemble benchmark: {records:,} sample records ({vocab['record_counts']['train']:,} "
          f"train / {vocab['record_counts']['validation']:,} validation), {num_models} members, "
          f"{epochs} epochs max, {os.cpu_count()} cores")  # fmt: skip
    print(re.search(r"\| Member \|.*?\n\n", report, re.S).group(0))
    print(
        f"Soft vote:      {figure(r'soft vote \(mean probability; the combined model\) \| ([\d.]+%)')}"
    )
    print(
        f"Majority vote:  {figure(r'majority vote \(ties to the higher mean probability\) \| ([\d.]+%)')}"
    )
    print(f"Best member:    {figure(r'Best single member \| ([\d.]+%)')}")
    print(f"Best possible:  {figure(r'Best possible \(sample data.*?\| ([\d.]+%)')}")
    print(f"Baseline (station + train number): {figure(r'station \+ train number \| ([\d.]+%)')}")
    print(f"Mean fit time per member: {figure(r'Mean fit time per member: ([\d.]+ s)')}")


if __name__ == "__main__":
    main()
