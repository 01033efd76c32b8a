"""Recorder benchmark: how many prediction events a second `record_track_data.py` handles
from a stream, and its peak memory.

A stand-in MBTA V3 API (tests/mbta_standin.py) on 127.0.0.1 streams a burst of
`--events` prediction updates about `--departures` departures at the four stations
(tracks appearing, repeated, now and then changing), ending with one sentinel
departure. The recorder runs as its own process, streaming into a local
redis-server, exactly as a user starts it. The clock runs from the first byte of
the burst until the sentinel's record is in Redis, so it covers parsing, the
record logic and the Redis writes; the peak RSS is the recorder process's VmHWM.

    uv run task bench-record
    uv run python tests/benchmarks/bench_record.py --events 200000 --departures 3000

Targets (issue 18): >= 5,000 events/s on 2 cores; peak RSS <= 100 MB.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "src"))

from imt_ml.utils import LocalRedisServer  # noqa: E402
from mbta_standin import STATIONS, StandInMbta, sse  # noqa: E402

TARGET_EVENTS_PER_SECOND = 5_000
TARGET_RSS_MB = 100
ROUTES = {"place-sstat": ["CR-Worcester", "CR-Providence", "CR-Franklin", "CR-Needham"],
          "place-north": ["CR-Lowell", "CR-Haverhill", "CR-Fitchburg", "CR-Newburyport"],
          "place-bbsta": ["CR-Worcester", "CR-Providence"], "place-rugg": ["CR-Providence"]}  # fmt: skip


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--departures", type=int, default=2_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    start = dt.datetime.now(dt.UTC).replace(second=0, microsecond=0) + dt.timedelta(minutes=30)

    with LocalRedisServer() as redis_server, StandInMbta(keepalive=1.0) as api:
        # The world: departures with no track yet (the reset); then a burst of updates.
        departures = []
        for i in range(args.departures):
            station = rng.choice(list(STATIONS))
            route = rng.choice(ROUTES[station])
            _, generic, tracks = STATIONS[station]
            trip = f"CR-Bench-{i}-{100 + i}"
            when = start + dt.timedelta(minutes=rng.randrange(0, 20 * 60))
            departures.append((trip, route, generic or tracks[0][0], tracks, when))
            api.set_prediction(api.prediction(trip, generic or tracks[0][0], route, when),
                               headsign="Somewhere", publish=False)  # fmt: skip
        home = {trip: rng.choice(tracks)[0] for trip, _, _, tracks, _ in departures}
        chunks, chunk, first_track = [], [], set()
        for _ in range(args.events - 1):
            trip, route, _generic, tracks, when = rng.choice(departures)
            if rng.random() < 0.02:  # a change of track before departure
                home[trip] = rng.choice(tracks)[0]
            first_track.add(trip)
            chunk.append(sse("update", api.prediction(trip, home[trip], route, when)))
            if len(chunk) == 5_000:
                chunks.append(b"".join(chunk))
                chunk = []
        sentinel_trip = "CR-Bench-sentinel-999"
        chunk.append(sse("add", api.trip(sentinel_trip, "Sentinel")))
        chunk.append(
            sse("add", api.prediction(sentinel_trip, "NEC-2287-01", "CR-Worcester", start))
        )
        chunks.append(b"".join(chunk))
        sentinel_key = (f"track_history:place-sstat:CR-Worcester:{sentinel_trip}:"
                        f"{start.date().isoformat()}")  # fmt: skip

        env = dict(
            os.environ, IMT_REDIS_ENDPOINT="127.0.0.1", IMT_REDIS_PORT=str(redis_server.port)
        )
        env.pop("IMT_MBTA_API_KEY", None)
        with tempfile.TemporaryFile("w+") as log:
            recorder = subprocess.Popen(
                [sys.executable, str(ROOT / "src/imt_ml/record_track_data.py"),
                 "--api-url", api.url, "--log-interval", "5"],
                env=env, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
            try:
                import redis

                client = redis.Redis(port=redis_server.port)
                api.wait_for_streams(1, timeout=60)
                time.sleep(1.0)  # let it read the reset
                began = time.perf_counter()
                for data in chunks:
                    api.publish(data)
                while not client.exists(sentinel_key):
                    if recorder.poll() is not None:
                        raise RuntimeError("the recorder exited during the burst")
                    if time.perf_counter() - began > 600:
                        raise TimeoutError("the sentinel record never arrived")
                    time.sleep(0.005)
                seconds = time.perf_counter() - began
                rss = peak_rss_mb(recorder.pid)
                records = sum(1 for _ in client.scan_iter("track_history:*", count=1000))
            finally:
                recorder.send_signal(signal.SIGTERM)
                code = recorder.wait(timeout=60)
            log.seek(0)
            output = log.read()

    rate = args.events / seconds
    print(output.strip().splitlines()[-1])
    print(f"recorder exit code after SIGTERM: {code}")
    print(
        f"events: {args.events:,} prediction events about {args.departures:,} departures; "
        f"records in Redis: {records:,} (departures given a track: {len(first_track) + 1:,})"
    )
    print(
        f"handled: {rate:,.0f} events/s ({seconds:.2f} s, first byte to the last record)  "
        f"{'PASS' if rate >= TARGET_EVENTS_PER_SECOND else 'FAIL'} (>= {TARGET_EVENTS_PER_SECOND:,}/s)"
    )
    print(
        f"peak RSS: {rss:.1f} MB  {'PASS' if rss <= TARGET_RSS_MB else 'FAIL'} (<= {TARGET_RSS_MB} MB)"
    )
    ok = rate >= TARGET_EVENTS_PER_SECOND and rss <= TARGET_RSS_MB and code == 0
    ok = ok and records == len(first_track) + 1
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
