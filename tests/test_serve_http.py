"""The prediction service's HTTP API as its clients meet it: `serve_predictions.py` as its own
process serving a model registry, over real HTTP, with a real Redis and a stand-in MBTA V3
API for the schedules; plus the tracker author's own client, mbta-mcp."""

from __future__ import annotations

import datetime as dt
import json
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from zoneinfo import ZoneInfo

import httpx
import pytest

from imt_ml.utils import LocalRedisServer, ModelRegistry, free_port
from mbta_standin import StandInMbta

REPO = Path(__file__).resolve().parents[1]
SERVER = REPO / "src/imt_ml/serve_predictions.py"
READER = REPO / "src/imt_ml/tfrecord_reader.py"
KEEPER = REPO / "src/imt_ml/keep_model_current.py"
BOSTON = ZoneInfo("America/New_York")
UNAVAILABLE = "Predictions are not available for this station"
PREDICTION_FIELDS = {
    "station_id", "route_id", "trip_id", "headsign", "direction_id", "scheduled_time",
    "track_number", "confidence_score", "accuracy", "model_confidence", "display_confidence",
    "prediction_method", "historical_matches", "created_at",
}  # fmt: skip


def request(trip: str = "CR-Weekday-Spring-24-500", station: str = "place-sstat",
            route: str = "CR-Worcester", when: str = "2024-03-04T17:43:00-05:00",
            direction: int = 0, headsign: str = "Worcester - Worcester Ln") -> dict:  # fmt: skip
    return {"station_id": station, "route_id": route, "trip_id": trip, "headsign": headsign,
            "direction_id": direction, "scheduled_time": when}  # fmt: skip


class Service:
    """The running service: its URL, Redis, registry and log."""

    def __init__(self, root: Path, model: Path, redis_port: int, api: StandInMbta) -> None:
        self.registry = root / "registry"
        promoted = subprocess.run([sys.executable, str(KEEPER), "-", "promote", "--registry",
                                   str(self.registry), "--model", str(model)],
                                  capture_output=True, text=True, timeout=180)  # fmt: skip
        assert promoted.returncode == 0, promoted.stderr
        assert promoted.stdout.strip() == str(self.registry / "versions" / "1")
        self.model = model
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = root / "serve.log"
        self.log_file = open(self.log_path, "w")  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, str(SERVER), "--model", str(self.registry), "--http-port", str(self.port),
             "--redis-host", "127.0.0.1", "--redis-port", str(redis_port), "--api-url", api.url,
             "--score-interval", "0.3", "--watch-interval", "0.2", "--log-interval", "1",
             "--rate-limits", "predictions=100000,chained=100000,stats=5,historical=100000,date=100000",
             "--cors-origins", "http://displays.example", "--max-body-bytes", "200000"],
            stdout=subprocess.DEVNULL, stderr=self.log_file)  # fmt: skip
        self.http = httpx.Client(base_url=self.url, timeout=30)
        deadline = time.monotonic() + 120
        while True:
            assert self.process.poll() is None, self.log
            try:
                if self.http.get("/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, self.log
            time.sleep(0.2)

    @property
    def log(self) -> str:
        return self.log_path.read_text()

    def predict(self, body: dict) -> dict:
        response = self.http.post("/predictions", json=body)
        assert response.status_code == 200, response.text
        return response.json()


@pytest.fixture(scope="module")
def api():
    with StandInMbta() as server:
        yield server


@pytest.fixture(scope="module")
def redis_server_http():
    with LocalRedisServer() as server:
        yield server


@pytest.fixture(scope="module")
def service(serve_run_dir, tmp_path_factory, redis_server_http, api):
    running = Service(tmp_path_factory.mktemp("service"), serve_run_dir /
                      "track_prediction_model_best.keras", redis_server_http.port, api)  # fmt: skip
    yield running
    if running.process.poll() is None:
        running.process.kill()
        running.process.wait()
    running.log_file.close()


@pytest.fixture(scope="module")
def redis_http(redis_server_http):
    import redis

    return redis.Redis(port=redis_server_http.port)


@pytest.fixture(scope="module")
def predictor(serve_run_dir):
    from imt_ml import tfrecord_reader as tr

    return tr.load_predictor(serve_run_dir / "track_prediction_model_best.keras")


# ---------------------------------------------------------------------------
# Predictions
# ---------------------------------------------------------------------------


def test_both_request_forms_child_stops_offsets_and_a_doubled_slash_get_one_answer(service,
                                                                                  predictor):  # fmt: skip
    by_body = service.predict(request())
    assert by_body["success"] is True
    prediction = by_body["prediction"]
    assert set(prediction) == PREDICTION_FIELDS
    expected = predictor.predict([request()])[0][0]
    assert prediction["track_number"] == expected[0]
    assert prediction["confidence_score"] == pytest.approx(expected[1], abs=1e-5)
    assert prediction["display_confidence"] <= prediction["confidence_score"]
    assert prediction["display_confidence"] == pytest.approx(
        int(prediction["confidence_score"] * 20) / 20
    )
    assert 0 <= prediction["model_confidence"] <= 1
    assert prediction["prediction_method"] == "imt-ml model 1"
    assert prediction["historical_matches"] > 0
    assert prediction["accuracy"] == 0.0  # nothing scored yet

    # mbta-mcp's form: query parameters, direction as a string, a doubled slash, a child
    # stop id and the instant in UTC; and the instant without an offset (Boston time).
    query = request(station="NEC-2287-05", when="2024-03-04T22:43:00Z") | {"direction_id": "0"}
    by_query = service.http.post(f"{service.url}//predictions", params=query)  # as sent
    assert by_query.status_code == 200, by_query.text
    answer = by_query.json()["prediction"]
    assert answer["station_id"] == "place-sstat"
    assert answer["scheduled_time"] == "2024-03-04T22:43:00Z"
    no_offset = service.predict(request(when="2024-03-04T17:43:00"))["prediction"]
    assert no_offset["scheduled_time"] == "2024-03-04T17:43:00-05:00"
    for other in (answer, no_offset):
        assert (other["track_number"], other["confidence_score"]) == (
            prediction["track_number"],
            prediction["confidence_score"],
        )


def test_an_unsupported_station_is_answered_as_the_tracker_did(service):
    answer = service.predict(request(station="place-ogmnl", route="Orange"))
    assert answer == {"success": False, "prediction": UNAVAILABLE}
    assert service.http.get("/stats/place-ogmnl/Orange").json() == {"success": False,
                                                                    "stats": UNAVAILABLE}  # fmt: skip


def test_chained_predictions_answer_in_order(service, predictor):
    asked = [request(trip=f"CR-Weekday-Spring-24-{500 + i}", when=f"2024-03-04T17:{i:02d}:00-05:00")
             for i in range(30)]  # fmt: skip
    asked.insert(7, request(station="place-xyz"))
    response = service.http.post("/chained-predictions", json={"predictions": asked})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert len(results) == 31
    assert results[7] == {"success": False, "prediction": UNAVAILABLE}
    expected = predictor.predict([a for i, a in enumerate(asked) if i != 7])
    answered = [r for i, r in enumerate(results) if i != 7]
    for result, mine, theirs in zip(answered, [a for i, a in enumerate(asked) if i != 7], expected,
                                    strict=True):  # fmt: skip
        assert result["prediction"]["trip_id"] == mine["trip_id"]
        assert result["prediction"]["track_number"] == theirs[0][0]


@pytest.mark.parametrize("method, path, kwargs, status", [
    ("post", "/predictions", {"content": b"{not json"}, 422),
    ("post", "/predictions", {"content": b""}, 422),
    ("post", "/predictions", {"json": [1, 2]}, 422),
    ("post", "/predictions", {"json": {"station_id": "place-sstat"}}, 422),
    ("post", "/predictions", {"json": request() | {"direction_id": 7}}, 422),
    ("post", "/predictions", {"json": request() | {"direction_id": "north"}}, 422),
    ("post", "/predictions", {"json": request() | {"scheduled_time": "tomorrow"}}, 422),
    ("post", "/predictions", {"json": request() | {"station_id": 12}}, 422),
    ("post", "/predictions", {"params": {"station_id": "place-sstat"}}, 422),
    ("post", "/predictions", {"content": b"x" * 300_000}, 413),
    ("get", "/predictions", {}, 405),
    ("post", "/chained-predictions", {"json": {"predictions": "all"}}, 422),
    ("post", "/chained-predictions", {"json": {"predictions": [request()] * 501}}, 422),
    ("post", "/chained-predictions", {"json": {"predictions": [request(), {"station_id": 1}]}}, 422),
    ("get", "/historical/place-sstat/CR-Worcester", {"params": {"days": "0"}}, 422),
    ("get", "/historical/place-sstat/CR-Worcester", {"params": {"days": "lots"}}, 422),
    ("post", "/predictions/date", {"json": {"target_date": "someday"}}, 422),
    ("post", "/predictions/date", {"json": {}}, 422),
    ("get", "/no/such/thing", {}, 404),
])  # fmt: skip
def test_malformed_input_is_a_4xx_with_a_json_detail_never_a_500(service, method, path, kwargs,
                                                                status):  # fmt: skip
    response = getattr(service.http, method)(path, **kwargs)
    assert response.status_code == status, response.text
    assert "detail" in response.json()


def test_cors_allows_the_configured_origin_only(service):
    ok = service.http.options("/predictions", headers={
        "origin": "http://displays.example", "access-control-request-method": "POST"})  # fmt: skip
    assert ok.headers.get("access-control-allow-origin") == "http://displays.example"
    other = service.http.options("/predictions", headers={
        "origin": "http://elsewhere.example", "access-control-request-method": "POST"})  # fmt: skip
    assert "access-control-allow-origin" not in other.headers


# ---------------------------------------------------------------------------
# History, dates, live accuracy
# ---------------------------------------------------------------------------


def record_track(client, station: str, route: str, trip: str, when: dt.datetime, track: str) -> str:
    """A track_history record as the recorder (or the tracker) writes it."""
    from imt_ml.sample_data import assignment_doc

    doc = assignment_doc(station, route, trip, f"{route[3:]} - {route[3:]} Ln", 0, when, track)
    key = f"track_history:{station}:{route}:{trip}:{when.astimezone(dt.UTC).date()}"
    client.set(key, json.dumps(doc, separators=(",", ":")), ex=365 * 86_400)
    client.zadd(f"track_timeseries:{station}:{route}", {key: when.timestamp()})
    return key


def test_historical_reads_the_recorded_history_of_the_window(service, redis_http):
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    recent = [record_track(redis_http, "place-north", "CR-Haverhill", f"CR-Weekday-Fall-26-{n}",
                           now - dt.timedelta(days=d), "4") for n, d in ((200, 1), (202, 5))]  # fmt: skip
    record_track(redis_http, "place-north", "CR-Haverhill", "CR-Weekday-Fall-26-204",
                 now - dt.timedelta(days=40), "6")  # fmt: skip
    assert recent
    answer = service.http.get(f"{service.url}//historical/BNT-0000/CR-Haverhill",
                              params={"days": 30}).json()  # fmt: skip
    assert sorted(a["trip_id"] for a in answer) == [
        "CR-Weekday-Fall-26-200",
        "CR-Weekday-Fall-26-202",
    ]
    assert all(a["track_number"] == "4" and a["scheduled_time"].endswith("Z") for a in answer)
    assert len(service.http.get("/historical/place-north/CR-Haverhill?days=60").json()) == 3


def test_predictions_by_date_come_from_the_v3_schedules(service, api):
    today = dt.datetime.now(BOSTON).replace(hour=18, minute=5, second=0, microsecond=0)
    api.add_schedule("CR-Weekday-Fall-26-520", "NEC-2287", "CR-Worcester", today, "Worcester")
    api.add_schedule("CR-Weekday-Fall-26-143", "BNT-0000", "CR-Newburyport",
                     today + dt.timedelta(minutes=30), "Newburyport")  # fmt: skip
    api.add_schedule("CR-Weekday-Fall-26-100", "NEC-2287", "CR-Worcester", None, "South Station",
                     direction_id=1, arrival=today)  # an arrival: nothing departs  # fmt: skip
    body = service.http.post(
        "/predictions/date", json={"target_date": today.date().isoformat()}
    ).json()
    assert body["success"] is True
    departures = {d["departure_info"]["trip_id"]: d for d in body["departures"]}
    assert set(departures) == {"CR-Weekday-Fall-26-520", "CR-Weekday-Fall-26-143"}
    worcester = departures["CR-Weekday-Fall-26-520"]
    assert worcester["departure_info"]["station_id"] == "place-sstat"
    assert worcester["prediction"]["headsign"] == "Worcester - Worcester Ln"
    assert set(worcester["prediction"]) == PREDICTION_FIELDS
    # Cached: the API is not asked again for the same date.
    asked = len([r for r in api.requests if r[0] == "/schedules"])
    service.http.post("/predictions/date", json={"target_date": today.isoformat()})
    assert len([r for r in api.requests if r[0] == "/schedules"]) == asked

    far = service.http.post("/predictions/date", json={"target_date": "2020-01-01"}).json()
    assert far["success"] is False and "7 days" in far["note"]
    api.fail_next = [503]
    tomorrow = (today + dt.timedelta(days=1)).date().isoformat()
    failed = service.http.post("/predictions/date", json={"target_date": tomorrow})
    assert failed.status_code == 200 and failed.json()["success"] is False
    assert "MBTA API" in failed.json()["note"]


def test_live_accuracy_compares_answers_with_the_tracks_recorded_later(service, redis_http):
    gone = dt.datetime.now(dt.UTC).replace(second=0, microsecond=0) - dt.timedelta(minutes=30)
    asked = [request(trip=f"CR-Weekday-Fall-26-{700 + i}", route="CR-Needham",
                     when=(gone + dt.timedelta(minutes=i)).isoformat()) for i in range(4)]  # fmt: skip
    answers = [service.predict(a)["prediction"] for a in asked]
    right = answers[0]["track_number"]
    wrong = "13" if right != "13" else "12"
    for a, answer, track in zip(asked, answers, [right, right, right, wrong], strict=True):
        record_track(redis_http, "place-sstat", "CR-Needham", a["trip_id"],
                     dt.datetime.fromisoformat(a["scheduled_time"]),
                     answer["track_number"] if track == right else wrong)  # fmt: skip
    scored = 'imt_live_scored{route="CR-Needham",station="place-sstat",version="1"} 4.0'
    deadline = time.monotonic() + 30
    while scored not in service.http.get("/metrics").text:  # /stats is rate limited; this is not
        assert time.monotonic() < deadline, service.log
        time.sleep(0.3)
    stats = service.http.get("/stats/place-sstat/CR-Needham")
    assert stats.status_code == 200, stats.text
    figures = stats.json()["stats"]
    assert figures["total_predictions"] == 4
    assert figures["correct_predictions"] == 3 and figures["accuracy_rate"] == 0.75
    assert figures["model_version"] == "1" and figures["last_updated"]
    assert sum(figures["prediction_counts_by_track"].values()) == 4
    assert figures["expected_calibration_error"] is not None
    # The next answer for that station and route carries the live accuracy.
    later = service.predict(request(trip="CR-Weekday-Fall-26-799", route="CR-Needham"))
    assert later["prediction"]["accuracy"] == 0.75
    metrics = service.http.get("/metrics").text
    assert 'imt_live_accuracy{route="CR-Needham",station="place-sstat",version="1"} 0.75' in metrics


def test_model_healthz_metrics_and_docs(service):
    model = service.http.get("/model").json()
    assert model["version"] == "1" and model["registry"] == str(service.registry)
    assert model["metadata"]["held_out"]["top1_accuracy"] > 0
    assert model["metadata"]["periods"]["test_period"]
    assert service.http.get("/healthz").json()["status"] == "ok"
    metrics = service.http.get("/metrics").text
    assert 'imt_http_requests_total{endpoint="/predictions",status="200"}' in metrics
    assert "imt_http_request_seconds_bucket" in metrics
    assert 'imt_predictions_total{station="place-sstat"}' in metrics
    assert 'imt_model_info{version="1"} 1.0' in metrics
    assert service.http.get("/docs").status_code == 200
    schema = service.http.get("/openapi.json").json()
    assert "PredictionRequest" in schema["components"]["schemas"]
    assert {"/predictions", "/chained-predictions", "/predictions/date"} <= set(schema["paths"])


def test_the_mbta_mcp_client_gets_its_answers(service):
    """The tracker author's own client, unmodified, pointed at this server."""
    code = textwrap.dedent(f"""
        import asyncio, json
        from mbta_mcp import extended_client
        extended_client.IMT_BASE_URL = "{service.url}/"  # ends with a slash, as its default does

        async def main():
            async with extended_client.ExtendedMBTAClient() as client:
                one = await client.get_track_prediction("place-sstat", "CR-Worcester",
                    "CR-Weekday-Spring-24-500", "Worcester - Worcester Ln", 0, "2024-03-04T17:43:00-05:00")
                chained = await client.get_chained_track_predictions([{{
                    "station_id": "place-north", "route_id": "CR-Lowell", "trip_id": "CR-Weekday-Spring-24-301",
                    "headsign": "Lowell - Lowell Ln", "direction_id": 1,
                    "scheduled_time": "2024-03-06T20:05:00-05:00"}}])
                stats = await client.get_prediction_stats("place-sstat", "CR-Needham")
                history = await client.get_historical_assignments("place-north", "CR-Haverhill", 30)
                print(json.dumps([one, chained, stats, history]))

        asyncio.run(main())
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, chained, stats, history = json.loads(proc.stdout.strip().splitlines()[-1])
    assert one["success"] is True and one["prediction"]["track_number"]
    assert chained["results"][0]["success"] is True
    assert stats["success"] is True
    assert len(history) == 2


# ---------------------------------------------------------------------------
# A new model, under load; and stopping
# ---------------------------------------------------------------------------


def test_a_promotion_is_served_within_seconds_without_failing_a_request(service):
    failures: list[str] = []
    methods: set[str] = set()
    stop = threading.Event()

    def hammer() -> None:
        with httpx.Client(base_url=service.url, timeout=30) as client:
            i = 0
            while not stop.is_set():
                i += 1
                body = request(trip=f"CR-Weekday-Spring-24-{500 + i % 50}",
                               when=f"2024-03-04T{10 + i % 12}:{i % 60:02d}:00-05:00")  # fmt: skip
                try:
                    response = client.post("/predictions", json=body)
                    if response.status_code != 200 or not response.json()["success"]:
                        failures.append(f"{response.status_code} {response.text[:200]}")
                    else:
                        methods.add(response.json()["prediction"]["prediction_method"])
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1.0)
        promoted = subprocess.run([sys.executable, str(KEEPER), "-", "promote", "--registry",
                                   str(service.registry), "--model", str(service.model)],
                                  capture_output=True, text=True, timeout=180)  # fmt: skip
        assert promoted.returncode == 0, promoted.stderr
        deadline = time.monotonic() + 60
        while service.http.get("/model").json()["version"] != "2":
            assert time.monotonic() < deadline, service.log
            time.sleep(0.1)
        time.sleep(1.0)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert not failures, failures[:5]
    assert methods == {"imt-ml model 1", "imt-ml model 2"}
    assert "model 1 -> 2" in service.log


def test_a_half_written_version_never_becomes_current(tmp_path, serve_run_dir):
    registry = ModelRegistry(tmp_path / "registry")
    model = serve_run_dir / "track_prediction_model_best.keras"
    assert registry.install(model, None, {"note": "first"}) == 1

    class Boom(Exception):
        pass

    import shutil

    real_copy = shutil.copyfile
    calls = []

    def failing_copy(src, dst, *args, **kwargs):
        calls.append(dst)
        if len(calls) == 2:  # the vocabulary, after the model: mid-install
            raise Boom
        return real_copy(src, dst, *args, **kwargs)

    shutil.copyfile = failing_copy
    try:
        with pytest.raises(Boom):
            registry.install(model, model.with_name("track_prediction_model_vocab.json"), {})
    finally:
        shutil.copyfile = real_copy
    assert registry.current_version() == 1
    assert registry.versions() == [1]
    assert not [p for p in (tmp_path / "registry" / "versions").iterdir() if p.name != "1"]
    (registry.versions_dir / "7").mkdir()  # a stray directory without a model
    assert registry.versions() == [1]
    with pytest.raises(Exception, match="no complete version 7"):
        registry.make_current(7)
    assert registry.current_version() == 1


def test_stats_are_rate_limited_per_client(service):
    while time.time() % 60 > 55:  # the limits count per clock minute: not across a boundary
        time.sleep(0.2)
    codes = [service.http.get("/stats/place-sstat/CR-Worcester").status_code for _ in range(6)]
    first = codes.index(429)  # 5 a minute, some perhaps used by the tests before
    assert 1 <= first <= 5 and set(codes[:first]) == {200} and set(codes[first:]) == {429}
    limited = service.http.get("/stats/place-sstat/CR-Worcester")
    assert "rate limit" in limited.json()["detail"] and int(limited.headers["retry-after"]) >= 1


def test_sigterm_finishes_and_exits_zero(service):
    service.process.send_signal(signal.SIGTERM)
    assert service.process.wait(timeout=60) == 0, service.log
    assert "finishing what is in hand" in service.log and "stopped" in service.log
    assert "Traceback" not in service.log
