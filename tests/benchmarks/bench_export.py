"""Export benchmark: the whole exporter command against the Redis read ceiling.

    uv run python tests/benchmarks/bench_export.py [--records 100000 --records 1000000]

Seeds a throwaway local redis-server with N sample assignments for each N, runs
the exporter as its own process (as a user would), and prints its export rate,
the whole command's wall time and peak RSS, and its start-up time (`--help`).
The ceiling is measured on the same server in the same run: the same values
read from Python the cheapest way (ZRANGE pages, one MGET each, orjson.loads of
every value), with nothing written. Targets on the 2-core dev machine:
>= 120,000 records/s beyond start-up, 100,000 records in <= 3 s for the whole
command, `--help` in <= 0.5 s, peak RSS <= 200 MB at every N.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import orjson
import redis

from imt_ml.sample_data import seed_redis
from imt_ml.utils import LocalRedisServer

EXPORTER = Path(__file__).resolve().parents[2] / "src/imt_ml/export_track_data.py"
PAGE = 2000  # members per ZRANGE/MGET page, as the exporter reads them


def run_export(port: int, output: Path) -> dict:
    """Run the exporter in a child process; its rate, wall time and peak RSS."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, str(EXPORTER), "-o", str(output), "--redis-host", "127.0.0.1",
         "--redis-port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "IMT_ML_NO_PROGRESS": "1"},
    )  # fmt: skip
    peak_kib = peak_rss_of_tree(proc)
    _, stderr = proc.communicate()
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"export failed:\n{stderr}")
    match = re.search(r"Exported ([\d,]+) records in ([\d.]+) s \(([\d,]+) records/s\)", stderr)
    assert match, stderr
    return {
        "records": int(match.group(1).replace(",", "")),
        "export_s": float(match.group(2)),
        "rate": int(match.group(3).replace(",", "")),
        "wall_s": wall,
        "peak_rss_mb": peak_kib / 1024,
    }


def peak_rss_of_tree(proc: subprocess.Popen, interval: float = 0.02) -> int:
    """Sum over the process and its children of each one's peak RSS (VmHWM, KiB),
    polled until it exits: an upper bound of the command's peak.

    Not getrusage: on Linux a child's ru_maxrss starts from the RSS of the
    process that forked it, here this benchmark with a million records in hand."""
    peaks: dict[int, int] = {}
    while proc.poll() is None:
        for pid in [proc.pid, *child_pids(proc.pid)]:
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.M)
            if match:
                peaks[pid] = max(peaks.get(pid, 0), int(match.group(1)))
        time.sleep(interval)
    return sum(peaks.values())


def child_pids(pid: int) -> list[int]:
    pids = []
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            pids += [int(p) for p in children.read_text().split()]
    return pids


def startup_seconds(repeats: int = 5) -> float:
    """Best of `repeats` runs of `export_track_data.py --help`, whole process."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run([sys.executable, str(EXPORTER), "--help"], capture_output=True, check=True)
        best = min(best, time.perf_counter() - started)
    return best


def read_ceiling(client: redis.Redis) -> tuple[int, float]:
    """(values, values/s) for MGET + orjson.loads of every history value, page by page.

    The member lists are fetched before the clock starts, so the figure is the cost
    of getting the values into Python objects and nothing else."""
    pages = []
    for key in client.scan_iter(match="track_timeseries:*", count=1000):
        members = client.zrange(key, 0, -1)
        pages += [members[i : i + PAGE] for i in range(0, len(members), PAGE)]
    started = time.perf_counter()
    n = 0
    loads = orjson.loads
    for page in pages:
        for raw in client.mget(page):
            if raw is not None:
                try:
                    loads(raw)
                except orjson.JSONDecodeError:
                    pass
                n += 1
    return n, n / (time.perf_counter() - started)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


@click.command()
@click.option("--records", "-n", multiple=True, type=int, default=(100_000, 1_000_000),
              show_default=True, help="Sample assignments seeded for a run; repeat for several.")  # fmt: skip
def main(records: tuple[int, ...]) -> None:
    results, ceilings = {}, {}
    with LocalRedisServer() as server, tempfile.TemporaryDirectory() as tmp:
        client = redis.Redis(host="127.0.0.1", port=server.port)
        for n in records:
            client.flushall()
            print(f"Seeding {n:,} sample assignments...", file=sys.stderr)
            seed_redis(client, n, seed=42)
            results[n] = run_export(server.port, Path(tmp) / f"export_{n}")
            ceilings[n] = read_ceiling(client)
        client.close()
    startup = startup_seconds()

    print(f"\nExport benchmark ({os.cpu_count()} cores, Python {sys.version.split()[0]})")
    print(f"{'assignments':>12} {'exported':>10} {'export s':>9} {'records/s':>10} "
          f"{'ceiling/s':>10} {'share':>6} {'command s':>10} {'peak RSS MB':>12}")  # fmt: skip
    for n, r in results.items():
        _, ceiling = ceilings[n]
        print(f"{n:>12,} {r['records']:>10,} {r['export_s']:>9.2f} {r['rate']:>10,} "
              f"{ceiling:>10,.0f} {r['rate'] / ceiling:>6.0%} {r['wall_s']:>10.2f} "
              f"{r['peak_rss_mb']:>12.0f}")  # fmt: skip
    print("ceiling: MGET + orjson.loads of the same values from Python, same server, same run")
    print("peak RSS: the exporter and its Redis reader process, each one's peak, added")
    print(f"start-up (--help, best of 5): {startup:.3f} s")
    print()
    slowest = min(r["rate"] for r in results.values())
    print(f"records/s beyond start-up >= 120,000: {slowest:,} (slowest N) -> "
          f"{verdict(slowest >= 120_000)}")  # fmt: skip
    if 100_000 in results:
        wall = results[100_000]["wall_s"]
        print(f"100,000 records, whole command <= 3 s: {wall:.2f} s -> {verdict(wall <= 3)}")
    print(f"start-up <= 0.5 s: {startup:.3f} s -> {verdict(startup <= 0.5)}")
    peak = max(r["peak_rss_mb"] for r in results.values())
    print(f"peak RSS <= 200 MB at every N: {peak:.0f} MB -> {verdict(peak <= 200)}")


if __name__ == "__main__":
    main()
