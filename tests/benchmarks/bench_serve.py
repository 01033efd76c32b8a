"""Serving benchmark: `serve_predictions.py` answering HTTP and the tracker's queue.

    uv run task bench-serve
    uv run python tests/benchmarks/bench_serve.py [--model PATH] [--seconds 10]

Trains a small model on sample data (unless --model is given), installs it as version 1
of a throwaway model registry, starts a throwaway redis-server and the service as its
own process (rate limits off, every request distinct so no answer comes from the
cache), and measures, on this machine:

- the first answers after start: one HTTP request and one queue request, as soon as
  the service says it is up (the model is warmed up before it takes requests);
- HTTP single requests, one at a time on one keep-alive connection: p50/p99;
- HTTP chained requests of 500: predictions/s;
- 64 concurrent keep-alive clients for --seconds: requests/s and p99;
- the same load while version 2 is promoted in the middle: every request must get a
  200 and an answer, and answers must come from both versions;
- the queue: a burst of --burst requests in one LPUSH (all answered: requests/s, p99)
  and single requests one at a time (push -> result p50/p99).

Targets (issue 19, 2 cores): HTTP single p99 <= 25 ms; chained >= 5,000 predictions/s;
64 clients >= 1,000 requests/s with p99 <= 100 ms; the swap loses and fails nothing;
the queue as before (burst >= 1,000 requests/s with p99 <= 2 s, single p99 <= 50 ms).
The load generator runs on the same two cores as the service.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import click
import httpx
import numpy as np
import redis

from imt_ml.sample_data import write_export
from imt_ml.utils import LocalRedisServer, ModelRegistry, free_port

ROOT = Path(__file__).resolve().parents[2]
READER = ROOT / "src/imt_ml/tfrecord_reader.py"
KEEPER = ROOT / "src/imt_ml/keep_model_current.py"
SERVER = ROOT / "src/imt_ml/serve_predictions.py"
RESULT = "ml:track_predict:result:"
STATIONS = [("place-sstat", "CR-Worcester"), ("place-bbsta", "CR-Providence"),
            ("place-north", "CR-Lowell"), ("place-rugg", "CR-Franklin")]  # fmt: skip
BASE = dt.datetime(2024, 3, 4, 6, 0, tzinfo=dt.timezone(dt.timedelta(hours=-5)))


def request_doc(i: int) -> dict:
    """Request i: every one a different departure (so none is answered from the cache)."""
    station, route = STATIONS[i % len(STATIONS)]
    return {"station_id": station, "route_id": route, "direction_id": i % 2,
            "scheduled_time": (BASE + dt.timedelta(minutes=i)).isoformat(),
            "trip_id": f"CR-Weekday-Spring-24-{500 + i % 80}",
            "headsign": "Worcester - Worcester Ln"}  # fmt: skip


def queue_request(i: int, prefix: str) -> str:
    return json.dumps({"id": f"{prefix}-{i}", **request_doc(i)})


def train_small_model(tmp: Path) -> Path:
    write_export(tmp / "export", 20_000, seed=4, records_per_file=10_000)
    out = subprocess.run(
        [sys.executable, str(READER), str(tmp / "export"), "train", "--epochs", "3"],
        capture_output=True, text=True, check=True,
        env={**os.environ, "IMT_ML_OUTPUT_DIR": str(tmp / "output"), "IMT_ML_NO_PROGRESS": "1"},
    ).stdout  # fmt: skip
    return Path(out.strip().splitlines()[-1]) / "track_prediction_model_best.keras"


def promote(registry: Path, model: Path) -> None:
    subprocess.run([sys.executable, str(KEEPER), "-", "promote", "--registry", str(registry),
                    "--model", str(model)], check=True, capture_output=True)  # fmt: skip


class ResultWatcher:
    """Arrival times of queue result keys, from Redis keyspace notifications."""

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
                raise SystemExit(
                    f"{len(ids - self.arrived.keys())} results missing after {timeout} s"
                )
            message = self.pubsub.get_message(timeout=0.5)
            if message and message["data"] == b"set":
                self.arrived.setdefault(message["channel"][prefix:].decode(), time.perf_counter())


# ---------------------------------------------------------------------------
# A small keep-alive HTTP/1.1 load generator (asyncio streams; httpx is too slow to
# load a server from the same two cores).
# ---------------------------------------------------------------------------


async def one_client(port: int, start: int, step: int, until: float, out: dict) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    i = start
    try:
        while time.perf_counter() < until:
            body = json.dumps(request_doc(i)).encode()
            i += step
            began = time.perf_counter()
            writer.write(b"POST /predictions HTTP/1.1\r\nHost: bench\r\ncontent-type: "
                         b"application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
            status = (await reader.readline()).split(b" ", 2)[1]
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.partition(b":")
                if name.lower() == b"content-length":
                    length = int(value)
            payload = await reader.readexactly(length)
            out["latency"].append(time.perf_counter() - began)
            if status != b"200" or b'"success":true' not in payload:
                out["failures"].append(status + b" " + payload[:200])
            else:
                method = payload.split(b'"prediction_method":"', 1)[1].split(b'"', 1)[0]
                out["methods"][method.decode()] = out["methods"].get(method.decode(), 0) + 1
    except (ConnectionError, asyncio.IncompleteReadError) as exc:
        out["failures"].append(repr(exc).encode())
    finally:
        writer.close()


def load(port: int, clients: int, seconds: float, offset: int) -> dict:
    out: dict = {"latency": [], "failures": [], "methods": {}}

    async def run() -> None:
        until = time.perf_counter() + seconds
        await asyncio.gather(*(one_client(port, offset + c, clients, until, out)
                               for c in range(clients)))  # fmt: skip

    began = time.perf_counter()
    asyncio.run(run())
    out["seconds"] = time.perf_counter() - began
    return out


def ms(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1000 if values else float("nan")


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


@click.command()
@click.option("--model", "model_file", type=click.Path(exists=True, path_type=Path), default=None,
              help="A .keras model to serve (default: train a small one on sample data).")  # fmt: skip
@click.option("--seconds", default=10.0, show_default=True, help="Length of each load run.")
@click.option("--clients", default=64, show_default=True, help="Concurrent HTTP clients.")
@click.option("--burst", default=5000, show_default=True, help="Queue requests pushed at once.")
@click.option("--singles", default=300, show_default=True, help="Single requests (HTTP and queue).")
def main(model_file: Path | None, seconds: float, clients: int, burst: int, singles: int) -> None:
    with tempfile.TemporaryDirectory() as tmp_name, LocalRedisServer() as server:
        tmp = Path(tmp_name)
        if model_file is None:
            print("Training a small model on 20,000 sample records...", file=sys.stderr)
            model_file = train_small_model(tmp)
        registry = tmp / "registry"
        promote(registry, model_file)
        client = redis.Redis(host="127.0.0.1", port=server.port)
        watcher = ResultWatcher(client)
        port = free_port()
        log = open(tmp / "serve.log", "w")  # noqa: SIM115
        started = time.perf_counter()
        service = subprocess.Popen(
            [sys.executable, str(SERVER), "--model", str(registry), "--http-port", str(port),
             "--redis-host", "127.0.0.1", "--redis-port", str(server.port), "--no-rate-limit",
             "--min-confidence", "0", "--watch-interval", "0.5"],
            stdout=subprocess.DEVNULL, stderr=log, env={**os.environ, "IMT_ML_NO_PROGRESS": "1"},
        )  # fmt: skip
        http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
        try:
            # The first answers, as soon as it listens.
            while True:
                try:
                    http.get("/healthz")
                    break
                except httpx.TransportError:
                    time.sleep(0.01)
            up = time.perf_counter() - started
            t0 = time.perf_counter()
            first_http = http.post("/predictions", json=request_doc(10_000_000))
            first_http_ms = (time.perf_counter() - t0) * 1000
            assert first_http.status_code == 200, first_http.text
            t0 = time.perf_counter()
            client.lpush("ml:track_predict:requests", queue_request(10_000_001, "first"))
            watcher.wait({"first-10000001"}, timeout=60)
            first_queue_ms = (watcher.arrived["first-10000001"] - t0) * 1000

            # HTTP single requests, one at a time.
            single = []
            for i in range(singles):
                t0 = time.perf_counter()
                response = http.post("/predictions", json=request_doc(i))
                single.append(time.perf_counter() - t0)
                assert response.status_code == 200
            # Chained, 500 a call.
            chained_calls, chained_t0 = 20, time.perf_counter()
            for c in range(chained_calls):
                body = {"predictions": [request_doc(100_000 + c * 500 + j) for j in range(500)]}
                response = http.post("/chained-predictions", json=body)
                assert response.status_code == 200 and len(response.json()["results"]) == 500
            chained_rate = chained_calls * 500 / (time.perf_counter() - chained_t0)
            # Concurrent clients; then the same with a promotion in the middle.
            steady = load(port, clients, seconds, 1_000_000)
            # What `promote` does once it has checked the model: install, then flip `current`.
            vocab = model_file.with_name(model_file.name.replace("_best.keras", "_vocab.json"))
            promoter = threading.Timer(seconds / 4, ModelRegistry(registry).install,
                                       (model_file, vocab, {"note": "the benchmark's swap"}))  # fmt: skip
            promoter.start()
            swap = load(port, clients, seconds * 2, 3_000_000)
            promoter.join()
            version_after = http.get("/model").json()["version"]

            # The queue: a burst, then single requests.
            payloads = [queue_request(i, "burst") for i in range(burst)]
            pushed = time.perf_counter()
            client.lpush("ml:track_predict:requests", *payloads)
            ids = {f"burst-{i}" for i in range(burst)}
            watcher.wait(ids, timeout=300)
            burst_latency = [watcher.arrived[i] - pushed for i in ids]
            queue_single = []
            for i in range(singles):
                t0 = time.perf_counter()
                client.lpush("ml:track_predict:requests", queue_request(50_000 + i, "single"))
                watcher.wait({f"single-{50_000 + i}"}, timeout=30)
                queue_single.append(watcher.arrived[f"single-{50_000 + i}"] - t0)
        finally:
            service.send_signal(signal.SIGTERM)
            code = service.wait(timeout=60)
            log.close()
        service_log = (tmp / "serve.log").read_text()

    steady_rate = len(steady["latency"]) / steady["seconds"]
    burst_rate = burst / max(burst_latency)
    print(
        f"\nServing benchmark ({os.cpu_count()} cores): {model_file.name}, load generator on the same cores"
    )
    print(f"up (listening, model loaded and warmed) {up:.1f} s after start; first HTTP answer "
          f"{first_http_ms:.1f} ms, first queue answer {first_queue_ms:.1f} ms")  # fmt: skip
    print(
        f"HTTP single, one at a time ({singles}): p50 {ms(single, 50):.1f} ms, p99 {ms(single, 99):.1f} ms"
    )
    print(f"HTTP chained (20 x 500): {chained_rate:,.0f} predictions/s")
    print(f"HTTP {clients} clients for {steady['seconds']:.0f} s: {steady_rate:,.0f} requests/s, "
          f"p50 {ms(steady['latency'], 50):.1f} ms, p99 {ms(steady['latency'], 99):.1f} ms, "
          f"{len(steady['failures'])} failed")  # fmt: skip
    print(f"HTTP {clients} clients with a promotion in the middle: {len(swap['latency']):,} requests, "
          f"{len(swap['failures'])} failed, answered by {swap['methods']}; version after: {version_after}")  # fmt: skip
    print(f"queue burst of {burst:,}: {burst_rate:,.0f} requests/s, push -> result p99 "
          f"{ms(burst_latency, 99):.0f} ms")  # fmt: skip
    print(
        f"queue single ({singles}): p50 {ms(queue_single, 50):.1f} ms, p99 {ms(queue_single, 99):.1f} ms"
    )
    print(
        f"service exit code after SIGTERM: {code}; tracebacks in its log: {service_log.count('Traceback')}"
    )
    print()
    checks = [
        ("first answers <= 200 ms (the tracker's window)", f"{max(first_http_ms, first_queue_ms):.1f} ms",
         max(first_http_ms, first_queue_ms) <= 200),
        ("HTTP single p99 <= 25 ms", f"{ms(single, 99):.1f} ms", ms(single, 99) <= 25),
        ("HTTP chained >= 5,000 predictions/s", f"{chained_rate:,.0f}", chained_rate >= 5000),
        (f"HTTP {clients} clients >= 1,000 requests/s", f"{steady_rate:,.0f}", steady_rate >= 1000),
        (f"HTTP {clients} clients p99 <= 100 ms", f"{ms(steady['latency'], 99):.1f} ms",
         ms(steady["latency"], 99) <= 100),
        ("promotion under load: nothing failed, both versions answered",
         f"{len(swap['failures'])} failed, {len(swap['methods'])} versions",
         not swap["failures"] and not steady["failures"] and len(swap["methods"]) == 2),
        ("queue burst >= 1,000 requests/s", f"{burst_rate:,.0f}", burst_rate >= 1000),
        ("queue burst p99 <= 2 s", f"{ms(burst_latency, 99) / 1000:.2f} s", ms(burst_latency, 99) <= 2000),
        ("queue single p99 <= 50 ms", f"{ms(queue_single, 99):.1f} ms", ms(queue_single, 99) <= 50),
        ("SIGTERM exits 0", str(code), code == 0),
    ]  # fmt: skip
    for name, value, ok in checks:
        print(f"{name}: {value} -> {verdict(ok)}")
    sys.exit(0 if all(ok for *_, ok in checks) else 1)


if __name__ == "__main__":
    main()
