"""Export benchmark: records/s and peak RSS of export_track_data.py on sample history.

    uv run python tests/benchmarks/bench_export.py [--records 200000]

Seeds a throwaway local redis-server with N sample assignments (and, for the
memory comparison, 50,000), runs the exporter as its own process each time, and
prints its throughput and peak RSS beside redis-benchmark's pipelined GET rate on
the same server, the ceiling for any client. Targets on the 2-core dev machine:
>= 50,000 records/s, and peak RSS at N within 20% of the RSS at 50,000.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import redis

from imt_ml.sample_data import seed_redis
from imt_ml.utils import LocalRedisServer

EXPORTER = Path(__file__).resolve().parents[2] / "src/imt_ml/export_track_data.py"


def run_export(port: int, output: Path) -> dict:
    """Run the exporter in a child process; its rate, wall time and peak RSS."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, str(EXPORTER), "-o", str(output), "--redis-host", "127.0.0.1",
         "--redis-port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "IMT_ML_NO_PROGRESS": "1"},
    )  # fmt: skip
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    stderr = proc.stderr.read() if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"export failed:\n{stderr}")
    match = re.search(r"Exported ([\d,]+) records in ([\d.]+) s \(([\d,]+) records/s\)", stderr)
    assert match, stderr
    return {
        "records": int(match.group(1).replace(",", "")),
        "export_s": float(match.group(2)),
        "rate": int(match.group(3).replace(",", "")),
        "wall_s": wall,
        "peak_rss_mb": usage.ru_maxrss / 1024,  # Linux reports KiB
    }


def redis_get_ceiling(port: int) -> str:
    binary = shutil.which("redis-benchmark")
    if not binary:
        return "redis-benchmark not installed (apt-get install redis-tools)"
    out = subprocess.run(
        [binary, "-h", "127.0.0.1", "-p", str(port), "-t", "get", "-n", "1000000", "-P", "64",
         "-d", "360", "-q"],
        capture_output=True, text=True, check=False,
    ).stdout  # fmt: skip
    match = re.search(r"GET: ([\d.,]+) requests per second", out.replace("\r", "\n"))
    return (
        f"{float(match.group(1).replace(',', '')):,.0f} GET/s (pipelined, 360-byte values)"
        if match
        else out.strip()
    )


@click.command()
@click.option("--records", "-n", default=200_000, show_default=True, help="Records for the run.")
@click.option("--small", default=50_000, show_default=True, help="Records for the RSS baseline.")
def main(records: int, small: int) -> None:
    results = {}
    with LocalRedisServer() as server, tempfile.TemporaryDirectory() as tmp:
        client = redis.Redis(host="127.0.0.1", port=server.port)
        for n in (small, records):
            client.flushall()
            seed_redis(client, n, seed=42)
            results[n] = run_export(server.port, Path(tmp) / f"export_{n}")
        ceiling = redis_get_ceiling(server.port)

    print(f"\nExport benchmark ({os.cpu_count()} cores)")
    print(f"{'assignments':>12} {'exported':>10} {'export s':>9} {'records/s':>10} "
          f"{'process s':>10} {'peak RSS MB':>12}")  # fmt: skip
    for n, r in results.items():
        print(f"{n:>12,} {r['records']:>10,} {r['export_s']:>9.2f} {r['rate']:>10,} "
              f"{r['wall_s']:>10.2f} {r['peak_rss_mb']:>12.0f}")  # fmt: skip
    print(f"Ceiling: redis-benchmark on the same server: {ceiling}")
    big, base = results[records], results[small]
    growth = big["peak_rss_mb"] / base["peak_rss_mb"] - 1
    print(
        f"records/s target >= 50,000: {big['rate']:,} -> {'PASS' if big['rate'] >= 50_000 else 'FAIL'}"
    )
    print(f"RSS growth {small:,} -> {records:,}: {growth:+.1%} (target within 20%) -> "
          f"{'PASS' if abs(growth) <= 0.2 else 'FAIL'}")  # fmt: skip
    print("(records/s counts the export itself; 'process s' adds Python and TensorFlow start-up)")


if __name__ == "__main__":
    main()
