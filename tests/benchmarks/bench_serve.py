"""Serving benchmark: `serve` answering the tracker's queue on a local Redis.

    uv run python tests/benchmarks/bench_serve.py [--burst 5000 --singles 300 --model PATH]

Trains a small model on sample data (unless --model is given), starts a throwaway
redis-server and `tfrecord_reader.py - serve` as its own process, then:

- burst: pushes N requests in the tracker's JSON at once (one LPUSH) and records
  when each result key appears (keyspace notifications, seen by this process);
- singles: pushes one request at a time, waiting for its result before the next.

Latency is from the push to the moment this process sees the result written.
Targets on the 2-core dev machine: burst >= 1,000 requests/s end to end with p99
<= 2 s; single requests p99 <= 50 ms.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np
import redis

from imt_ml.sample_data import write_export
from imt_ml.utils import LocalRedisServer

READER = Path(__file__).resolve().parents[2] / "src/imt_ml/tfrecord_reader.py"
RESULT = "ml:track_predict:result:"
STATIONS = [("place-sstat", "CR-Worcester"), ("place-bbsta", "CR-Providence"),
            ("place-north", "CR-Lowell"), ("place-rugg", "CR-Franklin")]  # fmt: skip


def request(i: int, prefix: str) -> str:
    station, route = STATIONS[i % len(STATIONS)]
    return json.dumps({
        "id": f"{prefix}-{i}", "station_id": station, "route_id": route,
        "direction_id": i % 2, "scheduled_time": f"2024-03-04T{6 + i % 16:02d}:{i % 60:02d}:00-05:00",
        "trip_id": f"CR-Weekday-Spring-24-{500 + i % 80}", "headsign": "Worcester - Worcester Ln",
    })  # fmt: skip


def train_small_model(tmp: Path) -> Path:
    write_export(tmp / "export", 20_000, seed=4, records_per_file=10_000)
    out = subprocess.run(
        [sys.executable, str(READER), str(tmp / "export"), "train", "--epochs", "3"],
        capture_output=True, text=True, check=True,
        env={**os.environ, "IMT_ML_OUTPUT_DIR": str(tmp / "output"), "IMT_ML_NO_PROGRESS": "1"},
    ).stdout  # fmt: skip
    return Path(out.strip().splitlines()[-1]) / "track_prediction_model_best.keras"


class ResultWatcher:
    """Arrival times of result keys, from Redis keyspace notifications."""

    def __init__(self, client: redis.Redis) -> None:
        client.config_set("notify-keyspace-events", "K$")
        self.pubsub = client.pubsub(ignore_subscribe_messages=True)
        self.pubsub.psubscribe(f"__keyspace@0__:{RESULT}*")
        self.arrived: dict[str, float] = {}

    def wait(self, ids: set[str], timeout: float) -> None:
        prefix = len(f"__keyspace@0__:{RESULT}")
        deadline = time.monotonic() + timeout
        while not ids <= self.arrived.keys():
            if time.monotonic() > deadline:
                missing = len(ids - self.arrived.keys())
                raise SystemExit(f"{missing} results missing after {timeout} s")
            message = self.pubsub.get_message(timeout=0.5)
            if message and message["data"] == b"set":
                self.arrived.setdefault(message["channel"][prefix:].decode(), time.perf_counter())


def percentile_ms(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1000


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


@click.command()
@click.option("--burst", default=5000, show_default=True, help="Requests pushed at once.")
@click.option("--singles", default=300, show_default=True, help="Requests pushed one at a time.")
@click.option("--model", "model_file", type=click.Path(exists=True, path_type=Path), default=None,
              help="A .keras model to serve (default: train a small one on sample data).")  # fmt: skip
def main(burst: int, singles: int, model_file: Path | None) -> None:
    with tempfile.TemporaryDirectory() as tmp, LocalRedisServer() as server:
        if model_file is None:
            print("Training a small model on 20,000 sample records...", file=sys.stderr)
            model_file = train_small_model(Path(tmp))
        client = redis.Redis(host="127.0.0.1", port=server.port)
        watcher = ResultWatcher(client)
        log = open(Path(tmp) / "serve.log", "w")  # noqa: SIM115
        worker = subprocess.Popen(
            [sys.executable, str(READER), "-", "serve", "--model", str(model_file),
             "--redis-host", "127.0.0.1", "--redis-port", str(server.port)],
            stdout=subprocess.DEVNULL, stderr=log, env={**os.environ, "IMT_ML_NO_PROGRESS": "1"},
        )  # fmt: skip
        try:
            # Warm up (model load, first trace), then the burst.
            client.lpush("ml:track_predict:requests", request(0, "warm"))
            watcher.wait({"warm-0"}, timeout=120)
            payloads = [request(i, "burst") for i in range(burst)]
            pushed = time.perf_counter()
            client.lpush("ml:track_predict:requests", *payloads)
            ids = {f"burst-{i}" for i in range(burst)}
            watcher.wait(ids, timeout=120)
            burst_latency = [watcher.arrived[i] - pushed for i in ids]
            burst_seconds = max(burst_latency)

            single_latency = []
            for i in range(singles):
                started = time.perf_counter()
                client.lpush("ml:track_predict:requests", request(i, "single"))
                watcher.wait({f"single-{i}"}, timeout=30)
                single_latency.append(watcher.arrived[f"single-{i}"] - started)
        finally:
            worker.send_signal(signal.SIGTERM)
            code = worker.wait(timeout=60)
            log.close()
        sample = json.loads(client.get(f"{RESULT}burst-0"))

    rate = burst / burst_seconds
    p50, p99 = percentile_ms(burst_latency, 50), percentile_ms(burst_latency, 99)
    s50, s99 = percentile_ms(single_latency, 50), percentile_ms(single_latency, 99)
    print(f"\nServing benchmark ({os.cpu_count()} cores): {model_file.name}")
    print(f"burst of {burst:,}: all answered in {burst_seconds:.2f} s = {rate:,.0f} requests/s; "
          f"push -> result p50 {p50:.0f} ms, p99 {p99:.0f} ms")  # fmt: skip
    print(f"{singles} single requests one at a time: push -> result p50 {s50:.1f} ms, "
          f"p99 {s99:.1f} ms")  # fmt: skip
    print(f"worker exit code after SIGTERM: {code}; a result: track {sample['track_number']} "
          f"at {sample['confidence']:.3f}")  # fmt: skip
    print()
    print(f"burst >= 1,000 requests/s: {rate:,.0f} -> {verdict(rate >= 1000)}")
    print(f"burst p99 <= 2 s: {p99 / 1000:.2f} s -> {verdict(p99 <= 2000)}")
    print(f"single p99 <= 50 ms: {s99:.1f} ms -> {verdict(s99 <= 50)}")


if __name__ == "__main__":
    main()
