"""Serving: saved models loaded the way consumers load them, and `serve_predictions.py`
answering the tracker's queue on a real Redis (its HTTP API: tests/test_serve_http.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from imt_ml import tfrecord_reader as tr
from imt_ml.utils import LocalRedisServer, free_port

from conftest import REDIS_PASSWORD

REPO = Path(__file__).resolve().parents[1]
READER = REPO / "src/imt_ml/tfrecord_reader.py"
SERVER = REPO / "src/imt_ml/serve_predictions.py"
REQUESTS = "ml:track_predict:requests"
PROCESSING = "ml:track_predict:processing"
RESULT = "ml:track_predict:result:"


@pytest.fixture(scope="module")
def run_dir(serve_run_dir) -> Path:
    return serve_run_dir


@pytest.fixture(scope="module")
def model_file(run_dir) -> Path:
    return run_dir / "track_prediction_model_best.keras"


def tracker_request(request_id: str, station: str = "place-sstat", route: str = "CR-Worcester",
                    trip: str = "CR-Weekday-Spring-24-500", minute: int = 43,
                    direction: int = 0, **fields) -> dict:  # fmt: skip
    """A request exactly as the tracker LPUSHes it (`fields` override or add fields)."""
    return {
        "id": request_id,
        "station_id": station,
        "route_id": route,
        "direction_id": direction,
        "scheduled_time": f"2024-03-04T17:{minute:02d}:00-05:00",
        "trip_id": trip,
        "headsign": "Worcester - Worcester Ln",
        **fields,
    }


def mixed_requests(n: int) -> list[dict]:
    stations = [("place-sstat", "CR-Worcester"), ("place-bbsta", "CR-Providence"),
                ("place-north", "CR-Lowell"), ("place-rugg", "CR-Franklin")]  # fmt: skip
    return [
        tracker_request(
            f"req-{i}",
            *stations[i % 4],
            trip=f"CR-Weekday-Spring-24-{500 + i % 40}",
            minute=i % 60,
            direction=i % 2,
        )  # fmt: skip
        for i in range(n)
    ]


def run_python(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO)  # fmt: skip


# ---------------------------------------------------------------------------
# Loading as documented, in fresh processes
# ---------------------------------------------------------------------------

LOAD_AND_CALL = """
    import json, sys
    {imports}
    import keras
    import numpy as np

    model = keras.saving.load_model(sys.argv[1] if len(sys.argv) > 1 else {path!r}, compile=False)
    inputs = {{
        "station_id": np.array(["place-sstat", "place-north"], dtype=object),
        "route_id": np.array(["CR-Worcester", "CR-Lowell"], dtype=object),
        "trip_id": np.array(["CR-Weekday-Spring-24-500", "CR-Weekday-Spring-24-301"], dtype=object),
        "headsign": np.array(["Worcester - Worcester Ln", "Lowell - Lowell Ln"], dtype=object),
        "direction_id": np.array([0, 1]),
        "scheduled_timestamp": np.array([1709592180.0, 1709730300.0]),
    }}
    probabilities = np.asarray(model(inputs))
    print(json.dumps({{"labels": model.get_layer("track_probabilities").labels,
                      "probabilities": probabilities.tolist()}}))
"""


@pytest.mark.parametrize("kind", ["best", "final"])
def test_keras_files_load_after_importing_only_the_package(run_dir, kind):
    path = run_dir / f"track_prediction_model_{kind}.keras"
    proc = run_python(LOAD_AND_CALL.format(imports="import imt_ml", path=str(path)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    answer = json.loads(proc.stdout.strip().splitlines()[-1])
    probabilities = np.array(answer["probabilities"])
    assert answer["labels"][:3] == ["1", "2", "3"]
    assert probabilities.shape == (2, len(answer["labels"]))
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    # North Station has no track 11+: the model keeps them at zero there.
    assert probabilities[1, answer["labels"].index("13")] < 1e-6


def test_without_the_package_keras_cannot_find_the_layers(model_file):
    """The control for the test above: the registration is what makes it work."""
    proc = run_python(LOAD_AND_CALL.format(imports="", path=str(model_file)))
    assert proc.returncode != 0
    assert "Could not locate class" in proc.stderr


def test_saved_model_serves_labels_where_imt_ml_cannot_be_imported(run_dir, model_file):
    serving = run_dir / "track_prediction_model_serving"
    assert (serving / "saved_model.pb").is_file()
    code = f"""
        import json, sys
        sys.modules["imt_ml"] = None  # any import of imt_ml now fails
        try:
            import imt_ml
        except ImportError:
            pass
        else:
            raise SystemExit("imt_ml was importable")
        import tensorflow as tf

        served = tf.saved_model.load({str(serving)!r})
        out = served.signatures["serve"](
            station_id=tf.constant(["place-sstat", "place-north"]),
            route_id=tf.constant(["CR-Worcester", "CR-Lowell"]),
            trip_id=tf.constant(["CR-Weekday-Spring-24-500", "CR-Weekday-Spring-24-301"]),
            headsign=tf.constant(["Worcester - Worcester Ln", "Lowell - Lowell Ln"]),
            direction_id=tf.constant([0, 1], tf.int64),
            scheduled_timestamp=tf.constant([1709592180.0, 1709730300.0], tf.float64),
        )
        print(json.dumps({{"tracks": [[t.decode() for t in row] for row in out["tracks"].numpy()],
                          "probabilities": out["probabilities"].numpy().tolist()}}))
    """
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    served = json.loads(proc.stdout.strip().splitlines()[-1])

    predictor = tr.load_predictor(model_file)
    expected = predictor.predict([
        tracker_request("a"),
        tracker_request("b", "place-north", "CR-Lowell", "CR-Weekday-Spring-24-301", 5, 1)
        | {"scheduled_time": "2024-03-06T08:05:00-05:00", "headsign": "Lowell - Lowell Ln"},
    ])  # fmt: skip
    for tracks, probabilities, answer in zip(
        served["tracks"], served["probabilities"], expected, strict=True
    ):
        assert probabilities == sorted(probabilities, reverse=True)
        assert tracks[0] == answer[0][0]
        by_track = dict(zip(tracks, probabilities, strict=True))
        for track, p in answer:
            assert by_track[track] == pytest.approx(p, abs=1e-5)


#: The same two departures (Monday 17:43 at South Station, Wednesday 20:05 at North Station,
#: both Boston time), written with three offsets: the tracker's UTC, Boston's, and another.
SAME_INSTANTS = {
    "utc": ["2024-03-04T22:43:00Z", "2024-03-07T01:05:00Z"],
    "boston": ["2024-03-04T17:43:00-05:00", "2024-03-06T20:05:00-05:00"],
    "no_offset": ["2024-03-04T17:43:00", "2024-03-06T20:05:00"],  # read as Boston time
    "tokyo": ["2024-03-05T07:43:00+09:00", "2024-03-07T10:05:00+09:00"],
}


def clock_requests(times: list[str]) -> list[dict]:
    """Requests for SAME_INSTANTS, with the clock fields a UTC writer would add (ignored)."""
    return [
        tracker_request("a", scheduled_time=times[0], hour=22, day_of_week=0),
        tracker_request("b", "place-north", "CR-Lowell", "CR-Weekday-Spring-24-301", direction=1,
                        scheduled_time=times[1], hour=1, day_of_week=3,
                        headsign="Lowell - Lowell Ln"),
    ]  # fmt: skip


def test_the_same_instant_in_any_offset_gets_the_same_answer_everywhere(run_dir, model_file,
                                                                       tmp_path):  # fmt: skip
    """Through `predict` (a subprocess), the .keras file and the SavedModel (fresh
    processes): the same departures asked in UTC, Boston time, without an offset and in
    Tokyo time get identical probabilities, to the last digit."""
    # Every written form through one `predict` process, in turn.
    requests = [clock_requests(times) for times in SAME_INSTANTS.values()]
    lines = "".join(json.dumps(r) + "\n" for group in requests for r in group)
    proc = subprocess.run(
        [sys.executable, str(READER), "-", "predict", "--model", str(model_file)],
        input=lines, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = [json.loads(line) for line in proc.stdout.splitlines()]
    per = len(requests[0])
    assert len(out) == per * len(SAME_INSTANTS)
    answers = {name: out[i * per : (i + 1) * per] for i, name in enumerate(SAME_INSTANTS)}
    assert all(a == answers["utc"] for a in answers.values()), answers

    # The instants as Unix seconds, from each written form, through the saved model files.
    import datetime as dt
    from zoneinfo import ZoneInfo

    def seconds(text: str) -> float:
        when = dt.datetime.fromisoformat(text)
        return (
            when if when.tzinfo else when.replace(tzinfo=ZoneInfo("America/New_York"))
        ).timestamp()

    stamps = {name: [seconds(t) for t in times] for name, times in SAME_INSTANTS.items()}
    assert all(v == stamps["utc"] for v in stamps.values())
    code = LOAD_AND_CALL.format(imports="import imt_ml", path=str(model_file)).replace(
        "[1709592180.0, 1709730300.0]", repr(stamps["utc"])
    )
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    keras_probs = json.loads(proc.stdout.strip().splitlines()[-1])["probabilities"]
    for row, answer in zip(keras_probs, answers["utc"], strict=True):
        top = answer["predictions"][0]
        assert max(row) == pytest.approx(top["probability"], abs=1e-6)


def test_readme_loading_examples_run_as_written(run_dir, tmp_path):
    """The README's Keras and SavedModel snippets, each in a fresh process."""
    import re

    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    keras_block = next(b for b in blocks if "keras.saving.load_model" in b)
    saved_block = next(b for b in blocks if "tf.saved_model.load" in b)
    for block, check in (
        (keras_block, "print(labels, np.asarray(probabilities).sum())"),
        (saved_block, "print(out['tracks'][0, 0].numpy(), float(out['probabilities'][0, 0]))"),
    ):
        script = block.replace("output/train_...", str(run_dir)) + check + "\n"
        path = tmp_path / "example.py"
        path.write_text(script)
        proc = subprocess.run([sys.executable, str(path)], capture_output=True, text=True,
                              timeout=120, cwd=tmp_path)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.strip(), proc.stderr[-2000:]


# ---------------------------------------------------------------------------
# The queue, on a real Redis
# ---------------------------------------------------------------------------


class Worker:
    """`serve_predictions.py --no-http` as its own process, its log in a file."""

    def __init__(self, model: Path, port: int, tmp_path: Path, *extra: str) -> None:
        self.log_path = tmp_path / f"serve_{time.monotonic_ns()}.log"
        self.log_file = open(self.log_path, "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, str(SERVER), "--model", str(model), "--no-http",
             "--redis-host", "127.0.0.1", "--redis-port", str(port), "--log-interval", "0.5",
             *extra],
            stdout=subprocess.PIPE, stderr=self.log_file, text=True,
            env={**os.environ, "IMT_ML_NO_PROGRESS": "1"},
        )  # fmt: skip

    @property
    def log(self) -> str:
        return self.log_path.read_text()

    def wait_for_log(self, text: str, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log:
            assert self.proc.poll() is None, f"worker exited early:\n{self.log}"
            assert time.monotonic() < deadline, f"no {text!r} in the log:\n{self.log}"
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self.log_file.close()
        return code


@pytest.fixture
def workers(model_file, tmp_path):
    """Start workers with `workers(port, *flags)`; every one is stopped at the end."""
    started: list[Worker] = []

    def start(port: int, *extra: str) -> Worker:
        worker = Worker(model_file, port, tmp_path, *extra)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        if worker.proc.poll() is None:
            worker.stop(signal.SIGKILL)


def wait_for_results(client, ids: list[str], timeout: float = 60) -> dict[str, dict]:
    deadline = time.monotonic() + timeout
    while True:
        values = client.mget([RESULT + i for i in ids])
        if all(v is not None for v in values):
            return {i: json.loads(v) for i, v in zip(ids, values, strict=True)}
        missing = [i for i, v in zip(ids, values, strict=True) if v is None]
        assert time.monotonic() < deadline, f"no result for {missing[:5]} ({len(missing)} missing)"
        time.sleep(0.05)


def test_serve_answers_the_trackers_requests_as_predict_does(redis_client, redis_server,
                                                            workers, model_file):  # fmt: skip
    requests = mixed_requests(40)
    redis_client.lpush(REQUESTS, *[json.dumps(r) for r in requests])
    malformed = [
        b"{not json",
        b"[1, 2, 3]",
        json.dumps({k: v for k, v in tracker_request("x").items() if k != "id"}).encode(),
        json.dumps(tracker_request("bad-time") | {"scheduled_time": "tomorrow"}).encode(),
        json.dumps(tracker_request("no-station") | {"station_id": None}).encode(),
    ]
    redis_client.lpush(REQUESTS, *malformed)
    worker = workers(redis_server.port, "--min-confidence", "0")
    answers = wait_for_results(redis_client, [r["id"] for r in requests])

    # After the malformed ones, the worker still answers.
    redis_client.lpush(REQUESTS, json.dumps(tracker_request("after")))
    after = wait_for_results(redis_client, ["after"])["after"]
    errors = wait_for_results(redis_client, ["bad-time", "no-station"])
    assert "scheduled_time" in errors["bad-time"]["error"]
    assert "station_id" in errors["no-station"]["error"]
    assert redis_client.llen(PROCESSING) == 0 and redis_client.llen(REQUESTS) == 0

    # The same records through `predict`.
    lines = "\n".join(json.dumps(r) for r in [*requests, tracker_request("after")])
    result = CliRunner().invoke(tr.cli, ["-", "predict", "--model", str(model_file)], input=lines)
    assert result.exit_code == 0, result.output
    predicted = [json.loads(line)["predictions"] for line in result.stdout.splitlines()]
    for request, expected in zip([*requests, tracker_request("after")], predicted, strict=True):
        answer = answers.get(request["id"], after)
        assert set(answer) == {
            "id", "station_id", "route_id", "direction_id", "scheduled_time", "track_number",
            "predicted_track_index", "confidence", "model_confidence", "probabilities",
            "created_at",
        }  # fmt: skip
        assert answer["id"] == request["id"]
        for key in ("station_id", "route_id", "direction_id", "scheduled_time"):
            assert answer[key] == request[key]
        assert answer["track_number"] == expected[0]["track"]
        assert answer["predicted_track_index"] == int(answer["track_number"]) - 1
        probabilities = answer["probabilities"]  # index i is track i + 1
        assert sum(probabilities) == pytest.approx(1.0, abs=1e-4)
        assert answer["confidence"] == pytest.approx(probabilities[answer["predicted_track_index"]])
        for p in expected:
            assert probabilities[int(p["track"]) - 1] == pytest.approx(p["probability"], abs=1e-5)

    first = requests[0]
    latest = (f"ml:track_predict:latest:{first['station_id']}:{first['route_id']}:"
              f"{first['direction_id']}:{int(tr.features_from_assignment(first)['scheduled_timestamp'])}")  # fmt: skip
    assert json.loads(redis_client.get(latest)) == answers[first["id"]]
    assert 86_000 < redis_client.ttl(RESULT + first["id"]) <= 86_400
    assert 86_000 < redis_client.ttl(latest) <= 86_400

    assert worker.stop(signal.SIGTERM) == 0
    log = worker.log
    assert "dropped a request without a usable id" in log
    assert "queue stopped: answered 46 requests (5 with an error" in log
    assert "Traceback" not in log


def test_requests_in_flight_when_the_worker_is_killed_are_answered_after_restart(
    redis_client, redis_server, workers
):
    requests = mixed_requests(600)
    ids = [r["id"] for r in requests]
    redis_client.lpush(REQUESTS, *[json.dumps(r) for r in requests])
    worker = workers(redis_server.port, "--max-batch", "32", "--min-confidence", "0")
    deadline = time.monotonic() + 90
    while not redis_client.exists(RESULT + ids[0]):
        assert time.monotonic() < deadline and worker.proc.poll() is None, worker.log
        time.sleep(0.01)
    worker.stop(signal.SIGKILL)
    # Whatever the kill interrupted, plus one request a dead worker had certainly
    # taken and not answered: moved to the processing list by hand.
    in_flight = tracker_request("in-flight")
    redis_client.lpush(PROCESSING, json.dumps(in_flight))
    unanswered = sum(v is None for v in redis_client.mget([RESULT + i for i in ids]))

    restarted = workers(redis_server.port, "--min-confidence", "0")
    answers = wait_for_results(redis_client, [*ids, "in-flight"])
    assert len(answers) == 601 and unanswered > 0
    assert "requeued" in restarted.log
    assert redis_client.llen(PROCESSING) == 0
    assert restarted.stop() == 0


def test_the_worker_reconnects_after_a_redis_restart(workers, tmp_path):
    import redis

    server = LocalRedisServer().start()
    try:
        client = redis.Redis(host="127.0.0.1", port=server.port)
        worker = workers(server.port, "--min-confidence", "0")
        client.lpush(REQUESTS, json.dumps(tracker_request("before")))
        wait_for_results(client, ["before"])

        port = server.port
        server.stop()
        worker.wait_for_log("lost Redis")
        time.sleep(1.0)
        server = LocalRedisServer()
        server.port = port
        server.start()
        client = redis.Redis(host="127.0.0.1", port=port)
        client.lpush(REQUESTS, json.dumps(tracker_request("after")))
        wait_for_results(client, ["after"], timeout=60)
        assert "reconnected" in worker.log
        assert worker.stop() == 0
    finally:
        server.stop()


def test_bad_credentials_or_no_redis_at_start_are_one_line(password_redis_server, model_file,
                                                          clean_env):  # fmt: skip
    for args in (
        ["--redis-port", str(password_redis_server.port), "--redis-password", "not-the-password"],
        ["--redis-port", str(free_port())],
    ):
        proc = subprocess.run(
            [sys.executable, str(SERVER), "--model", str(model_file),
             "--redis-host", "127.0.0.1", *args],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert proc.returncode == 1, proc.stderr
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("Error: ") and ("refused" in last or "cannot reach" in last)
        assert "Traceback" not in proc.stderr
        assert "not-the-password" not in proc.stderr and REDIS_PASSWORD not in proc.stderr


def test_serve_answers_the_same_instant_identically_in_any_offset(redis_client, redis_server,
                                                                  workers):  # fmt: skip
    """The tracker's queue sends UTC times; clients with the MBTA API's Boston times, or none."""
    asked = {}
    for name, times in SAME_INSTANTS.items():
        for request in clock_requests(times):
            request["id"] = f"{name}-{request['id']}"
            asked[request["id"]] = request
    redis_client.lpush(REQUESTS, *[json.dumps(r) for r in asked.values()])
    worker = workers(redis_server.port, "--min-confidence", "0")
    answers = wait_for_results(redis_client, list(asked))
    for name in SAME_INSTANTS:
        for key in ("a", "b"):
            mine, utc = answers[f"{name}-{key}"], answers[f"utc-{key}"]
            assert mine["probabilities"] == utc["probabilities"], name
            assert mine["confidence"] == utc["confidence"]
    assert worker.stop(signal.SIGTERM) == 0


def test_the_queue_speaks_the_trackers_last_ml_version(redis_client, redis_server, workers):
    """Child stop ids, times without an offset, the track_prediction record the tracker's own
    worker wrote (and the negative_ key it deleted), and answers below --min-confidence."""
    suffix = "place-sstat:CR-Worcester:CR-Weekday-Spring-24-500:2024-03-04"  # the UTC date
    other = "place-north:CR-Lowell:CR-Weekday-Spring-24-301:2024-03-04"
    redis_client.set(f"negative_track_prediction:{suffix}", "1")
    redis_client.set(f"track_prediction:{suffix}", json.dumps({"confidence_score": 0.0}))
    redis_client.set(f"track_prediction:{other}", json.dumps({"confidence_score": 0.99}))
    redis_client.set(f"negative_track_prediction:{other}", "1")
    child = tracker_request("child", station="NEC-2287-03", scheduled_time="2024-03-04T17:43:00")
    parent = tracker_request("parent")  # the same instant, -05:00, at the parent id
    north = tracker_request("north", "BNT-0000", "CR-Lowell", "CR-Weekday-Spring-24-301",
                            scheduled_time="2024-03-04T19:10:00Z", headsign="Lowell - Lowell Ln")  # fmt: skip
    redis_client.lpush(REQUESTS, *[json.dumps(r) for r in (child, parent, north)])
    worker = workers(redis_server.port, "--min-confidence", "0")
    answers = wait_for_results(redis_client, ["child", "parent", "north"])
    assert answers["child"]["station_id"] == "place-sstat"
    assert answers["child"]["probabilities"] == answers["parent"]["probabilities"]
    timestamp = int(tr.features_from_assignment(parent)["scheduled_timestamp"])
    assert redis_client.exists(f"ml:track_predict:latest:place-sstat:CR-Worcester:0:{timestamp}")
    assert not redis_client.keys("ml:track_predict:latest:NEC-2287*")

    written = json.loads(redis_client.get(f"track_prediction:{suffix}"))
    assert written["prediction_method"] == "ml_ensemble"
    assert written["track_number"] == answers["parent"]["track_number"]
    assert written["confidence_score"] == pytest.approx(answers["parent"]["confidence"])
    assert {"model_confidence", "display_confidence", "accuracy", "historical_matches",
            "created_at", "headsign", "trip_id"} <= set(written)  # fmt: skip
    assert 60 * 86_400 - 100 < redis_client.ttl(f"track_prediction:{suffix}") <= 60 * 86_400
    assert not redis_client.exists(f"negative_track_prediction:{suffix}")
    # The tracker replaced a confident old answer only with one >= 0.5 or 0.05 better.
    confidence = answers["north"]["confidence"]
    replaced = confidence >= 0.5 or confidence > 0.99 + 0.05
    stored = json.loads(redis_client.get(f"track_prediction:{other}"))
    assert (stored.get("prediction_method") == "ml_ensemble") == replaced
    assert bool(redis_client.exists(f"negative_track_prediction:{other}")) == (not replaced)
    assert worker.stop() == 0

    # Below --min-confidence nothing is written, as the tracker's worker did; the request
    # still leaves the processing list.
    redis_client.lpush(REQUESTS, json.dumps(tracker_request("timid", minute=7)))
    strict = workers(redis_server.port, "--min-confidence", "1.0")
    deadline = time.monotonic() + 60
    while redis_client.llen(REQUESTS) or redis_client.llen(PROCESSING):
        assert time.monotonic() < deadline, strict.log
        time.sleep(0.05)
    assert strict.stop() == 0
    assert redis_client.get(RESULT + "timid") is None
    assert "1 below --min-confidence" in strict.log
