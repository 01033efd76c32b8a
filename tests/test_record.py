"""The recorder as a user runs it: a subprocess against a stand-in MBTA V3 API
(tests/mbta_standin.py, written from the spec) and a real redis-server."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from pydantic import BaseModel

from imt_ml.utils import LocalRedisServer, free_port
from mbta_standin import StandInMbta

from conftest import only_export_dir, read_export, run_mode

REPO = Path(__file__).resolve().parents[1]
RECORDER = [sys.executable, str(REPO / "src/imt_ml/record_track_data.py")]
API_KEY = "v3-key-9f8e7d6c5b4a"
ONE_YEAR = 365 * 86_400
BOSTON = ZoneInfo("America/New_York")


class TrackAssignment(BaseModel):
    """The tracker's own record model (its `model_dump_json()` wrote every record)."""

    station_id: str
    route_id: str
    trip_id: str
    headsign: str
    direction_id: int
    assignment_type: str
    track_number: str | None = None
    scheduled_time: dt.datetime
    actual_time: dt.datetime | None = None
    recorded_time: dt.datetime
    day_of_week: int
    hour: int
    minute: int


def soon(minutes: int) -> dt.datetime:
    """A whole minute `minutes` from now (the API's times are whole minutes)."""
    now = dt.datetime.now(dt.UTC).replace(second=0, microsecond=0)
    return now + dt.timedelta(minutes=minutes + 1)


def env_for(redis_port: int, api_key: str | None = API_KEY) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IMT_REDIS", "IMT_MBTA"))}
    env.update(IMT_REDIS_ENDPOINT="127.0.0.1", IMT_REDIS_PORT=str(redis_port))
    if api_key:
        env["IMT_MBTA_API_KEY"] = api_key
    return env


def record_once(api: StandInMbta, redis_port: int, *args: str, api_key: str | None = API_KEY,
                timeout: float = 60) -> subprocess.CompletedProcess:  # fmt: skip
    return subprocess.run([*RECORDER, "--once", "--api-url", api.url, *args],
                          env=env_for(redis_port, api_key), capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


class RunningRecorder:
    """A streaming (or polling) recorder process whose log goes to a file we can read."""

    def __init__(self, api: StandInMbta, redis_port: int, *args: str) -> None:
        self.log_file = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
        self.process = subprocess.Popen(
            [*RECORDER, "--api-url", api.url, "--log-interval", "0.3", *args],
            env=env_for(redis_port), stdout=self.log_file, stderr=subprocess.STDOUT)  # fmt: skip

    @property
    def output(self) -> str:
        return Path(self.log_file.name).read_text()

    def wait_for(self, check, what: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():
                return
            if self.process.poll() is not None:
                pytest.fail(f"the recorder exited ({self.process.returncode}) waiting for "
                            f"{what}:\n{self.output[-3000:]}")  # fmt: skip
            time.sleep(0.05)
        pytest.fail(f"timed out waiting for {what}:\n{self.output[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=timeout)
        finally:
            self.log_file.close()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        Path(self.log_file.name).unlink(missing_ok=True)


def totals(output: str) -> dict[str, int]:
    """The counters of the recorder's closing `done:` line."""
    done = [line for line in output.splitlines() if " done: " in line][-1]
    return {label: int(n.replace(",", "")) for n, label in
            re.findall(r"([\d,]+) ([a-z ()]+?)(?=,|$)", done.split(" done: ")[1])}  # fmt: skip


def history_keys(client) -> list[str]:
    return sorted(k.decode() for k in client.scan_iter("track_history:*"))


@pytest.fixture
def api():
    with StandInMbta(api_key=API_KEY) as server:
        yield server


# ---------------------------------------------------------------------------
# One polling pass: what is written, and that it is what the tracker wrote
# ---------------------------------------------------------------------------


def test_once_writes_exactly_the_departures_with_a_known_track_as_the_tracker_did(
    api, redis_client, redis_server
):
    boston_evening = (soon(0) + dt.timedelta(days=2)).astimezone(BOSTON).replace(hour=20, minute=5)
    p = api.prediction
    world = [  # (prediction, headsign, recorded?)
        (p("CR-Weekday-Fall-26-520", "NEC-2287-05", "CR-Worcester", soon(30)), "Worcester", True),
        (p("CR-Weekday-Fall-26-522", "NEC-2287", "CR-Worcester", soon(40)), "Worcester", False),
        (p("LowellElevatorWeekday-834418-143", "BNT-0000-09", "CR-Newburyport", soon(50),
           arrival=soon(45)), "Newburyport", True),
        (p("CR-Weekday-Fall-26-830", "WML-0012-05", "CR-Providence", soon(20), direction_id=1),
         "South Station", True),
        (p("CR-Weekday-Fall-26-701", "NEC-2265-02", "CR-Franklin", soon(25),
           schedule_relationship="CANCELLED"), "Forge Park/495", False),
        (p("CR-Weekday-Fall-26-099", "NEC-2287-03", "CR-Needham", soon(-30)), "Needham", False),
        (p("CR-Weekend-Fall-26-1705", "NEC-2287-11", "CR-Providence", boston_evening),
         "Wickford Junction", True),
    ]  # fmt: skip
    for prediction, headsign, _ in world:
        api.set_prediction(prediction, headsign)
    broken = p("CR-Weekday-Fall-26-555", "NEC-2287-07", "CR-Fairmount", soon(10))
    broken["attributes"]["departure_time"] = "half past five"
    api.set_prediction(broken, "Readville")

    result = record_once(api, redis_server.port)
    assert result.returncode == 0, result.stderr
    assert API_KEY not in result.stdout + result.stderr
    assert totals(result.stderr)["records written"] == 4
    assert totals(result.stderr)["malformed"] == 1

    expected = {}
    for prediction, headsign, recorded in world:
        if not recorded:
            continue
        attributes = prediction["attributes"]
        when = dt.datetime.fromisoformat(attributes["arrival_time"] or attributes["departure_time"])
        utc = when.astimezone(dt.UTC)
        stop_id = prediction["relationships"]["stop"]["data"]["id"]
        route = prediction["relationships"]["route"]["data"]["id"]
        trip = prediction["relationships"]["trip"]["data"]["id"]
        station = api.stops[stop_id]["relationships"]["parent_station"]["data"]["id"]
        key = f"track_history:{station}:{route}:{trip}:{utc.date().isoformat()}"
        expected[key] = dict(
            station_id=station, route_id=route, trip_id=trip,
            headsign=f"{headsign} - {route.removeprefix('CR-')} Ln",
            direction_id=attributes["direction_id"], assignment_type="historical",
            track_number=api.stops[stop_id]["attributes"]["platform_code"],
            scheduled_time=utc, actual_time=utc, day_of_week=utc.weekday(), hour=utc.hour,
            minute=utc.minute, score=utc.timestamp())  # fmt: skip
    assert history_keys(redis_client) == sorted(expected)

    # The Boston 20:05 departure is stored under the next UTC day, with UTC clock fields.
    evening = [k for k in expected if "1705" in k][0]
    assert evening.endswith((boston_evening + dt.timedelta(days=1)).date().isoformat())
    assert expected[evening]["hour"] == boston_evening.astimezone(dt.UTC).hour  # 0 or 1

    for key, fields in expected.items():
        raw = redis_client.get(key)
        stored = json.loads(raw)
        score = fields.pop("score")
        recorded = dt.datetime.fromisoformat(stored["recorded_time"])
        assert abs(recorded.timestamp() - time.time()) < 120
        tracker_bytes = TrackAssignment(**fields, recorded_time=recorded).model_dump_json()
        assert raw.decode() == tracker_bytes  # byte for byte what the tracker's pydantic wrote
        assert stored["scheduled_time"].endswith("Z")
        assert ONE_YEAR - 60 < redis_client.ttl(key) <= ONE_YEAR
        series = f"track_timeseries:{fields['station_id']}:{fields['route_id']}"
        assert redis_client.zscore(series, key) == score
        assert ONE_YEAR - 60 < redis_client.ttl(series) <= ONE_YEAR

    # A second pass over the same predictions writes nothing new and changes nothing.
    before = {k: redis_client.get(k) for k in expected}
    again = record_once(api, redis_server.port)
    assert again.returncode == 0, again.stderr
    assert totals(again.stderr)["records written"] == 0
    assert totals(again.stderr)["track changes"] == 0
    assert {k: redis_client.get(k) for k in expected} == before


def test_a_track_change_seen_by_a_later_pass_rewrites_the_same_record(api, redis_client,
                                                                         redis_server):  # fmt: skip
    when = soon(15)
    if (when + dt.timedelta(minutes=3)).date() != when.date():
        when = soon(20)  # the key holds the UTC date: keep both times on one day
    api.set_prediction(api.prediction("CR-Weekday-Fall-26-520", "NEC-2287-05", "CR-Worcester",
                                      when), "Worcester")  # fmt: skip
    assert record_once(api, redis_server.port).returncode == 0
    [key] = history_keys(redis_client)
    api.set_prediction(api.prediction("CR-Weekday-Fall-26-520", "NEC-2287-08", "CR-Worcester",
                                      when + dt.timedelta(minutes=3)))  # fmt: skip
    result = record_once(api, redis_server.port)
    assert result.returncode == 0, result.stderr
    assert totals(result.stderr)["track changes"] == 1
    assert history_keys(redis_client) == [key]
    stored = json.loads(redis_client.get(key))
    assert stored["track_number"] == "8"
    assert stored["scheduled_time"] == when.strftime("%Y-%m-%dT%H:%M:%SZ")  # the first key's time
    assert redis_client.zcard("track_timeseries:place-sstat:CR-Worcester") == 1


def test_rate_limited_then_success_waits_for_the_reset(api, redis_client, redis_server):
    api.set_prediction(api.prediction("CR-Weekday-Fall-26-520", "NEC-2287-05", "CR-Worcester",
                                      soon(15)), "Worcester")  # fmt: skip
    api.rate_limit_wait = 2.0
    api.fail_next = [429]
    started = time.monotonic()
    result = record_once(api, redis_server.port)
    assert result.returncode == 0, result.stderr
    assert "HTTP 429" in result.stderr and "waiting" in result.stderr
    assert time.monotonic() - started >= 1.0
    assert len(history_keys(redis_client)) == 1


# ---------------------------------------------------------------------------
# Refusals at start: one line, exit 1, no secret
# ---------------------------------------------------------------------------


def test_a_refused_api_key_is_one_line_and_never_printed(api, redis_server):
    wrong = "not-the-key-0123456789"
    result = record_once(api, redis_server.port, api_key=wrong)
    assert result.returncode == 1
    assert "refused the API key" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert wrong not in result.stdout + result.stderr
    by_flag = subprocess.run([*RECORDER, "--once", "--api-url", api.url, "--api-key", wrong],
                             env=env_for(redis_server.port, None), capture_output=True, text=True,
                             timeout=60)  # fmt: skip
    assert by_flag.returncode == 1 and wrong not in by_flag.stdout + by_flag.stderr


def test_an_unreachable_api_or_redis_is_one_line(api, redis_server):
    dead_api = subprocess.run([*RECORDER, "--once", "--api-url", f"http://127.0.0.1:{free_port()}"],
                              env=env_for(redis_server.port), capture_output=True, text=True,
                              timeout=60)  # fmt: skip
    assert dead_api.returncode == 1
    assert "cannot reach the MBTA API" in dead_api.stderr
    assert len(dead_api.stderr.strip().splitlines()) == 1
    assert API_KEY not in dead_api.stderr

    dead_redis = record_once(api, free_port())
    assert dead_redis.returncode == 1
    assert "cannot reach Redis" in dead_redis.stderr
    assert len(dead_redis.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------------------
# Streaming: every event kind, keep-alive lines, a dropped stream, SIGTERM
# ---------------------------------------------------------------------------


def test_stream_follows_resets_adds_updates_removes_and_survives_a_dropped_stream(
    api, redis_client, redis_server
):
    p = api.prediction
    waiting = p("CR-Weekday-Fall-26-522", "NEC-2287", "CR-Worcester", soon(40))
    api.set_prediction(waiting, "Worcester")
    api.set_prediction(p("CR-Weekday-Fall-26-320", "BNT-0000-03", "CR-Lowell", soon(30)), "Lowell")
    recorder = RunningRecorder(api, redis_server.port)
    try:
        key_of = lambda trip, station, route, when: (  # noqa: E731
            f"track_history:{station}:{route}:{trip}:{when.astimezone(dt.UTC).date()}"
        )
        lowell = key_of("CR-Weekday-Fall-26-320", "place-north", "CR-Lowell", soon(30))
        recorder.wait_for(lambda: redis_client.exists(lowell), "the reset's departure")
        assert history_keys(redis_client) == [lowell]  # the generic stop is not a track

        # update: the waiting train gets track 7, then moves to track 8 before it leaves.
        worcester = key_of("CR-Weekday-Fall-26-522", "place-sstat", "CR-Worcester", soon(40))
        api.set_prediction(p("CR-Weekday-Fall-26-522", "NEC-2287-07", "CR-Worcester", soon(40)))
        recorder.wait_for(lambda: redis_client.exists(worcester), "an update's track")
        api.set_prediction(p("CR-Weekday-Fall-26-522", "NEC-2287-08", "CR-Worcester", soon(41)))
        recorder.wait_for(lambda: json.loads(redis_client.get(worcester))["track_number"] == "8",
                          "the track change")  # fmt: skip

        # add: a prediction whose trip arrives after it, malformed events, a removal.
        late = p("CR-Weekday-Fall-26-1710", "NEC-2265-02", "CR-Providence", soon(35))
        api.publish(b"event: add\ndata: " + json.dumps(late).encode() + b"\n\n")
        api.publish(b"event: update\ndata: {this is not json\n\n")
        api.publish(b'event: update\ndata: {"type": "prediction", "id": "x"}\n\n')
        api.publish(b"event: surprise\ndata: []\n\n")
        api.add_trip(api.trip("CR-Weekday-Fall-26-1710", "Providence"))
        ruggles = key_of("CR-Weekday-Fall-26-1710", "place-rugg", "CR-Providence", soon(35))
        recorder.wait_for(lambda: redis_client.exists(ruggles), "the add whose trip came later")
        api.remove_prediction(late["id"])

        # A dropped stream: what appears meanwhile is caught up by one poll on reconnecting.
        api.drop_streams()
        api.set_prediction(p("CR-Weekday-Fall-26-2407", "NEC-2276-02", "CR-Needham", soon(25)),
                           "Needham", publish=False)  # fmt: skip
        back_bay = key_of("CR-Weekday-Fall-26-2407", "place-bbsta", "CR-Needham", soon(25))
        recorder.wait_for(lambda: redis_client.exists(back_bay), "the catch-up after a drop")
        recorder.wait_for(lambda: api.stream_connections >= 2, "the stream reopened")
        polls = [q for path, q, stream in api.requests if path == "/predictions" and not stream]
        assert polls, "no catch-up poll after the reconnect"
        time.sleep(1.0)  # keep-alive lines flow (every 0.5 s) and interval lines are written
        code = recorder.stop(signal.SIGTERM)
        output = recorder.output
    finally:
        recorder.kill()
    assert code == 0, output
    counts = totals(output)
    assert counts["track changes"] == 1
    assert counts["malformed"] == 3
    assert counts["reconnects"] >= 1
    assert counts["records written"] == 4
    assert sorted(history_keys(redis_client)) == sorted([lowell, worcester, ruggles, back_bay])
    assert API_KEY not in output
    interval_lines = [line for line in output.splitlines() if " last " in line]
    assert interval_lines and all("departures seen" in line for line in interval_lines)


def test_redis_restarted_mid_stream_loses_nothing_and_sigterm_writes_what_is_pending(api):
    p = api.prediction
    server = LocalRedisServer().start()
    recorder = RunningRecorder(api, server.port)
    try:
        import redis

        client = redis.Redis(port=server.port)
        api.set_prediction(p("CR-Weekday-Fall-26-100", "NEC-2287-01", "CR-Worcester", soon(30)),
                           "Worcester")  # fmt: skip
        recorder.wait_for(lambda: len(history_keys(client)) == 1, "the first record")

        server.stop()  # Redis goes away; departures keep coming
        trips = [f"CR-Weekday-Fall-26-{200 + i}" for i in range(3)]
        for i, trip in enumerate(trips):
            api.set_prediction(p(trip, f"NEC-2287-0{i + 2}", "CR-Worcester", soon(30 + i)),
                               "Worcester")  # fmt: skip
        recorder.wait_for(lambda: "not answering" in recorder.output, "Redis noticed down")
        server.start()  # same port, empty: everything seen while it was down must arrive
        client = redis.Redis(port=server.port)
        recorder.wait_for(lambda: len(history_keys(client)) == 3, "the pending records")
        assert all(trip in " ".join(history_keys(client)) for trip in trips)
        recorder.wait_for(lambda: "answers again" in recorder.output, "Redis noticed back")

        # Down again, a departure arrives, SIGTERM comes; Redis returns within the grace.
        server.stop()
        api.set_prediction(p("CR-Weekday-Fall-26-300", "NEC-2287-09", "CR-Worcester", soon(50)),
                           "Worcester")  # fmt: skip
        recorder.wait_for(lambda: recorder.output.count("not answering") >= 2, "down again")
        recorder.process.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        server.start()
        code = recorder.stop()
        output = recorder.output
        client = redis.Redis(port=server.port)
        assert code == 0, output
        assert any("CR-Weekday-Fall-26-300" in k for k in history_keys(client)), output
        assert "stopping: writing 1 pending records" in output
    finally:
        recorder.kill()
        server.stop()


# ---------------------------------------------------------------------------
# What it records is history like the tracker's: exported and trained on
# ---------------------------------------------------------------------------


def test_recorded_history_exports_and_trains_beside_the_trackers(api, redis_client, redis_server,
                                                                  tmp_path):  # fmt: skip
    from imt_ml.sample_data import seed_redis

    seed_redis(redis_client, 2500, seed=11)
    new = []
    for i, (stop, route, headsign) in enumerate([("NEC-2287-04", "CR-Worcester", "Worcester"),
                                                 ("BNT-0000-06", "CR-Lowell", "Lowell"),
                                                 ("NEC-2265-01", "CR-Franklin", "Franklin")]):  # fmt: skip
        when = soon(20 + 10 * i)
        api.set_prediction(api.prediction(f"CR-Weekday-Fall-26-{900 + i}", stop, route, when),
                           headsign)  # fmt: skip
        new.append((f"CR-Weekday-Fall-26-{900 + i}", when.astimezone(BOSTON)))
    assert record_once(api, redis_server.port).returncode == 0

    out = tmp_path / "export"
    exported = subprocess.run([sys.executable, str(REPO / "src/imt_ml/export_track_data.py"),
                               "--output", str(out)], env=env_for(redis_server.port),
                              capture_output=True, text=True, timeout=300)  # fmt: skip
    assert exported.returncode == 0, exported.stderr
    records = read_export(only_export_dir(out))
    by_trip = {r["trip_id"]: r for r in records}
    for trip, local in new:
        row = by_trip[trip]  # in the export, with the Boston clock
        assert (row["day_of_week"], row["hour"], row["minute"]) == (
            local.weekday(),
            local.hour,
            local.minute,
        )
    assert len(records) > 2000

    _, run_dir = run_mode(out, "train", "--epochs", "1", "--batch-size", "256",
                          "--test-days", "0", out=tmp_path / "runs")  # fmt: skip
    vocab = json.loads((run_dir / "track_prediction_model_vocab.json").read_text())
    for trip, _ in new:  # the recorded departures are in what the model learnt
        assert any(trip in entry for entry in vocab["station_trips"]), trip


def test_server_errors_while_polling_are_retried_with_backoff(api, redis_client, redis_server):
    recorder = RunningRecorder(api, redis_server.port, "--poll", "0.2")
    try:
        recorder.wait_for(lambda: " last " in recorder.output, "the first status line")
        api.fail_next = [503, 502, 500]
        api.set_prediction(api.prediction("CR-Weekday-Fall-26-640", "NEC-2287-12", "CR-Fairmount",
                                          soon(20)), "Readville")  # fmt: skip
        recorder.wait_for(lambda: len(history_keys(redis_client)) == 1, "the record after errors")
        recorder.wait_for(lambda: "answers again" in recorder.output, "the API noticed back")
        code = recorder.stop()
        output = recorder.output
    finally:
        recorder.kill()
    assert code == 0, output
    assert "HTTP 503" in output and "reconnecting with backoff" in output
    assert totals(output)["errors"] == 3
    assert output.count("reconnecting with backoff") == 1  # one line per outage, not per try


def test_pending_records_are_bounded_oldest_dropped_first():
    from imt_ml.record_track_data import RecorderOptions, TrackRecorder
    from imt_ml.utils import RedisTarget

    recorder = TrackRecorder(None, RedisTarget("127.0.0.1", 1), None,  # type: ignore[arg-type]
                             RecorderOptions(max_pending=2))  # fmt: skip
    recorder.store.add(StandInMbta._stop("NEC-2287-01", "South Station", "1", "place-sstat"))
    trips = [f"CR-Weekday-Fall-26-{n}" for n in (501, 502, 503)]
    for trip in trips:
        recorder.store.add(StandInMbta.trip(trip, "Worcester"))
        recorder.observe_prediction(StandInMbta.prediction(trip, "NEC-2287-01", "CR-Worcester",
                                                           soon(30)))  # fmt: skip
    assert [d.key.split(":")[3] for d in recorder.pending.values()] == trips[1:]
    assert recorder.total["dropped"] == 1


def test_runs_by_path_and_as_console_script_with_help():
    by_path = subprocess.run([*RECORDER, "--help"], capture_output=True, text=True, timeout=60)
    assert by_path.returncode == 0 and "--once" in by_path.stdout
    assert "IMT_MBTA_API_KEY" in by_path.stdout
    script = Path(sys.executable).parent / "record-track-data"
    assert "--poll" in subprocess.run([str(script), "--help"], capture_output=True, text=True,
                                      timeout=60).stdout  # fmt: skip
