"""Distributed benchmark on sample data, all processes on this machine (127.0.0.1).

    uv run python tests/benchmarks/bench_distributed.py [--records 20000]

1. sync-tune: the same Hyperband search (max 2 epochs, factor 2: 5 trials) with one
   worker and with two synchronous workers; wall time of the chief.
2. tuner-parallel: a 6-trial Hyperband search (max 3 epochs, factor 3) with the chief
   alone and with the chief plus one more instance; wall time of the chief.
Each process gets TF_NUM_INTRAOP_THREADS=THREADS (default 1), so two processes use the
two cores of the dev machine; the one-worker sync run is also timed with 2 threads.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

from imt_ml.sample_data import write_export
from imt_ml.utils import free_port

LAUNCHER = str(Path(__file__).resolve().parents[2] / "src/imt_ml/distributed_launcher.py")


def run_all(commands: list[list[str]], env: dict[str, str]) -> float:
    """Start every command at once; seconds until the first one (the chief) ends, all ok."""
    started = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, LAUNCHER, *c], env={**os.environ, **env},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for c in commands]  # fmt: skip
    chief_seconds = None
    for proc in procs:
        _, err = proc.communicate()
        if chief_seconds is None:
            chief_seconds = time.perf_counter() - started
        if proc.returncode != 0:
            raise SystemExit(f"failed: {proc.args}\n{err[-2000:]}")
    assert chief_seconds is not None
    return chief_seconds


@click.command()
@click.option("--records", "-n", default=20_000, show_default=True)
def main(records: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        data = str(write_export(Path(tmp) / "exports", records, seed=42, records_per_file=10_000))
        base = {"IMT_ML_NO_PROGRESS": "1", "IMT_ML_OUTPUT_DIR": str(Path(tmp) / "out")}
        results = {}

        sync = ["sync-tune", "--data-dir", data, "--max-epochs", "2", "--factor", "2", "--batch-size", "256",
                "--final-epochs", "1"]  # fmt: skip
        for label, threads, n in [("sync, 1 worker, 2 threads", "2", 1), ("sync, 1 worker, 1 thread", "1", 1),
                                  ("sync, 2 workers, 1 thread each", "1", 2)]:  # fmt: skip
            workers = ",".join(f"127.0.0.1:{free_port()}" for _ in range(n))
            env = {**base, "TF_NUM_INTRAOP_THREADS": threads}
            kt = ["--tuner-directory", str(Path(tmp) / f"kt_{n}_{threads}")]
            results[label] = run_all(
                [[*sync, *kt, "--workers", workers, "--index", str(i)] for i in range(n)], env
            )

        for label, ids in [("tuner-parallel, chief alone", ["chief"]),
                           ("tuner-parallel, chief + tuner0", ["chief", "tuner0"])]:  # fmt: skip
            directory = str(Path(tmp) / f"ktp_{len(ids)}")
            oracle = f"127.0.0.1:{free_port()}"
            cmd = ["tuner-parallel", "--tuner-directory", directory, "--oracle-address", oracle, "--data-dir", data,
                   "--max-epochs", "3", "--factor", "3", "--batch-size", "256", "--final-epochs", "1"]  # fmt: skip
            env = {**base, "TF_NUM_INTRAOP_THREADS": "1"}
            results[label] = run_all([[*cmd, "--tuner-id", i] for i in ids], env)

    print(
        f"\nDistributed benchmark: {records:,} sample records, {os.cpu_count()} cores, all on 127.0.0.1"
    )
    print(
        "(chief's wall time, including start-up, data loading and retraining the best for 1 epoch)"
    )
    for label, seconds in results.items():
        print(f"  {label:<34} {seconds:7.1f} s")


if __name__ == "__main__":
    main()
