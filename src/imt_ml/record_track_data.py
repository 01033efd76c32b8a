"""Record new track history from the MBTA V3 API into Redis, in the tracker's own layout.

The Inky MBTA Tracker stopped recording track history on 2026-02-10. This script
takes over: it watches commuter-rail predictions at the four big stations and, for
each departure whose platform is known, writes the record the tracker would have
written (`track_history:{station}:{route}:{trip}:{UTC date}` plus the
`track_timeseries:{station}:{route}` sorted set; docs/tracker-layout.md), so
`export_track_data.py` reads old and new history alike. What it uses of the V3 API
is in docs/mbta-v3.md.

    export IMT_MBTA_API_KEY=...  IMT_REDIS_ENDPOINT=localhost
    uv run src/imt_ml/record_track_data.py                 # stream (Server-Sent Events)
    uv run src/imt_ml/record_track_data.py --poll 30       # poll every 30 s instead
    uv run src/imt_ml/record_track_data.py --once          # one pass, then exit (cron)

A departure whose track changes before it leaves keeps one record under its first
key; the record is rewritten with the new track (the track finally used wins) and
the change is counted. What could not be written while Redis was down waits in
memory (at most --max-pending records, oldest dropped first, counted) and is written
after Redis answers again; SIGTERM or Ctrl-C writes what is pending and exits 0.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import functools
import itertools
import queue
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import click
import orjson

if __package__ in (None, ""):  # run by path: `uv run src/imt_ml/record_track_data.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imt_ml.utils import (
    ENV_REDIS,
    RedisTarget,
    UserError,
    environment_epilog,
    log,
    redis_options,
)

DEFAULT_API_URL = "https://api-v3.mbta.com"
API_KEY_VARIABLE = "IMT_MBTA_API_KEY"
#: South Station, North Station, Back Bay, Ruggles (parent stops).
STATIONS = ("place-sstat", "place-north", "place-bbsta", "place-rugg")
#: The tracker let each record and each sorted set expire a year after its last write.
HISTORY_TTL_SECONDS = 365 * 86_400
#: Commuter rail in the V3 API's route_type filter.
COMMUTER_RAIL = "2"
#: Predictions of cancelled or skipped stops say nothing about a track used.
NOT_DEPARTING = frozenset({"CANCELLED", "SKIPPED"})
#: Departures remembered (for change detection) this long after their scheduled time.
REMEMBER_SECONDS = 2 * 86_400


# ---------------------------------------------------------------------------
# The MBTA V3 API client (shared with the prediction service).
# ---------------------------------------------------------------------------


class ApiError(Exception):
    """The API did not answer usefully (network, 5xx, a body that is not JSON)."""


class ApiRefused(ApiError):
    """HTTP 401/403: the API key was refused; retrying will not help."""


class StreamEnded(ApiError):
    """The server closed the event stream (not an error; the recorder reconnects)."""


class RateLimited(ApiError):
    """HTTP 429; `reset_at` is the Unix time the window reopens (None if not said)."""

    def __init__(self, message: str, reset_at: float | None) -> None:
        super().__init__(message)
        self.reset_at = reset_at


class MbtaClient:
    """A small client of the MBTA V3 API: JSON:API documents by GET, and a streaming GET
    that yields the raw bytes of a Server-Sent Events response.

    The key travels only in the `x-api-key` header and every error message passes
    through `redact`, so it is never printed."""

    def __init__(self, base_url: str = DEFAULT_API_URL, api_key: str | None = None,
                 timeout: float = 15.0, stream_idle_timeout: float = 90.0) -> None:  # fmt: skip
        import httpx

        self.base_url = base_url.rstrip("/")
        self.api_key = api_key or None
        headers = {"accept-encoding": "gzip", "user-agent": "imt-ml-recorder"}
        if self.api_key:
            headers["x-api-key"] = self.api_key
        self._timeout = httpx.Timeout(timeout)
        # A stream is quiet between events; the server's keep-alive lines arrive well within this.
        self._stream_timeout = httpx.Timeout(timeout, read=stream_idle_timeout)
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=self._timeout)

    def redact(self, text: str) -> str:
        return text.replace(self.api_key, "***") if self.api_key else text

    def _failure(self, exc: Exception) -> ApiError:
        return ApiError(self.redact(f"{type(exc).__name__}: {exc}".rstrip(": ")))

    def _check(self, response: Any) -> None:
        status = response.status_code
        if status in (401, 403):
            raise ApiRefused(f"the MBTA API at {self.base_url} refused the API key (HTTP {status})")
        if status == 429:
            reset = response.headers.get("x-ratelimit-reset")
            try:
                reset_at = float(reset) if reset is not None else None
            except ValueError:
                reset_at = None
            raise RateLimited(f"rate limited by {self.base_url} (HTTP 429)", reset_at)
        if status >= 400:
            raise ApiError(f"HTTP {status} from {self.base_url}{response.url.path}")

    def get(self, path: str, params: dict[str, str] | None = None) -> dict[str, Any]:
        """The JSON:API document at `path`; ApiRefused / RateLimited / ApiError otherwise."""
        import httpx

        try:
            response = self._http.get(path, params=params)
        except httpx.HTTPError as exc:
            raise self._failure(exc) from None
        self._check(response)
        try:
            document = orjson.loads(response.content)
        except orjson.JSONDecodeError:
            raise ApiError(f"{self.base_url}{path} answered with a body that is not JSON") from None
        if not isinstance(document, dict):
            raise ApiError(f"{self.base_url}{path} answered with JSON that is not a document")
        return document

    def open_stream(self, path: str, params: dict[str, str] | None = None) -> Any:
        """An open streaming response (`Accept: text/event-stream`); the caller reads
        `iter_bytes()` and closes it."""
        import httpx

        request = self._http.build_request("GET", path, params=params,
                                           headers={"accept": "text/event-stream"},
                                           timeout=self._stream_timeout)  # fmt: skip
        try:
            response = self._http.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise self._failure(exc) from None
        try:
            self._check(response)
        except ApiError:
            response.close()
            raise
        return response

    def close(self) -> None:
        self._http.close()


def parse_sse(chunks: Iterable[bytes]) -> Iterator[tuple[str, bytes]]:
    """(event, data) for each Server-Sent Event in a byte stream; a keep-alive comment
    line yields ("", b""). Data lines are joined with newlines, as the SSE spec says."""
    buffer = b""
    event, data = "message", list[bytes]()
    for chunk in chunks:
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line:  # a blank line ends an event
                if data:
                    yield event, b"\n".join(data)
                event, data = "message", list[bytes]()
            elif line[0] == 58:  # b":" - a comment, the server's keep-alive
                yield "", b""
            else:
                name, _, value = line.partition(b":")
                if value[:1] == b" ":
                    value = value[1:]
                if name == b"data":
                    data.append(value)
                elif name == b"event":
                    event = value.decode("utf-8", "replace")


# ---------------------------------------------------------------------------
# From V3 resources to the tracker's records.
# ---------------------------------------------------------------------------


class Malformed(Exception):
    """A resource or event without the fields the spec promises."""


def utc_text(moment: dt.datetime) -> str:
    """An aware time as pydantic v2 writes a UTC datetime: `...Z`, microseconds only
    when there are any (the tracker's records were pydantic's `model_dump_json()`)."""
    return moment.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


@functools.lru_cache(maxsize=16_384)
def scheduled_clock(text: str) -> tuple[float, str, int, int, int, str]:
    """(Unix seconds, UTC text, UTC weekday, hour, minute, UTC date) of an API time
    with an offset, as the tracker derived them. ValueError when it is not one."""
    moment = dt.datetime.fromisoformat(text)
    if moment.tzinfo is None:
        raise ValueError(f"time without an offset: {text!r}")
    utc = moment.astimezone(dt.UTC)
    return (utc.timestamp(), utc_text(utc), utc.weekday(), utc.hour, utc.minute,
            utc.date().isoformat())  # fmt: skip


def tracker_headsign(trip_headsign: str, route_id: str) -> str:
    """The tracker's commuter-rail headsign: `"Newburyport - Newburyport Ln"`."""
    line = route_id[3:] if route_id.startswith("CR-") else route_id
    return f"{trip_headsign} - {line} Ln"


@dataclasses.dataclass(slots=True)
class Departure:
    """One departure with a known track, ready to write."""

    key: str
    series: str
    score: float
    track: str
    document: bytes


def _related_id(resource: dict[str, Any], name: str) -> str | None:
    related = (resource.get("relationships") or {}).get(name) or {}
    data = related.get("data")
    return data.get("id") if isinstance(data, dict) else None


class ResourceStore:
    """What the recorder knows of stops and trips, from included resources, stream
    events and the stations' child stops (the spec: read `platform_code` and
    `parent_station`, never parse ids)."""

    def __init__(self) -> None:
        #: stop id -> (parent station id, platform code or None)
        self.stops: dict[str, tuple[str, str | None]] = {}
        #: trip id -> the trip's headsign
        self.trips: dict[str, str] = {}

    def add(self, resource: dict[str, Any]) -> None:
        """Remember a stop or trip resource; others are ignored. Malformed if unusable."""
        kind = resource.get("type")
        if kind == "stop":
            attributes = resource.get("attributes") or {}
            code = attributes.get("platform_code")
            parent = _related_id(resource, "parent_station") or resource.get("id")
            if not isinstance(resource.get("id"), str) or not isinstance(parent, str):
                raise Malformed("stop without an id")
            self.stops[resource["id"]] = (parent, str(code) if code not in (None, "") else None)
        elif kind == "trip":
            headsign = (resource.get("attributes") or {}).get("headsign")
            if not isinstance(resource.get("id"), str) or not isinstance(headsign, str):
                raise Malformed("trip without an id or headsign")
            self.trips[resource["id"]] = headsign


def departure_from_prediction(prediction: dict[str, Any], store: ResourceStore,
                              stations: frozenset[str], now: float) -> Departure | str | None:  # fmt: skip
    """The record a prediction makes, None when it makes none (no track yet, another
    station, cancelled, already gone), or the trip id it waits for when that trip is
    not known yet. Raises Malformed for a prediction without the promised fields."""
    try:
        attributes = prediction["attributes"]
        stop_id = prediction["relationships"]["stop"]["data"]["id"]
    except (KeyError, TypeError):
        raise Malformed("prediction without attributes or stop") from None
    station, track = store.stops.get(stop_id, ("", None))
    if station not in stations or track is None:
        return None  # not one of ours, or the track is not known yet
    if attributes.get("schedule_relationship") in NOT_DEPARTING:
        return None
    when = attributes.get("arrival_time") or attributes.get("departure_time")
    trip_id = _related_id(prediction, "trip")
    route_id = _related_id(prediction, "route")
    direction = attributes.get("direction_id")
    if not isinstance(when, str) or not trip_id or not route_id or direction not in (0, 1):
        raise Malformed("prediction without a time, trip, route or direction")
    try:
        timestamp, text, weekday, hour, minute, date = scheduled_clock(when)
    except ValueError:
        raise Malformed(f"prediction time {when!r} is not ISO 8601 with an offset") from None
    if timestamp <= now:
        return None  # the tracker considered only departures still to come
    headsign = store.trips.get(trip_id)
    if headsign is None:
        return trip_id
    document = {
        "station_id": station, "route_id": route_id, "trip_id": trip_id,
        "headsign": tracker_headsign(headsign, route_id), "direction_id": direction,
        "assignment_type": "historical", "track_number": track,
        "scheduled_time": text, "actual_time": text,
        "recorded_time": utc_text(dt.datetime.fromtimestamp(now, dt.UTC)),
        "day_of_week": weekday, "hour": hour, "minute": minute,
    }  # fmt: skip
    return Departure(
        key=f"track_history:{station}:{route_id}:{trip_id}:{date}",
        series=f"track_timeseries:{station}:{route_id}",
        score=timestamp,
        track=track,
        document=orjson.dumps(document),
    )


# ---------------------------------------------------------------------------
# The recorder: observe, keep pending, write, tell.
# ---------------------------------------------------------------------------


class Shutdown(BaseException):
    """Raised in the main thread by SIGTERM/SIGINT."""


@dataclasses.dataclass
class RecorderOptions:
    """How the recorder runs (the command's options, once)."""

    stations: tuple[str, ...] = STATIONS
    #: Seconds between polls; None streams.
    poll: float | None = None
    once: bool = False
    log_interval: float = 60.0
    max_pending: int = 50_000
    #: Seconds SIGTERM waits for an unreachable Redis before giving up on what is pending.
    shutdown_grace: float = 15.0
    #: Longest wait between reconnection attempts (API or Redis), seconds.
    max_backoff: float = 60.0


COUNTERS = ("events", "departures", "written", "changes", "malformed", "errors", "reconnects",
            "dropped")  # fmt: skip
#: Counter -> how the interval line names it.
COUNTER_LABELS = {
    "events": "events", "departures": "departures seen", "written": "records written",
    "changes": "track changes", "malformed": "malformed", "errors": "errors",
    "reconnects": "reconnects", "dropped": "dropped (pending full)",
}  # fmt: skip

#: Pending records written per Redis round trip pair.
WRITE_BATCH = 1000
#: While events stream in, write at most this often (seconds): a burst of new
#: departures becomes one pipeline instead of a round trip each.
WRITE_EVERY = 0.2


class Backoff:
    """Exponential waits with jitter: 0.5 s, 1 s, 2 s ... up to `ceiling`."""

    def __init__(self, ceiling: float, first: float = 0.5) -> None:
        self.ceiling, self.first, self.failures = ceiling, first, 0

    def next_wait(self) -> float:
        wait = min(self.ceiling, self.first * 2**self.failures)
        self.failures += 1
        return wait * random.uniform(0.8, 1.2)

    def reset(self) -> None:
        self.failures = 0


class TrackRecorder:
    """Turns predictions into tracker records and writes them to Redis.

    `observe_*` feed it resources; `flush()` writes what is pending; `tick()` flushes
    when due and logs one line per interval. Single-threaded: only the stream's socket
    reads happen in a helper thread."""

    def __init__(self, client: MbtaClient, redis_target: RedisTarget, redis_client: Any,
                 options: RecorderOptions, clock: Callable[[], float] = time.time) -> None:  # fmt: skip
        self.api = client
        self.redis_target = redis_target
        self.redis = redis_client
        self.options = options
        self.stations = frozenset(options.stations)
        self.clock = clock
        self.store = ResourceStore()
        self.interval: collections.Counter[str] = collections.Counter()
        self.total: collections.Counter[str] = collections.Counter()
        self.departures_seen: set[str] = set()
        #: key -> Departure, in the order first seen (the oldest is dropped when full).
        self.pending: collections.OrderedDict[str, Departure] = collections.OrderedDict()
        #: key -> (track as last written or found in Redis, scheduled time)
        self.known: dict[str, tuple[str, float]] = {}
        #: prediction id -> (its record's key, scheduled time): a departure keeps its first
        #: key even if its predicted time later moves past UTC midnight.
        self.keys: dict[str, tuple[str, float]] = {}
        #: trip id -> predictions waiting for that trip's resource (stream order varies).
        self.waiting: dict[str, dict[str, dict[str, Any]]] = {}
        self.redis_down = False
        self.redis_backoff = Backoff(options.max_backoff)
        self.api_backoff = Backoff(options.max_backoff)
        self.next_write = 0.0
        self.last_log = time.monotonic()

    # -- counting --------------------------------------------------------------

    def count(self, name: str, n: int = 1) -> None:
        self.interval[name] += n
        self.total[name] += n

    # -- observing -------------------------------------------------------------

    def observe_resource(self, resource: Any) -> None:
        """One resource from a poll, a reset or an add/update event."""
        if not isinstance(resource, dict):
            raise Malformed("a resource that is not an object")
        kind = resource.get("type")
        if kind == "prediction":
            self.observe_prediction(resource)
        elif kind in ("stop", "trip"):
            self.store.add(resource)
            if kind == "trip" and resource["id"] in self.waiting:
                for waiting in self.waiting.pop(resource["id"]).values():
                    self.observe_prediction(waiting)

    def observe_prediction(self, prediction: dict[str, Any]) -> None:
        now = self.clock()
        found = departure_from_prediction(prediction, self.store, self.stations, now)
        if found is None:
            return
        pid = prediction.get("id")
        if isinstance(found, str):  # its trip resource has not arrived yet
            self.waiting.setdefault(found, {})[str(pid)] = prediction
            return
        first = self.keys.get(pid) if isinstance(pid, str) else None
        if first is None:
            if isinstance(pid, str):
                self.keys[pid] = (found.key, found.score)
        elif first[0] != found.key:  # same departure, its time moved across UTC midnight
            found = self._rekeyed(found, *first)
        self.departures_seen.add(found.key)
        if self.known.get(found.key, ("", 0.0))[0] == found.track:
            return  # already in Redis with this track
        pending = self.pending.get(found.key)
        if pending is not None and pending.track == found.track:
            return
        if pending is None and len(self.pending) >= self.options.max_pending:
            self.pending.popitem(last=False)
            self.count("dropped")
        self.pending[found.key] = found

    @staticmethod
    def _rekeyed(departure: Departure, key: str, score: float) -> Departure:
        """The departure under its first key, with that key's scheduled time."""
        document = orjson.loads(departure.document)
        clock = scheduled_clock(utc_text(dt.datetime.fromtimestamp(score, dt.UTC)))
        document.update(scheduled_time=clock[1], actual_time=clock[1], day_of_week=clock[2],
                        hour=clock[3], minute=clock[4])  # fmt: skip
        return Departure(key, departure.series, score, departure.track, orjson.dumps(document))

    def observe_document(self, document: Any) -> None:
        """A poll's JSON:API document: included resources first, then the predictions."""
        if not isinstance(document, dict) or not isinstance(document.get("data", []), list):
            raise Malformed("a document without a data list")
        for resource in document.get("included") or []:
            self._safely(self.observe_resource, resource)
        for resource in document.get("data") or []:
            self.count("events")
            self._safely(self.observe_resource, resource)

    def observe_event(self, event: str, data: bytes) -> None:
        """One Server-Sent Event of the predictions stream."""
        if not event:
            return  # keep-alive
        self.count("events")
        try:
            payload = orjson.loads(data)
        except orjson.JSONDecodeError:
            self.count("malformed")
            return
        if event == "reset":
            if not isinstance(payload, list):
                self.count("malformed")
                return
            self.waiting.clear()
            resources = sorted(payload, key=lambda r: isinstance(r, dict) and r.get("type") == "prediction")  # fmt: skip
            for resource in resources:
                self._safely(self.observe_resource, resource)
        elif event in ("add", "update"):
            self._safely(self.observe_resource, payload)
        elif event == "remove":
            if not isinstance(payload, dict):
                self.count("malformed")
                return
            for waiting in self.waiting.values():
                waiting.pop(str(payload.get("id")), None)
        else:
            self.count("malformed")

    def _safely(self, observe: Callable[[Any], None], resource: Any) -> None:
        try:
            observe(resource)
        except Malformed:
            self.count("malformed")

    # -- writing ----------------------------------------------------------------

    def flush(self) -> bool:
        """Write everything pending; False (and keep it) when Redis does not answer."""
        import redis

        try:
            while self.pending:
                batch = list(itertools.islice(self.pending.values(), WRITE_BATCH))
                self._write(batch)
                for departure in batch:
                    if self.pending.get(departure.key) is departure:
                        del self.pending[departure.key]
        except (redis.RedisError, OSError) as exc:  # down, restarting, read-only, refusing...
            self.count("errors")
            if not self.redis_down:
                log(f"{now_text()} Redis at {self.redis_target.label} is not answering "
                    f"({self.redis_target.redact(str(exc)) or type(exc).__name__}); keeping "
                    f"{len(self.pending):,} records in memory until it does")  # fmt: skip
            self.redis_down = True
            self.next_write = time.monotonic() + self.redis_backoff.next_wait()
            return False
        if self.redis_down:
            log(
                f"{now_text()} Redis at {self.redis_target.label} answers again; pending records written"
            )
            self.redis_down = False
        self.redis_backoff.reset()
        self.next_write = time.monotonic() + WRITE_EVERY
        return True

    def _write(self, batch: list[Departure]) -> None:
        """SET NX what is new, overwrite a record whose track changed, leave the rest."""
        with self.redis.pipeline(transaction=False) as pipe:
            for departure in batch:
                pipe.get(departure.key)
            existing = pipe.execute()
        changed = 0
        written = 0
        with self.redis.pipeline(transaction=True) as pipe:
            for departure, old in zip(batch, existing, strict=True):
                old_document = _document_of(old) if old is not None else None
                if old_document and old_document.get("track_number") == departure.track:
                    continue  # already there with this track
                if old is None:
                    pipe.set(departure.key, departure.document, ex=HISTORY_TTL_SECONDS, nx=True)
                    written += 1
                    score = departure.score
                else:  # the track changed before departure: the record follows it
                    document, score = _moved_to_track(departure, old_document)
                    pipe.set(departure.key, document, ex=HISTORY_TTL_SECONDS)
                    changed += 1
                pipe.zadd(departure.series, {departure.key: score})
                pipe.expire(departure.series, HISTORY_TTL_SECONDS)
            pipe.execute()
        for departure in batch:
            self.known[departure.key] = (departure.track, departure.score)
        self.count("written", written)
        self.count("changes", changed)

    def tick(self, force_log: bool = False) -> None:
        """Flush when due (at once while Redis answers, on the backoff schedule while it
        does not) and write the interval's log line when it is time."""
        if self.pending and time.monotonic() >= self.next_write:
            self.flush()
        if force_log or time.monotonic() - self.last_log >= self.options.log_interval:
            self.log_interval()

    def log_interval(self) -> None:
        seconds = time.monotonic() - self.last_log
        self.interval["departures"] = len(self.departures_seen)
        parts = ", ".join(f"{self.interval[n]:,} {COUNTER_LABELS[n]}" for n in COUNTERS
                          if n != "dropped" or self.interval[n])  # fmt: skip
        log(f"{now_text()} last {seconds:.0f} s: {parts}; {len(self.pending):,} pending")
        self.interval.clear()
        self.departures_seen.clear()
        self.last_log = time.monotonic()
        self._forget_old()

    def _forget_old(self) -> None:
        """Drop memory of departures long gone, so a recorder can run for months."""
        horizon = self.clock() - REMEMBER_SECONDS
        for table in (self.known, self.keys):
            for name in [k for k, (_, score) in table.items() if score < horizon]:
                del table[name]

    # -- the API side ---------------------------------------------------------------

    def prediction_params(self) -> dict[str, str]:
        return {"filter[stop]": ",".join(self.options.stations),
                "filter[route_type]": COMMUTER_RAIL, "include": "stop,trip"}  # fmt: skip

    def get_waiting_out_limits(self, path: str, params: dict[str, str]) -> dict[str, Any]:
        """`api.get`, waiting out HTTP 429 until the window resets (then asking again)."""
        while True:
            try:
                return self.api.get(path, params)
            except RateLimited as exc:
                self.count("errors")
                self.wait_for_reset(exc)

    def wait_for_reset(self, exc: RateLimited) -> None:
        wait = (exc.reset_at - time.time()) if exc.reset_at else self.api_backoff.next_wait()
        wait = min(max(wait, 0.1), 3600.0)
        log(f"{now_text()} {exc}; waiting {wait:.0f} s for the limit to reset")
        self.sleep(wait)

    def load_stations(self) -> None:
        """Every track stop of the stations (`/stops/{parent}?include=child_stops`); the
        first request of a run, so a refused key or a dead API is known at once."""
        for station in self.options.stations:
            document = self.get_waiting_out_limits(f"/stops/{station}", {"include": "child_stops"})
            if not isinstance(document.get("data"), dict):
                raise ApiError(f"the MBTA API has no stop {station!r}")
            for resource in document.get("included") or []:
                self._safely(self.store.add, resource)

    def poll_once(self) -> None:
        """One pass: every current prediction at the stations."""
        document = self.get_waiting_out_limits("/predictions", self.prediction_params())
        try:
            self.observe_document(document)
        except Malformed:
            self.count("malformed")

    def stream_until_dropped(self, stop: threading.Event) -> None:
        """Read the predictions stream until it ends or fails (ApiError then)."""
        import httpx

        response = self.api.open_stream("/predictions", self.prediction_params())
        chunks: queue.Queue[Any] = queue.Queue(maxsize=256)  # ~16 MB at most, then TCP waits
        end = object()

        def hand_over(item: Any) -> None:
            while not stop.is_set():  # never block for good once the main thread has left
                try:
                    chunks.put(item, timeout=0.5)
                    return
                except queue.Full:
                    continue

        def pump() -> None:
            try:
                for chunk in response.iter_bytes():
                    hand_over(chunk)
                    if stop.is_set():
                        return
                hand_over(end)
            except Exception as exc:  # the stream failed: hand it to the main thread
                hand_over(exc)

        reader = threading.Thread(target=pump, name="sse-reader", daemon=True)
        reader.start()
        self.api_backoff.reset()

        def chunk_source() -> Iterator[bytes]:
            while True:
                try:
                    item = chunks.get(timeout=0.5)
                except queue.Empty:
                    self.tick()
                    continue
                if item is end:
                    return
                if isinstance(item, Exception):
                    if isinstance(item, httpx.HTTPError):
                        raise self.api._failure(item)
                    raise ApiError(f"stream failed: {type(item).__name__}")
                yield item

        try:
            for event, data in parse_sse(chunk_source()):
                self.observe_event(event, data)
                self.tick()
            raise StreamEnded("the stream ended")
        finally:
            stop.set()
            response.close()

    def run(self) -> None:
        """Poll or stream until Shutdown; reconnect with backoff after failures."""
        api_down = False
        reconnecting = False
        while True:
            try:
                if reconnecting or self.options.poll is not None:
                    self.poll_once()  # after a reconnect: catch up on what the stream missed
                if api_down:
                    log(f"{now_text()} the MBTA API answers again")
                    api_down = False
                self.tick()
                if self.options.poll is not None:
                    self.api_backoff.reset()
                    self.sleep(self.options.poll)
                    continue
                reconnecting = True
                self.stream_until_dropped(threading.Event())
            except ApiRefused:
                raise
            except RateLimited as exc:  # from opening the stream (polls wait it out inside)
                self.count("errors")
                self.wait_for_reset(exc)
                reconnecting = self.options.poll is None
                continue
            except ApiError as exc:
                if not isinstance(exc, StreamEnded):
                    self.count("errors")
                wait = self.api_backoff.next_wait()
                if not api_down:
                    log(f"{now_text()} MBTA API: {exc}; reconnecting with backoff")
                api_down = True
            self.count("reconnects")
            reconnecting = self.options.poll is None
            self.sleep(wait)

    def sleep(self, seconds: float) -> None:
        """Wait, still flushing and logging on time."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            time.sleep(min(left, 0.5))
            self.tick()

    def drain(self, grace: float) -> bool:
        """Write what is pending, retrying for up to `grace` seconds; True when all is in."""
        deadline = time.monotonic() + grace
        while self.pending:
            self.next_write = 0.0
            if self.flush():
                break
            if time.monotonic() >= deadline:
                return False
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
        return not self.pending

    def summary(self) -> str:
        parts = ", ".join(f"{self.total[n]:,} {COUNTER_LABELS[n]}" for n in COUNTERS
                          if n != "departures" and (n != "dropped" or self.total[n]))  # fmt: skip
        return parts


def _document_of(raw: bytes) -> dict[str, Any] | None:
    """A stored record's JSON object, or None when it is not one (dirty data)."""
    try:
        document = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return document if isinstance(document, dict) else None


#: The fields of a record that say when it departs (kept from the first record).
TIME_FIELDS = ("scheduled_time", "actual_time", "day_of_week", "hour", "minute")


def _moved_to_track(departure: Departure, old: dict[str, Any] | None) -> tuple[bytes, float]:
    """(JSON, score) of the record rewritten for a change of track: the new track and
    recorded time, the departure's time as first written (its key's date follows it)."""
    if old is None:
        return departure.document, departure.score
    try:
        score = dt.datetime.fromisoformat(old["scheduled_time"]).timestamp()
    except (TypeError, KeyError, ValueError):
        return departure.document, departure.score
    document = orjson.loads(departure.document)
    document.update({name: old[name] for name in TIME_FIELDS if name in old})
    return orjson.dumps(document), score


def now_text() -> str:
    """The time for a log line: UTC, to the second."""
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------


def _raise_shutdown(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # one request to stop is enough
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Shutdown


def parse_stations(text: str) -> tuple[str, ...]:
    stations = tuple(s.strip() for s in text.split(",") if s.strip())
    if not stations:
        raise UserError("--stations needs at least one parent stop id (e.g. place-sstat)")
    return stations


def record(api: MbtaClient, redis_target: RedisTarget, options: RecorderOptions) -> int:
    """Run the recorder; the exit code (0, or 1 when records could not be written)."""
    redis_client = redis_target.connect()
    recorder = TrackRecorder(api, redis_target, redis_client, options)
    mode = "one poll" if options.once else (
        f"polling every {options.poll:g} s" if options.poll is not None else "streaming")  # fmt: skip
    previous = {s: signal.signal(s, _raise_shutdown) for s in (signal.SIGTERM, signal.SIGINT)}
    code = 0
    try:
        try:
            try:
                recorder.load_stations()
            except ApiRefused as exc:
                raise UserError(str(exc)) from None
            except ApiError as exc:
                raise UserError(f"cannot reach the MBTA API at {api.base_url}: {exc}") from None
            log(f"{now_text()} recording {', '.join(options.stations)} from {api.base_url} "
                f"({mode}) into Redis at {redis_target.label} (track_history:*, "
                f"track_timeseries:*); one line every {options.log_interval:g} s")  # fmt: skip
            if options.once:
                recorder.poll_once()
            else:
                recorder.run()
        except ApiError as exc:  # the key refused mid-run, or --once's poll failed
            log(f"{now_text()} MBTA API: {exc}; stopping")
            code = 1
        except Shutdown:
            log(f"{now_text()} stopping: writing {len(recorder.pending):,} pending records")
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if not recorder.drain(options.shutdown_grace):
            log(f"{now_text()} {len(recorder.pending):,} records could not be written: Redis at "
                f"{redis_target.label} did not answer within {options.shutdown_grace:g} s")  # fmt: skip
            code = 1
        log(f"{now_text()} done: {recorder.summary()}")
        return code
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        redis_client.close()
        api.close()


@click.command(
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog=environment_epilog(ENV_REDIS, f"{API_KEY_VARIABLE} (the MBTA API key; see --api-key)"),
)
@click.option("--stations", default=",".join(STATIONS), show_default=True,
              help="Comma-separated parent stop ids to record.")  # fmt: skip
@click.option("--poll", type=click.FloatRange(min=0.1), default=None, metavar="SECONDS",
              help="Poll every SECONDS instead of streaming (the API suggests 15-60).")  # fmt: skip
@click.option("--once", is_flag=True, help="One polling pass: write what it finds, then exit.")
@click.option("--api-url", default=DEFAULT_API_URL, show_default=True, help="MBTA V3 API base URL.")
@click.option("--api-key", envvar=API_KEY_VARIABLE, default=None,
              help=f"MBTA V3 API key, sent as x-api-key [env: {API_KEY_VARIABLE}]; never printed.")  # fmt: skip
@redis_options
@click.option("--log-interval", type=click.FloatRange(min=0.1), default=60.0, show_default=True,
              help="Seconds between status lines.")  # fmt: skip
@click.option("--max-pending", type=click.IntRange(min=1), default=50_000, show_default=True,
              help="Records kept in memory while Redis is down (oldest dropped beyond this).")  # fmt: skip
@click.option("--timeout", type=click.FloatRange(min=0.1), default=15.0, show_default=True,
              help="Seconds to wait for an API answer (a stream may be quiet 90 s).")  # fmt: skip
def cli(stations: str, poll: float | None, once: bool, api_url: str, api_key: str | None,
        redis: RedisTarget, log_interval: float, max_pending: int, timeout: float) -> None:  # fmt: skip
    """Record commuter-rail track assignments from the MBTA V3 API into Redis."""
    if not api_url.startswith(("http://", "https://")):
        raise UserError("--api-url must start with http:// or https://")
    options = RecorderOptions(stations=parse_stations(stations), poll=poll, once=once,
                              log_interval=log_interval, max_pending=max_pending)  # fmt: skip
    redis.timeout = 5.0  # a recorder must notice a dead Redis in seconds, not minutes
    api = MbtaClient(api_url, api_key, timeout=timeout)
    sys.exit(record(api, redis, options))


if __name__ == "__main__":
    cli()
