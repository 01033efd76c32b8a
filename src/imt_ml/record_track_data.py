"""Record new track history from the MBTA V3 API into Redis, in the tracker's own layout.

The tracker stopped recording on 2026-02-10. For each commuter-rail departure at the four big
stations whose platform is known, this writes the record the tracker would have written
(docs/tracker-layout.md; API use: docs/mbta-v3.md), so the exporter reads old and new history
alike. Modes, track changes, Redis outages and signals: docs/recording-and-export.md.
"""

from __future__ import annotations

import collections
import contextlib
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

from imt_ml.utils import ENV_REDIS, RedisTarget, UserError, environment_epilog, log, redis_options

DEFAULT_API_URL = "https://api-v3.mbta.com"
API_KEY_VARIABLE = "IMT_MBTA_API_KEY"
#: South Station, North Station, Back Bay, Ruggles (parent stops).
STATIONS = ("place-sstat", "place-north", "place-bbsta", "place-rugg")
#: The tracker let each record and each sorted set expire a year after its last write.
HISTORY_TTL_SECONDS = 365 * 86_400
COMMUTER_RAIL = "2"  #: commuter rail in the V3 API's route_type filter
NOT_DEPARTING = frozenset({"CANCELLED", "SKIPPED"})  #: their predictions say nothing of a track
REMEMBER_SECONDS = 2 * 86_400  #: a departure is remembered (for changes) this long after its time


# -- The MBTA V3 API client (shared with the prediction service) ------------------------
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
    """JSON:API documents by GET, Server-Sent Events by a streaming GET. The key goes only
    in the `x-api-key` header and every error message passes `redact`: it is never printed."""

    def __init__(
        self, base_url: str = DEFAULT_API_URL, api_key: str | None = None, timeout: float = 15.0
    ) -> None:
        import httpx

        self.base_url, self.api_key = base_url.rstrip("/"), api_key or None
        headers = {"accept-encoding": "gzip", "user-agent": "imt-ml-recorder"}
        if self.api_key:
            headers["x-api-key"] = self.api_key
        # A stream is quiet between events; the server's keep-alive lines come well within 90 s.
        self._stream_timeout = httpx.Timeout(timeout, read=90.0)
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def redact(self, text: str) -> str:
        return text.replace(self.api_key, "***") if self.api_key else text

    def _failure(self, exc: Exception) -> ApiError:
        return ApiError(self.redact(f"{type(exc).__name__}: {exc}".rstrip(": ")))

    def _send(self, request: Any, stream: bool = False) -> Any:
        """The response to `request`; ApiRefused / RateLimited / ApiError otherwise."""
        import httpx

        try:
            response = self._http.send(request, stream=stream)
        except httpx.HTTPError as exc:
            raise self._failure(exc) from None
        status = response.status_code
        if status < 400:
            return response
        response.close()
        if status in (401, 403):
            raise ApiRefused(f"the MBTA API at {self.base_url} refused the API key (HTTP {status})")
        if status == 429:
            reset_at: float | None = None
            with contextlib.suppress(KeyError, ValueError):
                reset_at = float(response.headers["x-ratelimit-reset"])
            raise RateLimited(f"rate limited by {self.base_url} (HTTP 429)", reset_at)
        raise ApiError(f"HTTP {status} from {self.base_url}{response.url.path}")

    def get(self, path: str, params: dict[str, str] | None = None) -> dict[str, Any]:
        """The JSON:API document at `path`; ApiRefused / RateLimited / ApiError otherwise."""
        response = self._send(self._http.build_request("GET", path, params=params))
        try:
            document = orjson.loads(response.content)
        except orjson.JSONDecodeError:
            raise ApiError(f"{self.base_url}{path} answered with a body that is not JSON") from None
        if not isinstance(document, dict):
            raise ApiError(f"{self.base_url}{path} answered with JSON that is not a document")
        return document

    def open_stream(self, path: str, params: dict[str, str] | None = None) -> Any:
        """An open `text/event-stream` response; the caller reads `iter_bytes()`, closes it."""
        headers = {"accept": "text/event-stream"}
        request = self._http.build_request(
            "GET", path, params=params, headers=headers, timeout=self._stream_timeout
        )
        return self._send(request, stream=True)

    def close(self) -> None:
        self._http.close()


def parse_sse(chunks: Iterable[bytes]) -> Iterator[tuple[str, bytes]]:
    """(event, data) of each Server-Sent Event (data lines joined by newlines, as the SSE
    spec says); a keep-alive comment line yields ("", b"")."""
    buffer = b""
    event, data = "message", list[bytes]()
    for chunk in chunks:
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            line = line.removesuffix(b"\r")
            if not line:  # a blank line ends an event
                if data:
                    yield event, b"\n".join(data)
                event, data = "message", list[bytes]()
            elif line[0] == 58:  # b":" - a comment, the server's keep-alive
                yield "", b""
            else:
                name, _, value = line.partition(b":")
                value = value.removeprefix(b" ")
                if name == b"data":
                    data.append(value)
                elif name == b"event":
                    event = value.decode("utf-8", "replace")


# -- From V3 resources to the tracker's records ------------------------------------------
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
    return f"{trip_headsign} - {route_id.removeprefix('CR-')} Ln"


@dataclasses.dataclass(slots=True)
class Departure:
    """One departure with a known track, ready to write."""

    key: str
    series: str
    score: float
    track: str
    document: bytes


def _related_id(resource: dict[str, Any], name: str) -> str | None:
    data = ((resource.get("relationships") or {}).get(name) or {}).get("data")
    return data.get("id") if isinstance(data, dict) else None


class ResourceStore:
    """The stops and trips seen (the spec: read `platform_code`, `parent_station`; no ids)."""

    def __init__(self) -> None:
        self.stops: dict[str, tuple[str, str | None]] = {}  #: stop id -> (parent, platform or None)
        self.trips: dict[str, str] = {}  #: trip id -> the trip's headsign

    def add(self, resource: dict[str, Any]) -> None:
        """Remember a stop or trip resource; others are ignored. Malformed if unusable."""
        kind, rid = resource.get("type"), resource.get("id")
        attributes = resource.get("attributes") or {}
        if kind == "stop":
            code = attributes.get("platform_code")
            parent = _related_id(resource, "parent_station") or rid
            if not isinstance(rid, str) or not isinstance(parent, str):
                raise Malformed("stop without an id")
            self.stops[rid] = (parent, str(code) if code not in (None, "") else None)
        elif kind == "trip":
            headsign = attributes.get("headsign")
            if not isinstance(rid, str) or not isinstance(headsign, str):
                raise Malformed("trip without an id or headsign")
            self.trips[rid] = headsign


def departure_from_prediction(
    prediction: dict[str, Any], store: ResourceStore, stations: frozenset[str], now: float
) -> Departure | str | None:
    """The record a prediction makes; None if none (no track yet, another station,
    cancelled, gone); the trip id to wait for if that trip is unknown; else Malformed."""
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
    trip_id, route_id = _related_id(prediction, "trip"), _related_id(prediction, "route")
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
        "assignment_type": "historical", "track_number": track, "scheduled_time": text,
        "actual_time": text, "recorded_time": utc_text(dt.datetime.fromtimestamp(now, dt.UTC)),
        "day_of_week": weekday, "hour": hour, "minute": minute,
    }  # fmt: skip
    key = f"track_history:{station}:{route_id}:{trip_id}:{date}"
    series = f"track_timeseries:{station}:{route_id}"
    return Departure(key, series, timestamp, track, orjson.dumps(document))


#: The fields of a record that say when it departs (kept from the first record).
TIME_FIELDS = ("scheduled_time", "actual_time", "day_of_week", "hour", "minute")


def _moved_to_track(departure: Departure, old: dict[str, Any] | None) -> tuple[bytes, float]:
    """(JSON, score) of a record rewritten for a new track: the departure's time stays as
    first written (its key's date follows it), the track and recorded time are new."""
    if old is None:
        return departure.document, departure.score
    try:
        score = dt.datetime.fromisoformat(old["scheduled_time"]).timestamp()
    except (TypeError, KeyError, ValueError):
        return departure.document, departure.score
    document = orjson.loads(departure.document)
    document.update({name: old[name] for name in TIME_FIELDS if name in old})
    return orjson.dumps(document), score


# -- The recorder: observe, keep pending, write, tell -----------------------------------
class Shutdown(BaseException):
    """Raised in the main thread by SIGTERM/SIGINT."""


@dataclasses.dataclass
class RecorderOptions:
    """How the recorder runs (the command's options, once)."""

    stations: tuple[str, ...] = STATIONS
    poll: float | None = None  #: seconds between polls; None streams
    once: bool = False
    log_interval: float = 60.0
    max_pending: int = 50_000
    #: Seconds SIGTERM waits for an unreachable Redis before giving up on what is pending.
    shutdown_grace: float = 15.0
    max_backoff: float = 60.0  #: longest wait between reconnection attempts (API or Redis), s


#: Counter -> how the status lines name it, in their order.
COUNTER_LABELS = {
    "events": "events", "departures": "departures seen", "written": "records written",
    "changes": "track changes", "malformed": "malformed", "errors": "errors",
    "reconnects": "reconnects", "dropped": "dropped (pending full)",
}  # fmt: skip
WRITE_BATCH = 1000  #: pending records written per Redis round trip pair
#: While events stream in, write at most this often (seconds): a burst of new
#: departures becomes one pipeline instead of a round trip each.
WRITE_EVERY = 0.2


def counts_text(counter: collections.Counter[str], omit: str = "") -> str:
    """The counters for a status line ("dropped" only when some were)."""
    return ", ".join(f"{counter[n]:,} {label}" for n, label in COUNTER_LABELS.items()
                     if n != omit and (n != "dropped" or counter[n]))  # fmt: skip


def now_text() -> str:
    """The time for a log line: UTC, to the second."""
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


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


def _hand_over(chunks: queue.Queue[Any], stop: threading.Event, item: Any) -> None:
    """Put `item` in `chunks`, but never block for good once the main thread has left."""
    while not stop.is_set():
        with contextlib.suppress(queue.Full):
            chunks.put(item, timeout=0.5)
            return


def _pump(response: Any, chunks: queue.Queue[Any], stop: threading.Event) -> None:
    """The stream's reader thread: its chunks, then None (the end) or the exception."""
    try:
        for chunk in response.iter_bytes():
            _hand_over(chunks, stop, chunk)
            if stop.is_set():
                return
        _hand_over(chunks, stop, None)
    except Exception as exc:  # the stream failed: hand it to the main thread
        _hand_over(chunks, stop, exc)


class TrackRecorder:
    """Turns predictions into tracker records and writes them to Redis: `observe_*` feed it,
    `tick()` flushes when due and logs. Only the stream's socket is read in another thread."""

    def __init__(self, client: MbtaClient, redis_target: RedisTarget, redis_client: Any,
                 options: RecorderOptions) -> None:  # fmt: skip
        self.api, self.redis, self.redis_target = client, redis_client, redis_target
        self.options = options
        self.stations = frozenset(options.stations)
        self.store = ResourceStore()
        self.interval, self.total = collections.Counter[str](), collections.Counter[str]()
        self.departures_seen: set[str] = set()
        #: key -> Departure, in the order first seen (the oldest is dropped when full).
        self.pending: collections.OrderedDict[str, Departure] = collections.OrderedDict()
        self.known: dict[str, tuple[str, float]] = {}  #: key -> (track in Redis, scheduled time)
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

    def count(self, name: str, n: int = 1) -> None:
        self.interval[name] += n
        self.total[name] += n

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
        found = departure_from_prediction(prediction, self.store, self.stations, time.time())
        if found is None:
            return
        pid = prediction.get("id")
        if isinstance(found, str):  # its trip resource has not arrived yet
            self.waiting.setdefault(found, {})[str(pid)] = prediction
            return
        if isinstance(pid, str):
            first = self.keys.setdefault(pid, (found.key, found.score))
            if first[0] != found.key:  # same departure, its time moved across UTC midnight
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
        payload = None
        with contextlib.suppress(orjson.JSONDecodeError):
            payload = orjson.loads(data)
        if event == "reset" and isinstance(payload, list):
            self.waiting.clear()
            # Stops and trips first, then the predictions that name them.
            payload.sort(key=lambda r: isinstance(r, dict) and r.get("type") == "prediction")
            for resource in payload:
                self._safely(self.observe_resource, resource)
        elif event in ("add", "update") and payload is not None:
            self._safely(self.observe_resource, payload)
        elif event == "remove" and isinstance(payload, dict):
            for waiting in self.waiting.values():
                waiting.pop(str(payload.get("id")), None)
        else:  # JSON that does not parse, a payload of the wrong shape, an unknown event
            self.count("malformed")

    def _safely(self, observe: Callable[[Any], None], resource: Any) -> None:
        try:
            observe(resource)
        except Malformed:
            self.count("malformed")

    def flush(self) -> bool:
        """Write everything pending; False (and keep it) when Redis does not answer."""
        import redis

        label = self.redis_target.label
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
                log(f"{now_text()} Redis at {label} is not answering "
                    f"({self.redis_target.redact(str(exc)) or type(exc).__name__}); keeping "
                    f"{len(self.pending):,} records in memory until it does")  # fmt: skip
            self.redis_down = True
            self.next_write = time.monotonic() + self.redis_backoff.next_wait()
            return False
        if self.redis_down:
            log(f"{now_text()} Redis at {label} answers again; pending records written")
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
        counts: collections.Counter[str] = collections.Counter()
        with self.redis.pipeline(transaction=True) as pipe:
            for departure, old in zip(batch, existing, strict=True):
                old_document = None
                with contextlib.suppress(orjson.JSONDecodeError):  # also raised for None
                    old_document = orjson.loads(old)
                if not isinstance(old_document, dict):
                    old_document = None  # absent, or dirty data
                elif old_document.get("track_number") == departure.track:
                    continue  # already there with this track
                # New: SET NX, as the tracker did. A changed track: the record follows it.
                document, score = _moved_to_track(departure, old_document)
                pipe.set(departure.key, document, ex=HISTORY_TTL_SECONDS, nx=old is None)
                pipe.zadd(departure.series, {departure.key: score})
                pipe.expire(departure.series, HISTORY_TTL_SECONDS)
                counts["written" if old is None else "changes"] += 1
            pipe.execute()
        for departure in batch:
            self.known[departure.key] = (departure.track, departure.score)
        self.count("written", counts["written"])
        self.count("changes", counts["changes"])

    def tick(self) -> None:
        """Flush when due (at once, or on the backoff schedule while Redis is down); log."""
        if self.pending and time.monotonic() >= self.next_write:
            self.flush()
        if time.monotonic() - self.last_log >= self.options.log_interval:
            self.log_interval()

    def log_interval(self) -> None:
        seconds = time.monotonic() - self.last_log
        self.interval["departures"] = len(self.departures_seen)
        parts = counts_text(self.interval)
        log(f"{now_text()} last {seconds:.0f} s: {parts}; {len(self.pending):,} pending")
        self.interval.clear()
        self.departures_seen.clear()
        self.last_log = time.monotonic()
        # Forget departures long gone, so a recorder can run for months.
        horizon = time.time() - REMEMBER_SECONDS
        for table in (self.known, self.keys):
            for name in [k for k, (_, score) in table.items() if score < horizon]:
                del table[name]

    def prediction_params(self) -> dict[str, str]:
        return {"filter[stop]": ",".join(self.options.stations),
                "filter[route_type]": COMMUTER_RAIL, "include": "stop,trip"}  # fmt: skip

    def get_waiting_out_limits(self, path: str, params: dict[str, str]) -> dict[str, Any]:
        """`api.get`, waiting out HTTP 429 until the window resets (then asking again)."""
        while True:
            try:
                return self.api.get(path, params)
            except RateLimited as exc:
                self.wait_for_reset(exc)

    def wait_for_reset(self, exc: RateLimited) -> None:
        self.count("errors")
        wait = (exc.reset_at - time.time()) if exc.reset_at else self.api_backoff.next_wait()
        wait = min(max(wait, 0.1), 3600.0)
        log(f"{now_text()} {exc}; waiting {wait:.0f} s for the limit to reset")
        self.sleep(wait)

    def load_stations(self) -> None:
        """The stations' track stops: the run's first request, so a bad key shows at once."""
        for station in self.options.stations:
            document = self.get_waiting_out_limits(f"/stops/{station}", {"include": "child_stops"})
            if not isinstance(document.get("data"), dict):
                raise ApiError(f"the MBTA API has no stop {station!r}")
            for resource in document.get("included") or []:
                self._safely(self.store.add, resource)

    def poll_once(self) -> None:
        """One pass: every current prediction at the stations."""
        document = self.get_waiting_out_limits("/predictions", self.prediction_params())
        self._safely(self.observe_document, document)

    def stream_until_dropped(self) -> None:
        """Read the predictions stream until it ends or fails (ApiError then)."""
        response = self.api.open_stream("/predictions", self.prediction_params())
        chunks: queue.Queue[Any] = queue.Queue(maxsize=256)  # ~16 MB at most, then TCP waits
        stop = threading.Event()
        threading.Thread(target=_pump, args=(response, chunks, stop), name="sse-reader",
                         daemon=True).start()  # fmt: skip
        self.api_backoff.reset()
        try:
            for event, data in parse_sse(self._chunks(chunks)):
                self.observe_event(event, data)
                self.tick()
            raise StreamEnded("the stream ended")
        finally:
            stop.set()
            response.close()

    def _chunks(self, chunks: queue.Queue[Any]) -> Iterator[bytes]:
        """The stream's bytes from the reader thread, flushing and logging while none come."""
        import httpx

        while True:
            try:
                item = chunks.get(timeout=0.5)
            except queue.Empty:
                self.tick()
                continue
            if item is None:
                return
            if isinstance(item, httpx.HTTPError):
                raise self.api._failure(item)
            if isinstance(item, Exception):
                raise ApiError(f"stream failed: {type(item).__name__}")
            yield item

    def run(self) -> None:
        """Poll or stream until Shutdown; reconnect with backoff after failures."""
        api_down = reconnecting = False
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
                self.stream_until_dropped()
            except ApiRefused:
                raise
            except RateLimited as exc:  # from opening the stream (polls wait it out inside)
                self.wait_for_reset(exc)
            except ApiError as exc:
                if not isinstance(exc, StreamEnded):
                    self.count("errors")
                if not api_down:
                    log(f"{now_text()} MBTA API: {exc}; reconnecting with backoff")
                api_down = True
                self.count("reconnects")
                self.sleep(self.api_backoff.next_wait())
            reconnecting = self.options.poll is None

    def sleep(self, seconds: float) -> None:
        """Wait, still flushing and logging on time."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            time.sleep(min(left, 0.5))
            self.tick()

    def drain(self, grace: float) -> bool:
        """Write what is pending, retrying for up to `grace` seconds; True when all is in."""
        deadline = time.monotonic() + grace
        while self.pending and not self.flush():
            if time.monotonic() >= deadline:
                return False
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
        return True


# -- Command line ------------------------------------------------------------------------
def _ignore_stop_signals() -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


def _raise_shutdown(signum: int, frame: Any) -> None:
    _ignore_stop_signals()  # one request to stop is enough
    raise Shutdown


def record(api: MbtaClient, redis_target: RedisTarget, options: RecorderOptions) -> int:
    """Run the recorder; the exit code (0, or 1 when records could not be written)."""
    redis_client = redis_target.connect()
    recorder = TrackRecorder(api, redis_target, redis_client, options)
    mode = f"polling every {options.poll:g} s" if options.poll is not None else "streaming"
    mode = "one poll" if options.once else mode
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
            previous = {}  # exiting anyway: a second SIGTERM must not kill the clean exit
        _ignore_stop_signals()
        if not recorder.drain(options.shutdown_grace):
            log(
                f"{now_text()} {len(recorder.pending):,} records could not be written: Redis at "
                f"{redis_target.label} did not answer within {options.shutdown_grace:g} s"
            )
            code = 1
        log(f"{now_text()} done: {counts_text(recorder.total, omit='departures')}")
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
    parents = tuple(s.strip() for s in stations.split(",") if s.strip())
    if not parents:
        raise UserError("--stations needs at least one parent stop id (e.g. place-sstat)")
    options = RecorderOptions(stations=parents, poll=poll, once=once,
                              log_interval=log_interval, max_pending=max_pending)  # fmt: skip
    redis.timeout = 5.0  # a recorder must notice a dead Redis in seconds, not minutes
    sys.exit(record(MbtaClient(api_url, api_key, timeout=timeout), redis, options))


if __name__ == "__main__":
    cli()
