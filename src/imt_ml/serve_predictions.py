"""Serve track predictions: the tracker's HTTP API and its Redis queue, from one model.

The Inky MBTA Tracker used to answer track predictions over HTTP and to ask an ML
worker through a Redis queue; it removed both on 2026-02-10. This one process does
both, for the clients written against them (mbta-mcp, the tracker's page and
displays, the tracker's own last ML-era code):

    uv run src/imt_ml/serve_predictions.py --model output/train_.../track_prediction_model_best.keras
    uv run src/imt_ml/serve_predictions.py --model ./registry        # follows `current`
    curl -X POST 'http://127.0.0.1:8080/predictions?station_id=place-sstat&route_id=CR-Worcester&trip_id=CR-Weekday-Fall-26-520&headsign=Worcester&direction_id=0&scheduled_time=2026-12-02T17:35:00-05:00'

HTTP (FastAPI + uvicorn; OpenAPI docs at /docs): POST /predictions (JSON body or
query parameters), POST /chained-predictions, GET /stats/{station}/{route}, GET
/historical/{station}/{route}?days=, POST /predictions/date, /healthz, /model,
/metrics. The queue: requests LPUSHed on `ml:track_predict:requests`, answers under
`ml:track_predict:result:{id}` and `...latest:...`, plus the `track_prediction:...`
record the tracker's own ML worker wrote. Every answer is kept in Redis and scored
against the track later recorded (by `record_track_data.py` or a tracker): that is
the live accuracy in /stats, /metrics and each answer's `accuracy`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import datetime as dt
import functools
import gc
import math
import os
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Annotated, Any

import click
import orjson
from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

if __package__ in (None, ""):  # run by path: `uv run src/imt_ml/serve_predictions.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imt_ml.utils import (
    ENV_REDIS,
    ENV_TF_LOG,
    ModelRegistry,
    RedisTarget,
    UserError,
    dataclass_options,
    environment_epilog,
    log,
    option_field,
    parse_instant,
    redis_options,
)

#: Stations with track predictions, and the child stop families that belong to each
#: (a request may name `NEC-2287` or `NEC-2287-05` for South Station).
STATION_FAMILIES = {
    "NEC-2287": "place-sstat", "BNT-0000": "place-north", "NEC-2276": "place-bbsta",
    "WML-0012": "place-bbsta", "NEC-2265": "place-rugg",
}  # fmt: skip
SERVED_STATIONS = ("place-sstat", "place-north", "place-bbsta", "place-rugg")
UNAVAILABLE = "Predictions are not available for this station"
#: The tracker's limits per client address and minute, by endpoint group.
DEFAULT_RATE_LIMITS = "predictions=100,chained=200,stats=50,historical=50,date=15"
MAX_CHAINED = 500
#: The tracker's own ML worker wrote its answers under track_prediction:... with this
#: method and expiry; its display reads them for trips without history.
TRACKER_PREDICTION_METHOD = "ml_ensemble"
TRACK_PREDICTION_TTL = 60 * 86_400
SERVED_PREFIX = "imt:served:"
SERVED_INDEX = "imt:served:index"
LIVE_PREFIX = "imt:live:"
LIVE_KEYS = "imt:live:keys"
#: Answers kept for scoring this long; an answer whose track was never recorded by then
#: is dropped unscored.
SERVED_TTL = 3 * 86_400
CALIBRATION_BINS = 10


def parent_station(stop_id: str) -> str:
    """The parent `place-...` id of a stop id (`NEC-2287-05` -> `place-sstat`)."""
    if stop_id.startswith("place-"):
        return stop_id
    family = "-".join(stop_id.split("-")[:2])
    return STATION_FAMILIES.get(family, stop_id)


def utc_date(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).date().isoformat()


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat()


# ---------------------------------------------------------------------------
# Options.
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class ServeOptions:
    """Everything the service is told, once (each field is a command-line option)."""

    # fmt: off
    http_host: str = option_field("127.0.0.1", "Address the HTTP API listens on.")
    http_port: int = option_field(8080, "Port of the HTTP API.", click.IntRange(0, 65535))
    no_http: bool = option_field(False, "Answer only the Redis queue.")
    no_queue: bool = option_field(False, "Answer only HTTP.")
    min_confidence: float = option_field(0.25,
        "Queue answers below this confidence are not written (the tracker's worker "
        "dropped them too).", click.FloatRange(0, 1))
    rate_limits: str = option_field(DEFAULT_RATE_LIMITS,
        "Requests a client address may make a minute, by endpoint group.")
    no_rate_limit: bool = option_field(False, "No rate limits at all (benchmarks, trusted networks).")
    cors_origins: str = option_field("", "Comma-separated origins allowed by CORS (* for any).")
    max_body_bytes: int = option_field(1_048_576, "Largest request body accepted (HTTP 413 beyond).",
                                       click.IntRange(min=1))
    cache_seconds: float = option_field(3600.0, "Seconds an answer is reused for the same request.",
                                        click.FloatRange(min=0))
    api_url: str = option_field("https://api-v3.mbta.com", "MBTA V3 API (for /predictions/date).")
    api_key: str | None = option_field(None, "MBTA V3 API key [env: IMT_MBTA_API_KEY]; never printed.",
                                       envvar="IMT_MBTA_API_KEY")
    watch_interval: float = option_field(1.0, "Seconds between looks at a registry's `current`.",
                                         click.FloatRange(min=0.05))
    score_interval: float = option_field(30.0,
        "Seconds between comparisons of served answers with recorded tracks.",
        click.FloatRange(min=0.1))
    requests_key: str = option_field("ml:track_predict:requests",
                                     "Redis list the tracker LPUSHes requests on.")
    processing_key: str = option_field("ml:track_predict:processing",
        "Redis list holding requests taken but not yet answered.")
    result_prefix: str = option_field("ml:track_predict:result:",
                                      "Result key prefix; the request id follows.")
    latest_prefix: str = option_field("ml:track_predict:latest:",
        "Latest-result key prefix; station:route:direction:unix seconds follow.")
    result_ttl: int = option_field(86_400, "Seconds before a queue result expires.",
                                   click.IntRange(min=1))
    max_batch: int = option_field(256, "Most queue requests answered in one model call.",
                                  click.IntRange(min=1))
    log_interval: float = option_field(60.0, "Seconds between status lines.", click.FloatRange(min=0.1))
    # fmt: on

    def limits(self) -> dict[str, int]:
        """--rate-limits as {group: requests a minute}; UserError when malformed."""
        limits = {}
        for part in filter(None, (p.strip() for p in self.rate_limits.split(","))):
            name, _, value = part.partition("=")
            if (
                name not in ("predictions", "chained", "stats", "historical", "date")
                or not value.isdigit()
            ):
                raise UserError(f"--rate-limits: {part!r} is not GROUP=N (groups: predictions, "
                                "chained, stats, historical, date)")  # fmt: skip
            limits[name] = int(value)
        return limits


# ---------------------------------------------------------------------------
# The model: loaded, warmed up, swapped when a registry's `current` moves.
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class LoadedModel:
    """One model ready to answer, with what the answers need besides probabilities."""

    predictor: Any  # tfrecord_reader.TrackPredictor
    version: str
    path: Path
    metadata: dict[str, Any]
    #: "station|train number" -> training records, "station|route" -> training records
    counts: dict[str, dict[str, int]]
    loaded_at: str
    #: queue protocol: class j is track `track_index[j] + 1`
    track_index: Any
    num_tracks: int

    @property
    def method(self) -> str:
        return f"imt-ml model {self.version}"

    def historical_matches(self, station: str, trip_id: str, route: str) -> int:
        """Training records behind an answer: the station + train number's, else the
        station + route's."""
        train = trip_id.rsplit("-", 1)[-1] if trip_id else ""
        found = self.counts.get("station_train", {}).get(f"{station}|{train}")
        if found is None:
            found = self.counts.get("station_route", {}).get(f"{station}|{route}", 0)
        return int(found)


def load_model(path: Path, version: str, metadata: dict[str, Any] | None = None) -> LoadedModel:
    """Load a `.keras` model with its vocabulary and metadata, and warm it up so the first
    answer is as fast as the rest."""
    import json

    import numpy as np

    from imt_ml import tfrecord_reader as tr

    predictor = tr.load_predictor(path)
    vocab = {}
    for candidate in (tr.vocab_file_for(path), path.with_name("model_vocab.json")):
        if candidate.is_file():
            vocab = json.loads(candidate.read_text())
            break
    if metadata is None:
        summary = path.with_name(
            tr.vocab_file_for(path).name.replace("_vocab.json", "_summary.json")
        )
        metadata = json.loads(summary.read_text()) if summary.is_file() else {}
        metadata.setdefault("periods", vocab.get("split", {}))
    counts = (vocab.get("baselines") or {}).get("record_counts") or {}
    labels = predictor.labels
    track_index = np.array([int(label) - 1 for label in labels])
    station = next(iter(sorted(predictor.stations)), "place-sstat")
    warm = {"station_id": station, "route_id": "", "trip_id": "", "headsign": "",
            "direction_id": 0, "scheduled_timestamp": time.time()}  # fmt: skip
    for size in (1, 2, 8, 64):  # trace and run once; later calls reuse the graph
        predictor.both_probabilities([warm] * size)
    # TensorFlow and Keras leave millions of long-lived objects; a full garbage collection
    # walking them stalled every request in flight for ~250 ms. Frozen, the collector
    # skips them (the objects of a model swapped out later are not reclaimed: a few MB).
    gc.collect()
    gc.freeze()
    return LoadedModel(predictor, version, path, metadata, counts, now_iso(), track_index,
                       int(track_index.max()) + 1)  # fmt: skip


class ModelHolder:
    """The model that answers now. With a registry it looks at `current` every
    `interval` seconds and, when it moved, loads and warms the new version beside the
    old, then swaps the reference: a request holds the model it started with, so none
    fails or waits during a swap."""

    def __init__(self, source: Path) -> None:
        self.source = Path(source)
        self.registry = ModelRegistry(source) if ModelRegistry.looks_like(source) else None
        self.current: LoadedModel = self._load_initial()
        self.swaps = 0
        self._stop = threading.Event()

    def _load_initial(self) -> LoadedModel:
        if self.registry is None:
            if self.source.is_dir():
                raise UserError(f"{self.source} is neither a .keras file nor a model registry "
                                "(a directory with versions/ and current)")  # fmt: skip
            return load_model(self.source, self.source.stem)
        version = self.registry.current_version()
        if version is None:
            raise UserError(f"the model registry {self.source} has no current version yet "
                            "(install one: keep_model_current.py - promote --registry DIR --model FILE)")  # fmt: skip
        return load_model(self.registry.model_file(version), str(version),
                          self.registry.metadata(version))  # fmt: skip

    def check(self) -> bool:
        """Swap in the registry's current version if it changed; True when swapped."""
        if self.registry is None:
            return False
        version = self.registry.current_version()
        if version is None or str(version) == self.current.version:
            return False
        loaded = load_model(self.registry.model_file(version), str(version),
                            self.registry.metadata(version))  # fmt: skip
        previous, self.current = self.current.version, loaded
        self.swaps += 1
        log(f"{now_iso()} model {previous} -> {loaded.version} ({loaded.path})")
        return True

    def watch(self, interval: float) -> threading.Thread:
        def loop() -> None:
            while not self._stop.wait(interval):
                try:
                    self.check()
                except Exception as exc:  # a broken version: keep answering with the old one
                    log(f"{now_iso()} cannot load the registry's current version: "
                        f"{type(exc).__name__}: {str(exc)[:200]}; still serving {self.current.version}")  # fmt: skip
                    self._stop.wait(max(interval, 10.0))

        thread = threading.Thread(target=loop, name="model-watch", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()


# ---------------------------------------------------------------------------
# Answers: one request in, one TrackPrediction out.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class Asked:
    """A usable prediction request, normalised."""

    station_id: str
    route_id: str
    trip_id: str
    headsign: str
    direction_id: int
    scheduled_time: str  # as echoed: the request's instant in its own offset (Boston if none)
    timestamp: float

    def features(self) -> dict[str, Any]:
        return {"station_id": self.station_id, "route_id": self.route_id, "trip_id": self.trip_id,
                "headsign": self.headsign, "direction_id": self.direction_id,
                "scheduled_timestamp": self.timestamp}  # fmt: skip

    def cache_key(self) -> tuple:
        return (self.station_id, self.route_id, self.trip_id, self.headsign, self.direction_id,
                self.timestamp)  # fmt: skip


def echo_time(text: str, timestamp: float) -> str:
    """The requested time as an aware ISO string (a time without an offset gets Boston's)."""
    from zoneinfo import ZoneInfo

    parsed = dt.datetime.fromisoformat(text.strip())
    if parsed.tzinfo is None:
        parsed = dt.datetime.fromtimestamp(timestamp, ZoneInfo("America/New_York"))
    return parsed.isoformat().replace("+00:00", "Z")  # UTC as pydantic writes it


def asked_from(doc: dict[str, Any]) -> Asked:
    """An Asked from a request's fields (the tracker's PredictionRequest); ValueError with
    the reason when unusable."""
    for name in ("station_id", "route_id", "scheduled_time", "direction_id"):
        if doc.get(name) in (None, ""):
            raise ValueError(f"missing field {name}")
    direction = doc["direction_id"]
    if isinstance(direction, str) and direction.strip() in ("0", "1"):
        direction = int(direction)  # mbta-mcp sends query parameters: strings
    if type(direction) is not int or direction not in (0, 1):
        raise ValueError("direction_id must be 0 or 1")
    for name in ("station_id", "route_id", "trip_id", "headsign", "scheduled_time"):
        if doc.get(name) is not None and not isinstance(doc[name], str):
            raise ValueError(f"{name} must be a string")
    try:
        timestamp = parse_instant(doc["scheduled_time"])
        echoed = echo_time(doc["scheduled_time"], timestamp)
    except (ValueError, OverflowError):
        raise ValueError(
            f"scheduled_time {doc['scheduled_time']!r} is not an ISO 8601 time"
        ) from None
    return Asked(parent_station(doc["station_id"].strip()), doc["route_id"].strip(),
                 (doc.get("trip_id") or "").strip(), (doc.get("headsign") or "").strip(),
                 direction, echoed, timestamp)  # fmt: skip


@dataclasses.dataclass(slots=True)
class Answer:
    """The model's part of an answer (what the cache keeps)."""

    track: str
    confidence: float
    model_confidence: float
    matches: int
    version: str


def answers_from_probabilities(loaded: LoadedModel, asked: list[Asked], calibrated: Any,
                               raw: Any) -> list[Answer]:  # fmt: skip
    labels = loaded.predictor.labels
    best = calibrated.argmax(axis=1)
    return [
        Answer(labels[j], float(calibrated[i, j]), float(raw[i, j]),
               loaded.historical_matches(a.station_id, a.trip_id, a.route_id), loaded.version)
        for i, (a, j) in enumerate(zip(asked, best, strict=True))
    ]  # fmt: skip


def display_confidence(confidence: float) -> float:
    """What a display should show: the calibrated probability rounded *down* to a 5%
    step, so a display never claims more than the model does (0.83 shows as 0.80)."""
    return math.floor(confidence * 20 + 1e-9) / 20


def track_prediction(asked: Asked, answer: Answer, accuracy: float, method: str,
                     created_at: str) -> dict[str, Any]:  # fmt: skip
    """The tracker's TrackPrediction, every field filled honestly."""
    return {
        "station_id": asked.station_id, "route_id": asked.route_id, "trip_id": asked.trip_id,
        "headsign": asked.headsign, "direction_id": asked.direction_id,
        "scheduled_time": asked.scheduled_time, "track_number": answer.track,
        "confidence_score": round(answer.confidence, 6), "accuracy": round(accuracy, 6),
        "model_confidence": round(answer.model_confidence, 6),
        "display_confidence": display_confidence(answer.confidence),
        "prediction_method": method, "historical_matches": answer.matches,
        "created_at": created_at,
    }  # fmt: skip


class AnswerCache:
    """Answers reused for the same request and model for `ttl` seconds (the tracker
    cached for an hour); at most `size` entries, least recently used dropped."""

    def __init__(self, ttl: float, size: int = 100_000) -> None:
        self.ttl, self.size = ttl, size
        self.entries: collections.OrderedDict[tuple, tuple[float, Answer]] = (
            collections.OrderedDict()
        )

    def get(self, version: str, asked: Asked) -> Answer | None:
        if self.ttl <= 0:
            return None
        key = (version, *asked.cache_key())
        found = self.entries.get(key)
        if found is None or found[0] < time.monotonic():
            return None
        self.entries.move_to_end(key)
        return found[1]

    def put(self, asked: Asked, answer: Answer) -> None:
        if self.ttl <= 0:
            return
        self.entries[(answer.version, *asked.cache_key())] = (time.monotonic() + self.ttl, answer)
        if len(self.entries) > self.size:
            self.entries.popitem(last=False)


# ---------------------------------------------------------------------------
# Live accuracy: every answer kept, scored against the track recorded later.
# ---------------------------------------------------------------------------


class LiveAccuracy:
    """Keeps served answers in Redis (`imt:served:{station}:{route}:{trip}:{UTC date}`, a
    hash of model version -> answer, expiring after 3 days, indexed by scheduled time)
    and, every `score_interval`, compares those whose departure has passed with
    `track_history:` under the same suffix. Outcomes add up per model version, station
    and route in `imt:live:{version}:{station}:{route}` hashes (totals, hits, tracks
    and calibration bins), which survive restarts. Writes are buffered and made by a
    background thread, so an answer never waits for Redis."""

    def __init__(self, target: RedisTarget, score_interval: float) -> None:
        self.target = target
        self.score_interval = score_interval
        self.buffer: collections.deque[tuple[str, float, str, bytes]] = collections.deque(
            maxlen=200_000
        )
        #: (version, station, route) -> the counters of that hash, as numbers
        self.table: dict[tuple[str, str, str], dict[str, float]] = {}
        self.redis_ok = True
        self.scored = 0
        self._stop = threading.Event()
        self._client: Any = None

    def served(self, asked: Asked, answer: Answer) -> None:
        """Keep an answer for scoring (answers without a trip id cannot be matched)."""
        if not asked.trip_id:
            return
        suffix = f"{asked.station_id}:{asked.route_id}:{asked.trip_id}:{utc_date(asked.timestamp)}"
        value = orjson.dumps({"track": answer.track, "p": round(answer.confidence, 6)})
        self.buffer.append((suffix, asked.timestamp, answer.version, value))

    # -- reading ---------------------------------------------------------------

    def accuracy(self, version: str, station: str, route: str) -> float:
        row = self.table.get((version, station, route))
        return row["correct"] / row["total"] if row and row.get("total") else 0.0

    def stats(self, version: str, station: str, route: str) -> dict[str, Any]:
        row = self.table.get((version, station, route), {})
        total, correct = int(row.get("total", 0)), int(row.get("correct", 0))
        by_track = {
            k.removeprefix("track:"): int(v) for k, v in row.items() if k.startswith("track:")
        }
        return {"total_predictions": total, "correct_predictions": correct,
                "accuracy_rate": correct / total if total else 0.0,
                "expected_calibration_error": self.ece(row),
                "mean_confidence": row.get("confidence_sum", 0.0) / total if total else 0.0,
                "last_updated": dt.datetime.fromtimestamp(row["updated"], dt.UTC).isoformat()
                if row.get("updated") else None,
                "prediction_counts_by_track": dict(sorted(by_track.items(), key=lambda kv: int(kv[0])
                                                          if kv[0].isdigit() else 999))}  # fmt: skip

    @staticmethod
    def ece(row: dict[str, float]) -> float | None:
        total = row.get("total", 0)
        if not total:
            return None
        error = 0.0
        for b in range(CALIBRATION_BINS):
            n = row.get(f"bin{b}:n", 0)
            if n:
                error += (
                    abs(row.get(f"bin{b}:confidence", 0) - row.get(f"bin{b}:correct", 0)) / total
                )
        return error

    # -- the background thread ---------------------------------------------------

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self._loop, name="live-accuracy", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        next_score = 0.0
        while True:
            stopping = self._stop.wait(1.0)
            try:
                while self.buffer:  # small pipelines: the answering threads wait less for the GIL
                    self.flush()
                    time.sleep(0.001)
                if time.monotonic() >= next_score or stopping:
                    self.score()
                    self.refresh()
                    next_score = time.monotonic() + self.score_interval
                if not self.redis_ok:
                    log(f"{now_iso()} live accuracy: Redis at {self.target.label} answers again")
                self.redis_ok = True
            except Exception as exc:
                if self.redis_ok:
                    log(f"{now_iso()} live accuracy: Redis at {self.target.label} failed "
                        f"({self.target.redact(str(exc))[:200]}); answers wait in memory")  # fmt: skip
                self.redis_ok = False
                self._client = None
            if stopping:
                return

    def client(self) -> Any:
        if self._client is None:
            self._client = self.target.connect()
        return self._client

    def flush(self) -> None:
        """Write buffered answers (one pipeline); on failure they stay buffered."""
        if not self.buffer:
            return
        batch = [self.buffer.popleft() for _ in range(min(len(self.buffer), 500))]
        try:
            pipe = self.client().pipeline(transaction=False)
            for suffix, timestamp, version, value in batch:
                pipe.hset(SERVED_PREFIX + suffix, version, value)
                pipe.expire(SERVED_PREFIX + suffix, SERVED_TTL)
                pipe.zadd(SERVED_INDEX, {suffix: timestamp})
            pipe.execute()
        except Exception:
            self.buffer.extendleft(reversed(batch))
            raise

    def score(self, now: float | None = None) -> int:
        """Compare answers whose departure has passed with the recorded tracks."""
        client = self.client()
        now = time.time() if now is None else now
        scored = 0
        while True:
            due = client.zrangebyscore(
                SERVED_INDEX, "-inf", now, start=0, num=2000, withscores=True
            )
            if not due:
                return scored
            pipe = client.pipeline(transaction=False)
            for member, _ in due:
                pipe.get(b"track_history:" + member)
                pipe.hgetall(SERVED_PREFIX.encode() + member)
            replies = pipe.execute()
            updates = client.pipeline(transaction=True)
            done = 0
            for (member, timestamp), recorded, answers in zip(due, replies[::2], replies[1::2],
                                                                strict=True):  # fmt: skip
                track = _recorded_track(recorded)
                if track is None and timestamp > now - SERVED_TTL:
                    continue  # not recorded yet: look again next time
                station, route = member.decode().split(":")[:2]
                for version, value in (answers or {}).items():
                    if track is None:
                        break
                    answer = orjson.loads(value)
                    self._add_outcome(updates, version.decode(), station, route, answer, track, now)
                    scored += 1
                updates.zrem(SERVED_INDEX, member)
                updates.delete(SERVED_PREFIX.encode() + member)
                done += 1
            updates.execute()
            self.scored += scored
            if done == 0:  # everything due is still waiting for its record
                return scored

    @staticmethod
    def _add_outcome(pipe: Any, version: str, station: str, route: str, answer: dict[str, Any],
                     track: str, now: float) -> None:  # fmt: skip
        key = f"{LIVE_PREFIX}{version}:{station}:{route}"
        hit = int(answer["track"] == track)
        confidence = float(answer["p"])
        b = min(int(confidence * CALIBRATION_BINS), CALIBRATION_BINS - 1)
        pipe.hincrby(key, "total", 1)
        pipe.hincrby(key, "correct", hit)
        pipe.hincrbyfloat(key, "confidence_sum", confidence)
        pipe.hincrby(key, f"track:{answer['track']}", 1)
        pipe.hincrby(key, f"bin{b}:n", 1)
        pipe.hincrby(key, f"bin{b}:correct", hit)
        pipe.hincrbyfloat(key, f"bin{b}:confidence", confidence)
        pipe.hset(key, "updated", now)
        pipe.sadd(LIVE_KEYS, key)

    def refresh(self) -> None:
        """Read every live-accuracy hash into memory (answers use it without Redis)."""
        client = self.client()
        keys = sorted(client.smembers(LIVE_KEYS))
        pipe = client.pipeline(transaction=False)
        for key in keys:
            pipe.hgetall(key)
        table = {}
        for key, row in zip(keys, pipe.execute(), strict=True):
            version, station, route = key.decode().removeprefix(LIVE_PREFIX).rsplit(":", 2)
            table[(version, station, route)] = {k.decode(): float(v) for k, v in row.items()}
        self.table = table


def _json_field(raw: bytes | None, name: str) -> Any:
    """One field of a stored JSON object; None when absent or the value is not one."""
    if raw is None:
        return None
    try:
        return orjson.loads(raw).get(name)
    except (orjson.JSONDecodeError, AttributeError):
        return None


def _recorded_track(raw: bytes | None) -> str | None:
    track = _json_field(raw, "track_number")
    return track.lstrip("0") or None if isinstance(track, str) else None


# ---------------------------------------------------------------------------
# The service: what HTTP and the queue share.
# ---------------------------------------------------------------------------


class RateLimiter:
    """Fixed one-minute windows per client address and endpoint group."""

    def __init__(self, limits: dict[str, int]) -> None:
        self.limits = limits
        self.window = 0
        self.counts: collections.Counter[tuple[str, str]] = collections.Counter()

    def allow(self, client: str, group: str) -> float | None:
        """None when allowed, else the seconds until the window reopens."""
        limit = self.limits.get(group)
        if limit is None:
            return None
        now = time.time()
        window = int(now // 60)
        if window != self.window:
            self.window, self.counts = window, collections.Counter()
        self.counts[(client, group)] += 1
        return None if self.counts[(client, group)] <= limit else 60 - now % 60


class PredictionService:
    """The loaded model, the answer cache, live accuracy and the metrics, shared by the
    HTTP API and the queue worker."""

    def __init__(self, holder: ModelHolder, live: LiveAccuracy, redis_target: RedisTarget,
                 options: ServeOptions) -> None:  # fmt: skip
        from imt_ml.record_track_data import MbtaClient

        self.holder = holder
        self.live = live
        self.redis_target = redis_target
        self.options = options
        self.cache = AnswerCache(options.cache_seconds)
        self.limiter = None if options.no_rate_limit else RateLimiter(options.limits())
        self.mbta = MbtaClient(options.api_url, options.api_key)
        self.date_cache: dict[tuple[str, str], tuple[float, dict[str, Any]]] = {}
        self.metrics = Metrics(self)
        self._redis: Any = None
        self._redis_lock = threading.Lock()
        self.batcher: Batcher | None = None

    def redis(self) -> Any:
        with self._redis_lock:
            if self._redis is None:
                self._redis = self.redis_target.connect()
            return self._redis

    def drop_redis(self) -> None:
        """Forget the connection (after a failure): the next use makes a new one."""
        with self._redis_lock:
            self._redis = None

    def split_known(self, loaded: LoadedModel, asked: list[Asked]) -> list[Answer | None]:
        """Cached answers, None where the model must be asked."""
        return [self.cache.get(loaded.version, a) for a in asked]

    def finish(
        self, loaded: LoadedModel, asked: list[Asked], answers: list[Answer]
    ) -> list[dict[str, Any]]:
        """TrackPredictions for answered requests; each kept for live accuracy."""
        created = now_iso()
        out = []
        for a, answer in zip(asked, answers, strict=True):
            self.cache.put(a, answer)
            self.live.served(a, answer)
            self.metrics.prediction(a.station_id)
            accuracy = self.live.accuracy(answer.version, a.station_id, a.route_id)
            out.append(
                track_prediction(a, answer, accuracy, f"imt-ml model {answer.version}", created)
            )
        return out

    async def answer(self, asked: list[Asked]) -> list[dict[str, Any]]:
        """The HTTP answers, in order: `{"success": true, "prediction": {...}}` or
        `{"success": false, "prediction": UNAVAILABLE}`."""
        loaded = self.holder.current
        known = [a.station_id in loaded.predictor.stations for a in asked]
        usable = [a for a, k in zip(asked, known, strict=True) if k]
        answers = self.split_known(loaded, usable)
        missing = [a for a, found in zip(usable, answers, strict=True) if found is None]
        if missing:
            assert self.batcher is not None
            model, calibrated, raw = await self.batcher.predict([a.features() for a in missing])
            fresh = iter(answers_from_probabilities(model, missing, calibrated, raw))
            answers = [found or next(fresh) for found in answers]
        done = iter(self.finish(loaded, usable, answers))  # type: ignore[arg-type]
        return [{"success": True, "prediction": next(done)} if k
                else {"success": False, "prediction": UNAVAILABLE} for k in known]  # fmt: skip


class Batcher:
    """Requests that arrive while the model is busy are answered together in its next
    call: one model call per burst instead of one per request. Runs on the event loop;
    the model itself runs in one worker thread."""

    def __init__(self, holder: ModelHolder) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.holder = holder
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="model")
        self.waiting: list[tuple[list[dict[str, Any]], asyncio.Future]] = []
        self.running = False

    async def predict(self, features: list[dict[str, Any]]) -> tuple[LoadedModel, Any, Any]:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.waiting.append((features, future))
        if not self.running:
            self.running = True
            loop.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self.waiting:
                jobs, self.waiting = self.waiting, []
                loaded = self.holder.current
                features = [f for batch, _ in jobs for f in batch]
                try:
                    calibrated, raw = await loop.run_in_executor(
                        self.executor, loaded.predictor.both_probabilities, features)  # fmt: skip
                except Exception as exc:
                    for _, future in jobs:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                start = 0
                for batch, future in jobs:
                    end = start + len(batch)
                    if not future.done():
                        future.set_result((loaded, calibrated[start:end], raw[start:end]))
                    start = end
        finally:
            self.running = False


# ---------------------------------------------------------------------------
# Metrics (Prometheus text at /metrics).
# ---------------------------------------------------------------------------


class LiveCollector:
    """Metrics read when scraped: the model answering, swaps, live accuracy by version,
    station and route."""

    def __init__(self, service: PredictionService) -> None:
        self.service = service

    def collect(self) -> Any:
        from prometheus_client.core import GaugeMetricFamily

        service = self.service
        loaded = service.holder.current
        info = GaugeMetricFamily("imt_model_info", "The model answering now", labels=["version"])
        info.add_metric([loaded.version], 1.0)
        yield info
        swaps = GaugeMetricFamily("imt_model_swaps", "Models swapped in since start")
        swaps.add_metric([], float(service.holder.swaps))
        yield swaps
        labels = ["version", "station", "route"]
        accuracy = GaugeMetricFamily("imt_live_accuracy", "Share of scored answers whose "
                                     "track was the one recorded", labels=labels)  # fmt: skip
        scored = GaugeMetricFamily("imt_live_scored", "Answers scored against a recorded "
                                   "track", labels=labels)  # fmt: skip
        ece = GaugeMetricFamily("imt_live_ece", "Expected calibration error of scored "
                                "answers (10 bins)", labels=labels)  # fmt: skip
        for (version, station, route), row in sorted(service.live.table.items()):
            if row.get("total"):
                accuracy.add_metric([version, station, route], row["correct"] / row["total"])
                scored.add_metric([version, station, route], row["total"])
                ece.add_metric([version, station, route], LiveAccuracy.ece(row) or 0.0)
        yield accuracy
        yield scored
        yield ece


class Metrics:
    """Requests and latency by endpoint, predictions by station, the model version and
    live accuracy, in a registry of this service's own."""

    def __init__(self, service: PredictionService) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("imt_http_requests_total", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=self.registry)  # fmt: skip
        self.latency = Histogram("imt_http_request_seconds", "HTTP request latency by endpoint",
                                 ["endpoint"], registry=self.registry,
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                                          1.0, 2.5))  # fmt: skip
        self.predictions = Counter("imt_predictions_total", "Predictions answered by station",
                                   ["station"], registry=self.registry)  # fmt: skip
        self.queue = Counter("imt_queue_requests_total", "Queue requests by outcome", ["outcome"],
                             registry=self.registry)  # fmt: skip
        self._by_station: dict[str, Any] = {}
        self.registry.register(LiveCollector(service))

    def prediction(self, station: str) -> None:
        counter = self._by_station.get(station)
        if counter is None:
            counter = self._by_station[station] = self.predictions.labels(station)
        counter.inc()

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


# ---------------------------------------------------------------------------
# The Redis queue (the tracker's protocol), answered from the shared service.
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class TrackRequest:
    """One usable request from the tracker's queue."""

    raw: bytes
    id: str
    doc: dict[str, Any]
    asked: Asked


def parse_track_request(raw: bytes) -> TrackRequest | tuple[str | None, str]:
    """A TrackRequest, or (its id if it has one, why it cannot be answered)."""
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return None, f"invalid JSON: {exc}"
    if not isinstance(doc, dict):
        return None, "a request must be a JSON object"
    request_id = doc.get("id")
    if isinstance(request_id, bool) or not isinstance(request_id, str | int) or request_id == "":
        return None, "the request has no usable id"
    try:
        asked = asked_from(doc)
    except ValueError as exc:
        return str(request_id), str(exc)
    return TrackRequest(raw, str(request_id), doc, asked)


#: Moves up to ARGV[1] requests to the processing list in one round trip.
_TAKE_MORE = """
local taken = {}
for i = 1, tonumber(ARGV[1]) do
  local request = redis.call('LMOVE', KEYS[1], KEYS[2], 'RIGHT', 'LEFT')
  if not request then break end
  taken[i] = request
end
return taken
"""

#: Puts every request left in the processing list back at the head of the queue,
#: oldest nearest the head, so they are answered first.
_REQUEUE = """
local n = 0
while redis.call('LMOVE', KEYS[1], KEYS[2], 'LEFT', 'RIGHT') do n = n + 1 end
return n
"""

#: The tracker's worker replaced an existing track_prediction only when the new answer
#: was at least this confident, or beat the old one's confidence by TRACKER_MARGIN.
TRACKER_WRITE_CONFIDENCE = 0.5
TRACKER_MARGIN = 0.05


#: A Redis write: key, value, seconds to expiry.
Write = tuple[str, bytes, int]


def split_requests(
    parsed: list[TrackRequest | tuple[str | None, str]], loaded: LoadedModel
) -> tuple[list[TrackRequest], list[tuple[str | None, str]]]:
    """The requests the model can answer, and (id, reason) for the rest: those that
    could not be parsed, then those for a station the model does not know."""
    good = [p for p in parsed if isinstance(p, TrackRequest)]
    refused = [p for p in parsed if not isinstance(p, TrackRequest)]
    refused += [
        (r.id, UNAVAILABLE) for r in good if r.asked.station_id not in loaded.predictor.stations
    ]
    good = [r for r in good if r.asked.station_id in loaded.predictor.stations]
    return good, refused


def result_body(request: TrackRequest, prediction: dict[str, Any], row: Any,
                created_at: str) -> bytes:  # fmt: skip
    """A queue result, as the tracker's worker wrote it."""
    asked = request.asked
    return orjson.dumps({
        "id": request.id, "station_id": asked.station_id, "route_id": asked.route_id,
        "direction_id": asked.direction_id, "scheduled_time": request.doc["scheduled_time"],
        "track_number": prediction["track_number"],
        "predicted_track_index": int(prediction["track_number"]) - 1,
        "confidence": prediction["confidence_score"],
        "model_confidence": prediction["model_confidence"],
        "probabilities": [round(float(p), 6) for p in row], "created_at": created_at,
    })  # fmt: skip


class PredictionWorker:
    """Answers the tracker's queue: BLMOVE to a processing list, predict the batch in one
    call, write the results (and the tracker's `track_prediction:` records) and remove
    the batch in one transaction. A request is never lost: whatever a dead worker left
    in the processing list is requeued when a worker (re)connects."""

    def __init__(self, service: PredictionService, target: RedisTarget, opts: ServeOptions):
        self.service = service
        self.target = target
        self.opts = opts
        self.stopping = False
        self.answered = self.errors = self.batches = self.below = 0

    def run(self) -> None:
        """Serve until `stopping`, then finish the batch in hand and return."""
        import redis

        client = self.target.connect()
        self._requeue(client)
        while not self.stopping:
            try:
                batch = self._take_batch(client)
                if batch:
                    self._answer(client, batch)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                client = self._reconnect(exc)
        log(f"{now_iso()} queue stopped: answered {self.answered:,} requests ({self.errors:,} "
            f"with an error, {self.below:,} below --min-confidence) in {self.batches:,} batches")  # fmt: skip

    def _reconnect(self, exc: Exception) -> Any:
        """A new connection after a lost one, retried with backoff (0.5 s doubling to 10 s)."""
        log(f"{now_iso()} queue: lost Redis at {self.target.label} "
            f"({self.target.redact(str(exc)) or type(exc).__name__}); reconnecting")  # fmt: skip
        delay = 0.5
        while not self.stopping:
            deadline = time.monotonic() + delay
            while not self.stopping and time.monotonic() < deadline:
                time.sleep(0.05)
            try:
                client = self.target.connect()
                self._requeue(client)
            except Exception:
                delay = min(delay * 2, 10.0)
                continue
            log(f"{now_iso()} queue: reconnected to Redis at {self.target.label}")
            return client
        return None

    def _requeue(self, client: Any) -> None:
        moved = client.eval(_REQUEUE, 2, self.opts.processing_key, self.opts.requests_key)
        if moved:
            log(
                f"{now_iso()} queue: requeued {moved:,} requests left unanswered by an earlier worker"
            )

    def _take_batch(self, client: Any) -> list[bytes]:
        """Up to max_batch requests, waiting at most half a second for the first."""
        keys = (self.opts.requests_key, self.opts.processing_key)
        first = client.blmove(*keys, timeout=0.5, src="RIGHT", dest="LEFT")
        if first is None:
            return []
        if self.opts.max_batch == 1:
            return [first]
        return [first, *client.eval(_TAKE_MORE, 2, *keys, self.opts.max_batch - 1)]

    def _answer(self, client: Any, batch: list[bytes]) -> None:
        """Answer one batch: results, errors and the tracker's records written, and the
        batch removed from the processing list, in one transaction."""
        parsed = [parse_track_request(raw) for raw in batch]
        created_at = now_iso()
        loaded = self.service.holder.current
        good, refused = split_requests(parsed, loaded)
        try:
            rows, predictions = self._predict(loaded, good)
        except Exception as exc:  # the model failed on a batch: answer it, never stop
            log(f"{now_iso()} queue: prediction failed for a batch of {len(good)}: "
                f"{type(exc).__name__}: {exc}")  # fmt: skip
            failed = [(r.id, f"prediction failed: {type(exc).__name__}") for r in good]
            refused = [*failed, *refused]
            good, rows, predictions = [], [], []
        writes, trackers = self._result_writes(good, predictions, rows, created_at)
        writes += self._error_writes(refused, created_at)
        tracker_writes, deletes = self._tracker_writes(client, trackers)
        writes += tracker_writes
        pipe = client.pipeline(transaction=True)
        for key, value, ttl in writes:
            pipe.set(key, value, ex=ttl)
        if deletes:
            pipe.delete(*deletes)
        for raw_request in batch:
            pipe.lrem(self.opts.processing_key, 1, raw_request)
        pipe.execute()
        self.answered += len(batch)
        self.batches += 1
        self.service.metrics.queue.labels("answered").inc(len(batch))

    def _result_writes(self, good: list[TrackRequest], predictions: list[dict[str, Any]],
                       rows: list[Any], created_at: str) -> tuple[list[Write], list[tuple[str, dict[str, Any]]]]:  # fmt: skip
        """The result and latest-result keys of each answer confident enough, and the
        tracker's records (suffix, prediction) to consider."""
        writes: list[Write] = []
        trackers: list[tuple[str, dict[str, Any]]] = []
        for request, prediction, row in zip(good, predictions, rows, strict=True):
            asked = request.asked
            if prediction["confidence_score"] < self.opts.min_confidence:
                self.below += 1
                continue
            body = result_body(request, prediction, row, created_at)
            latest = (f"{self.opts.latest_prefix}{asked.station_id}:{asked.route_id}:"
                      f"{asked.direction_id}:{int(asked.timestamp)}")  # fmt: skip
            writes += [(self.opts.result_prefix + request.id, body, self.opts.result_ttl),
                       (latest, body, self.opts.result_ttl)]  # fmt: skip
            if asked.trip_id:
                suffix = f"{asked.station_id}:{asked.route_id}:{asked.trip_id}:{utc_date(asked.timestamp)}"
                trackers.append(
                    (suffix, {**prediction, "prediction_method": TRACKER_PREDICTION_METHOD})
                )
        return writes, trackers

    def _error_writes(self, refused: list[tuple[str | None, str]], created_at: str) -> list[Write]:
        """An error result for each request that cannot be answered (one without an id
        is only logged)."""
        writes: list[Write] = []
        for request_id, reason in refused:
            self.errors += 1
            if request_id is None:
                log(f"{now_iso()} queue: dropped a request without a usable id: {reason}")
                continue
            body = orjson.dumps({"id": request_id, "error": reason, "created_at": created_at})
            writes.append((self.opts.result_prefix + request_id, body, self.opts.result_ttl))
        return writes

    @staticmethod
    def _tracker_writes(client: Any, trackers: list[tuple[str, dict[str, Any]]]
                        ) -> tuple[list[Write], list[str]]:  # fmt: skip
        """The tracker's records that its rule lets replace the existing ones, and the
        negative records they supersede (to delete)."""
        writes: list[Write] = []
        deletes: list[str] = []
        if not trackers:
            return writes, deletes
        existing = client.mget([f"track_prediction:{s}" for s, _ in trackers])
        for (suffix, prediction), old in zip(trackers, existing, strict=True):
            old_confidence = _confidence_of(old)
            confidence = prediction["confidence_score"]
            if confidence >= TRACKER_WRITE_CONFIDENCE or (
                    old_confidence is not None and confidence > old_confidence + TRACKER_MARGIN):  # fmt: skip
                writes.append((f"track_prediction:{suffix}", orjson.dumps(prediction),
                               TRACK_PREDICTION_TTL))  # fmt: skip
                deletes.append(f"negative_track_prediction:{suffix}")
        return writes, deletes

    def _predict(
        self, loaded: LoadedModel, good: list[TrackRequest]
    ) -> tuple[list[Any], list[dict[str, Any]]]:
        """One model call: each request's probabilities laid out as the queue's protocol
        has them (index i is track i + 1), and its TrackPrediction."""
        import numpy as np

        if not good:
            return [], []
        asked = [r.asked for r in good]
        calibrated, raw = loaded.predictor.both_probabilities([a.features() for a in asked])
        predictions = self.service.finish(
            loaded, asked, answers_from_probabilities(loaded, asked, calibrated, raw)
        )
        by_track = np.zeros((len(good), loaded.num_tracks))
        by_track[:, loaded.track_index] = calibrated
        return list(by_track), predictions


def _confidence_of(raw: bytes | None) -> float | None:
    value = _json_field(raw, "confidence_score")
    return float(value) if isinstance(value, int | float) else None


# ---------------------------------------------------------------------------
# HTTP: the tracker's prediction API (FastAPI), plus /healthz, /model and /metrics: one
# APIRouter per concern, the service reached through the ServiceDep dependency, and
# create_app wiring them with the middleware and the error handlers.
# ---------------------------------------------------------------------------

#: Endpoint label for metrics (path templates, so ids do not make new series).
ENDPOINTS = (("/predictions/date", "/predictions/date"), ("/predictions", "/predictions"),
             ("/chained-predictions", "/chained-predictions"),
             ("/stats/", "/stats/{station_id}/{route_id}"),
             ("/historical/", "/historical/{station_id}/{route_id}"), ("/healthz", "/healthz"),
             ("/model", "/model"), ("/metrics", "/metrics"), ("/docs", "/docs"),
             ("/openapi.json", "/openapi.json"))  # fmt: skip
_SLASHES = re.compile(r"/{2,}")


def endpoint_of(path: str) -> str:
    for prefix, name in ENDPOINTS:
        if path == prefix or (prefix.endswith("/") and path.startswith(prefix)):
            return name
    return "other"


class EdgeMiddleware:
    """Plain ASGI, in front of everything: `//predictions` is `/predictions` (mbta-mcp's
    base URL ends with a slash); a body over the cap is HTTP 413 before any parsing;
    every request is counted and timed by endpoint."""

    def __init__(self, app: Any, service: PredictionService) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        path = scope["path"]
        if "//" in path:
            path = _SLASHES.sub("/", path)
            scope = {**scope, "path": path, "raw_path": path.encode()}
        endpoint = endpoint_of(path)
        status = [500]

        async def send_counted(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if scope["method"] in ("POST", "PUT", "PATCH"):
                body = await self._read_capped(receive)
                if body is None:
                    await self._json(send_counted, 413, {"detail": "request body too large (at most "
                                     f"{self.service.options.max_body_bytes:,} bytes)"})  # fmt: skip
                    return
                receive = self._replay(body)
            await self.app(scope, receive, send_counted)
        finally:
            metrics = self.service.metrics
            metrics.requests.labels(endpoint, str(status[0])).inc()
            metrics.latency.labels(endpoint).observe(time.perf_counter() - started)

    async def _read_capped(self, receive: Callable) -> bytes | None:
        cap = self.service.options.max_body_bytes
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > cap:
                return None
            chunks.append(chunk)
            if not message.get("more_body"):
                break
        return b"".join(chunks)

    @staticmethod
    def _replay(body: bytes) -> Callable:
        sent = False

        async def receive() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.Event().wait()  # a second receive waits for a disconnect that never comes
            return {"type": "http.disconnect"}

        return receive

    @staticmethod
    async def _json(send: Callable, status: int, body: dict) -> None:
        payload = orjson.dumps(body)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(payload)).encode())]})  # fmt: skip
        await send({"type": "http.response.body", "body": payload})


class ORJSONResponse(Response):
    """JSON rendered by orjson (the endpoints return these, skipping FastAPI's encoder)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


# -- the bodies the endpoints parse themselves (their schemas are listed at /docs) ------


class PredictionRequest(BaseModel):
    """The tracker's PredictionRequest (as a JSON body or as query parameters)."""

    station_id: str = Field(examples=["place-sstat"])
    route_id: str = Field(examples=["CR-Worcester"])
    trip_id: str = Field("", examples=["CR-Weekday-Fall-26-520"])
    headsign: str = Field("", examples=["Worcester"])
    direction_id: int = Field(examples=[0])
    scheduled_time: str = Field(examples=["2026-12-02T17:35:00-05:00"],
                                description="ISO 8601; without an offset it is Boston time")  # fmt: skip


class ChainedRequest(BaseModel):
    predictions: list[PredictionRequest] = Field(max_length=MAX_CHAINED)


class DateRequest(BaseModel):
    target_date: str = Field(examples=["2026-12-03"], description="a date or datetime")


BODY_MODELS = (PredictionRequest, ChainedRequest, DateRequest)


def body_schema(model_name: str, required: bool = True) -> dict[str, Any]:
    """OpenAPI for a JSON body the endpoint parses itself (listed at /docs)."""
    return {"requestBody": {"required": required, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model_name}"}}}}}  # fmt: skip


# -- dependencies and helpers the routers share ------------------------------------------


async def get_service(request: Request) -> PredictionService:
    """The service the application was made for (create_app keeps it in app.state)."""
    return request.app.state.service


#: An endpoint parameter of this type receives the PredictionService.
ServiceDep = Annotated[PredictionService, Depends(get_service)]


def limited(request: Request, service: PredictionService, group: str) -> ORJSONResponse | None:
    """None when the client may make this request, else the HTTP 429 to answer."""
    if service.limiter is None:
        return None
    client = request.client.host if request.client else "unknown"
    wait = service.limiter.allow(client, group)
    if wait is None:
        return None
    return ORJSONResponse({"detail": f"rate limit exceeded: {service.limiter.limits[group]} "
                           f"{group} requests a minute"}, status_code=429,
                          headers={"retry-after": str(math.ceil(wait))})  # fmt: skip


def unprocessable(detail: Any) -> ORJSONResponse:
    return ORJSONResponse({"detail": detail}, status_code=422)


async def json_body(request: Request) -> Any:
    body = await request.body()
    if not body.strip():
        raise ValueError("a JSON body is required")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"the body is not JSON: {exc}") from None


def validated(doc: Any, where: str) -> Asked:
    if not isinstance(doc, dict):
        raise ValueError(f"{where}: a prediction request must be a JSON object")
    try:
        return asked_from(doc)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


# -- errors: every one answered as {"detail": ...} ---------------------------------------


async def invalid(_request: Request, exc: RequestValidationError) -> ORJSONResponse:
    detail = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
              for e in exc.errors()]  # fmt: skip
    return ORJSONResponse({"detail": detail}, status_code=422)


async def http_error(_request: Request, exc: StarletteHTTPException) -> ORJSONResponse:
    return ORJSONResponse({"detail": exc.detail}, status_code=exc.status_code,
                          headers=getattr(exc, "headers", None))  # fmt: skip


async def crashed(_request: Request, exc: Exception) -> ORJSONResponse:
    log(f"{now_iso()} HTTP: {type(exc).__name__}: {str(exc)[:300]}")
    return ORJSONResponse({"detail": "internal error"}, status_code=500)


EXCEPTION_HANDLERS: tuple[tuple[type[Exception], Callable[..., Any]], ...] = (
    (RequestValidationError, invalid), (StarletteHTTPException, http_error), (Exception, crashed))  # fmt: skip


# -- the tracker's prediction API: one departure, or many at once ------------------------

prediction_router = APIRouter()


@prediction_router.post("/predictions", openapi_extra=body_schema("PredictionRequest", required=False),
                        summary="Predict the track of one departure (JSON body or query parameters)")  # fmt: skip
async def predictions(request: Request, service: ServiceDep) -> Any:
    if (refused := limited(request, service, "predictions")) is not None:
        return refused
    try:
        query = request.query_params
        doc = dict(query) if "station_id" in query else await json_body(request)
        asked = validated(doc, "body" if "station_id" not in query else "query")
    except ValueError as exc:
        return unprocessable(str(exc))
    return ORJSONResponse((await service.answer([asked]))[0])


@prediction_router.post("/chained-predictions", openapi_extra=body_schema("ChainedRequest"),
                        summary=f"Predict up to {MAX_CHAINED} departures in one call")  # fmt: skip
async def chained_predictions(request: Request, service: ServiceDep) -> Any:
    if (refused := limited(request, service, "chained")) is not None:
        return refused
    try:
        doc = await json_body(request)
        if not isinstance(doc, dict) or not isinstance(doc.get("predictions"), list):
            raise ValueError('the body must be {"predictions": [request, ...]}')
        if len(doc["predictions"]) > MAX_CHAINED:
            raise ValueError(f"at most {MAX_CHAINED} predictions a call "
                             f"({len(doc['predictions'])} given)")  # fmt: skip
        asked = [validated(d, f"predictions[{i}]") for i, d in enumerate(doc["predictions"])]
    except ValueError as exc:
        return unprocessable(str(exc))
    return ORJSONResponse({"results": await service.answer(asked)})


# -- the tracker's record endpoints: live accuracy, recorded tracks ----------------------

record_router = APIRouter()


@record_router.get("/stats/{station_id}/{route_id}", summary="Live accuracy of the answers served")
def stats(request: Request, station_id: str, route_id: str, service: ServiceDep) -> Any:
    if (refused := limited(request, service, "stats")) is not None:
        return refused
    loaded = service.holder.current
    station = parent_station(station_id)
    if station not in loaded.predictor.stations:
        return {"success": False, "stats": UNAVAILABLE}
    figures = service.live.stats(loaded.version, station, route_id)
    versions = {v: service.live.stats(v, station, route_id)
                for (v, s, r) in service.live.table if s == station and r == route_id}  # fmt: skip
    return {"success": True, "stats": {"station_id": station, "route_id": route_id,
                                       "model_version": loaded.version, **figures,
                                       "by_model_version": versions}}  # fmt: skip


@record_router.get("/historical/{station_id}/{route_id}", summary="Recorded track assignments")
def historical(request: Request, station_id: str, route_id: str, service: ServiceDep,
               days: int = Query(30, ge=1, le=366)) -> Any:  # fmt: skip
    if (refused := limited(request, service, "historical")) is not None:
        return refused
    station = parent_station(station_id)
    now = time.time()
    try:
        client = service.redis()
        keys = client.zrangebyscore(f"track_timeseries:{station}:{route_id}",
                                    now - days * 86_400, now)  # fmt: skip
        values = client.mget(keys) if keys else []
    except Exception as exc:
        log(f"{now_iso()} /historical: Redis failed: {service.redis_target.redact(str(exc))[:200]}")
        service.drop_redis()
        return ORJSONResponse({"detail": "the history store (Redis) is not answering"},
                              status_code=503)  # fmt: skip
    return [doc for doc in map(_json_object, values) if doc is not None]


def _json_object(value: bytes | None) -> dict[str, Any] | None:
    """A stored JSON object; None when absent or not one."""
    if value is None:
        return None
    try:
        doc = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    return doc if isinstance(doc, dict) else None


# -- predictions by date: the day's scheduled departures (MBTA V3 API), each predicted ---


def boston_date(text: str) -> dt.date:
    """The Boston calendar date of a date or datetime string; ValueError if neither."""
    from zoneinfo import ZoneInfo

    text = text.strip()
    try:
        if len(text) == 10:
            return dt.date.fromisoformat(text)
        return dt.datetime.fromtimestamp(parse_instant(text), ZoneInfo("America/New_York")).date()
    except (ValueError, OverflowError):
        raise ValueError(f"target_date {text!r} is not a date or an ISO 8601 datetime") from None


async def date_answer(service: PredictionService, day: dt.date) -> dict[str, Any]:
    """That day's departures at the four stations (MBTA V3 schedules), each predicted;
    cached an hour per date and model version."""
    from zoneinfo import ZoneInfo

    from starlette.concurrency import run_in_threadpool

    today = dt.datetime.now(ZoneInfo("America/New_York")).date()
    if not today - dt.timedelta(days=1) <= day <= today + dt.timedelta(days=7):
        return {"success": False, "departures": [],
                "note": "Predictions by date are available from yesterday to 7 days ahead"}  # fmt: skip
    loaded = service.holder.current
    key = (day.isoformat(), loaded.version)
    cached = service.date_cache.get(key)
    if cached and cached[0] > time.monotonic():
        return cached[1]
    try:
        departures = await run_in_threadpool(scheduled_departures, service, day)
    except Exception as exc:
        return {"success": False, "departures": [],
                "note": f"the MBTA API could not be asked for schedules: {service.mbta.redact(str(exc))[:200]}"}  # fmt: skip
    asked = [a for _, a in departures]
    answers = await service.answer(asked) if asked else []
    body = {"success": True, "note": None if departures else "no departures found for this date",
            "departures": [{"departure_info": info,
                            "prediction": answer["prediction"] if answer["success"] else None}
                           for (info, _), answer in zip(departures, answers, strict=True)]}  # fmt: skip
    service.date_cache[key] = (time.monotonic() + service.options.cache_seconds, body)
    return body


def scheduled_departures(
    service: PredictionService, day: dt.date
) -> list[tuple[dict[str, Any], Asked]]:
    """(departure_info, request) for each scheduled commuter-rail departure of `day`."""
    from imt_ml.record_track_data import tracker_headsign

    document = service.mbta.get("/schedules", {
        "filter[stop]": ",".join(SERVED_STATIONS), "filter[date]": day.isoformat(),
        "filter[route_type]": "2", "include": "stop,trip"})  # fmt: skip
    parents, headsigns = {}, {}
    for resource in document.get("included") or []:
        if not isinstance(resource, dict):
            continue
        if resource.get("type") == "stop":
            parent = ((resource.get("relationships") or {}).get("parent_station") or {}).get("data")
            parents[resource.get("id")] = (
                parent.get("id") if isinstance(parent, dict) else resource.get("id")
            )
        elif resource.get("type") == "trip":
            headsigns[resource.get("id")] = (resource.get("attributes") or {}).get("headsign") or ""
    out = []
    for schedule in document.get("data") or []:
        try:
            attributes = schedule["attributes"]
            relations = schedule["relationships"]
            when = attributes.get("departure_time")
            if not when:
                continue  # an arrival only: nothing departs
            stop_id = relations["stop"]["data"]["id"]
            trip_id = relations["trip"]["data"]["id"]
            route_id = relations["route"]["data"]["id"]
            direction = int(attributes.get("direction_id", relations.get("direction_id", 0)) or 0)
            station = parents.get(stop_id) or parent_station(stop_id)
            asked = asked_from({"station_id": station, "route_id": route_id, "trip_id": trip_id,
                                "headsign": tracker_headsign(headsigns.get(trip_id, ""), route_id),
                                "direction_id": direction, "scheduled_time": when})  # fmt: skip
        except (KeyError, TypeError, ValueError):
            continue  # a schedule without the promised fields
        out.append(({"trip_id": trip_id, "station_id": asked.station_id, "route_id": route_id,
                     "direction_id": direction, "departure_time": when}, asked))  # fmt: skip
    return out


schedule_router = APIRouter()


@schedule_router.post("/predictions/date", openapi_extra=body_schema("DateRequest"),
                      summary="Every departure of a date at the four stations, predicted")  # fmt: skip
async def predictions_for_date(request: Request, service: ServiceDep) -> Any:
    if (refused := limited(request, service, "date")) is not None:
        return refused
    try:
        doc = await json_body(request)
        if not isinstance(doc, dict) or not isinstance(doc.get("target_date"), str):
            raise ValueError('the body must be {"target_date": "YYYY-MM-DD or a datetime"}')
        day = boston_date(doc["target_date"])
    except ValueError as exc:
        return unprocessable(str(exc))
    return ORJSONResponse(await date_answer(service, day))


# -- operations: liveness, the model, Prometheus metrics ---------------------------------

operations_router = APIRouter()


@operations_router.get("/healthz", summary="Liveness: the model that answers")
def healthz(service: ServiceDep) -> Any:
    return {"status": "ok", "model_version": service.holder.current.version,
            "queue": "off" if service.options.no_queue else "on",
            "live_accuracy_store": "ok" if service.live.redis_ok else "down"}  # fmt: skip


@operations_router.get(
    "/model", summary="Which model answers: version, training period, held-out figures"
)
def model(service: ServiceDep) -> Any:
    loaded = service.holder.current
    return {"version": loaded.version, "path": str(loaded.path), "loaded_at": loaded.loaded_at,
            "registry": str(service.holder.registry.root) if service.holder.registry else None,
            "tracks": loaded.predictor.labels, "stations": sorted(loaded.predictor.stations),
            "metadata": loaded.metadata}  # fmt: skip


@operations_router.get("/metrics", summary="Prometheus metrics")
def metrics(service: ServiceDep) -> Any:
    from prometheus_client import CONTENT_TYPE_LATEST

    return Response(service.metrics.text(), media_type=CONTENT_TYPE_LATEST)


# -- the application: the routers above, wired to one service ----------------------------

#: In this order (the OpenAPI document lists the paths so).
ROUTERS = (prediction_router, record_router, schedule_router, operations_router)


def openapi_with_bodies(app: FastAPI, generate: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """FastAPI's OpenAPI document plus the hand-parsed bodies' schemas (for /docs)."""
    if app.openapi_schema is None:
        schema = generate()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model_class in app.state.models:
            components[model_class.__name__] = model_class.model_json_schema(
                ref_template="#/components/schemas/{model}")  # fmt: skip
        app.openapi_schema = schema
    return app.openapi_schema


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """While the server runs: the batcher that groups requests into model calls."""
    service = app.state.service
    service.batcher = Batcher(service.holder)
    yield


def create_app(service: PredictionService) -> FastAPI:
    """The FastAPI application (OpenAPI docs at /docs): the routers, the middleware and
    the error handlers, with `service` in app.state for the endpoints' ServiceDep."""
    app = FastAPI(title="imt-ml track predictions", default_response_class=ORJSONResponse,
                  description="The Inky MBTA Tracker's track-prediction API, answered by imt-ml.",
                  lifespan=lifespan)  # fmt: skip
    app.state.service = service
    app.state.models = BODY_MODELS  # for the OpenAPI schema
    app.add_middleware(EdgeMiddleware, service=service)
    origins = [o.strip() for o in service.options.cors_origins.split(",") if o.strip()]
    if origins:
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST"],
                           allow_headers=["*"])  # fmt: skip
    for exception, handler in EXCEPTION_HANDLERS:
        app.add_exception_handler(exception, handler)
    for router in ROUTERS:
        app.include_router(router)
    app.openapi_schema = None
    app.openapi = functools.partial(openapi_with_bodies, app, app.openapi)  # type: ignore[method-assign]
    return app


# ---------------------------------------------------------------------------
# Running it: one process, HTTP in the main thread, the queue and watchers beside it.
# ---------------------------------------------------------------------------


class StatusLog:
    """One line per interval: HTTP requests, queue answers, the model, live accuracy."""

    def __init__(self, service: PredictionService, worker: PredictionWorker | None,
                 interval: float) -> None:  # fmt: skip
        self.service, self.worker, self.interval = service, worker, interval
        self._stop = threading.Event()
        self._last = (0.0, 0)

    def start(self) -> None:
        threading.Thread(target=self._loop, name="status-log", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _http_total(self) -> float:
        total = 0.0
        for metric in self.service.metrics.requests.collect():
            total += sum(s.value for s in metric.samples if s.name.endswith("_total"))
        return total

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            http, answered = self._http_total(), self.worker.answered if self.worker else 0
            table = self.service.live.table
            loaded = self.service.holder.current
            rows = [r for (v, _, _), r in table.items() if v == loaded.version]
            total = sum(r.get("total", 0) for r in rows)
            correct = sum(r.get("correct", 0) for r in rows)
            live = (
                f"live accuracy {correct / total:.1%} of {total:,.0f} scored"
                if total
                else "no answer scored yet"
            )
            log(f"{now_iso()} last {self.interval:g} s: {http - self._last[0]:,.0f} HTTP requests, "
                f"{answered - self._last[1]:,} queue requests; model {loaded.version}; {live}")  # fmt: skip
            self._last = (http, answered)


def listening_socket(host: str, port: int) -> socket.socket:
    """Bind the HTTP port ourselves: a port in use is one clear line, not a uvicorn trace."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class ServiceRun:
    """One run of the service: the background threads, the queue worker, the stop
    signal, and the HTTP server (or a wait in its place) until SIGTERM/SIGINT."""

    def __init__(self, service: PredictionService, target: RedisTarget,
                 sock: socket.socket | None) -> None:  # fmt: skip
        options = service.options
        self.service, self.target, self.sock = service, target, sock
        self.worker = None if options.no_queue else PredictionWorker(service, target, options)
        self.worker_thread: threading.Thread | None = None
        self.status = StatusLog(service, self.worker, options.log_interval)
        self.stopping = threading.Event()

    def start(self) -> None:
        """Live accuracy, the registry watcher and the status log (the queue starts later)."""
        self.service.live.start()
        if self.service.holder.registry is not None:
            self.service.holder.watch(self.service.options.watch_interval)
        self.status.start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.stop)

    def stop(self, signum: int, _frame: Any) -> None:
        """The signal handler (uvicorn re-raises what it caught: it lands here too)."""
        if not self.stopping.is_set():
            log(f"{now_iso()} {signal.Signals(signum).name}: finishing what is in hand")
        self.stopping.set()
        if self.worker is not None:
            self.worker.stopping = True

    def announce(self) -> None:
        options, loaded = self.service.options, self.service.holder.current
        where = (
            []
            if self.sock is None
            else [
                f"HTTP on http://{options.http_host}:{self.sock.getsockname()[1]} (docs at /docs)"
            ]
        )
        if self.worker is not None:
            where.append(f"the queue {options.requests_key} on Redis at {self.target.label}")
        log(f"{now_iso()} serving model {loaded.version} ({loaded.path}, {len(loaded.predictor.labels)} "
            f"tracks): {'; '.join(where)}")  # fmt: skip

    def start_queue(self) -> None:
        if self.worker is not None:
            self.worker_thread = threading.Thread(target=self.worker.run, name="queue", daemon=True)
            self.worker_thread.start()

    def serve(self) -> None:
        """HTTP until uvicorn stops, or else wait for a signal or the queue's end."""
        if self.sock is not None:
            self.serve_http(self.sock)
            if not self.stopping.is_set():
                self.stop(signal.SIGTERM, None)
        else:
            while not self.stopping.wait(0.5):
                if self.worker_thread is not None and not self.worker_thread.is_alive():
                    break

    def serve_http(self, sock: socket.socket) -> None:
        import uvicorn

        config = uvicorn.Config(create_app(self.service), log_level="warning", access_log=False,
                                lifespan="on", timeout_graceful_shutdown=10)  # fmt: skip
        uvicorn.Server(config).run(sockets=[sock])

    def finish(self) -> None:
        """Let the queue finish its batch, stop the threads, write the last answers."""
        if self.worker is not None:
            self.worker.stopping = True
        if self.worker_thread is not None:
            self.worker_thread.join(timeout=30)
        self.service.holder.stop()
        self.status.stop()
        self.service.live.stop()
        with contextlib.suppress(Exception):
            self.service.live.flush()  # the last answers, for scoring


def run_service(model: Path, target: RedisTarget, options: ServeOptions) -> int:
    """Load, warm up, answer until SIGTERM/SIGINT; finish what is in hand; exit code."""
    if options.no_http and options.no_queue:
        raise UserError("--no-http and --no-queue leave nothing to serve")
    options.limits()  # a malformed --rate-limits fails before the model loads
    # Each request allocates a few hundred objects; the default threshold (700) ran a young
    # collection every couple of requests, and the older generations in turn: p99 halved.
    gc.set_threshold(50_000, 20, 100)
    target.connect().close()  # a wrong password or host: one line, exit 1
    holder = ModelHolder(model)
    service = PredictionService(holder, LiveAccuracy(target, options.score_interval), target,
                                options)  # fmt: skip
    sock = None if options.no_http else listening_socket(options.http_host, options.http_port)
    run = ServiceRun(service, target, sock)
    run.start()
    run.announce()
    run.start_queue()
    try:
        run.serve()
    finally:
        run.finish()
    log(f"{now_iso()} stopped")
    return 0


@click.command(
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
    epilog=environment_epilog(ENV_REDIS, "IMT_MBTA_API_KEY (the MBTA API key)", ENV_TF_LOG),
)
@click.option("--model", "model", required=True, type=click.Path(exists=True, path_type=Path),
              help="A saved .keras model, or a model registry directory (its `current` version "
                   "is served and followed).")  # fmt: skip
@redis_options
@dataclass_options(ServeOptions)
def cli(model: Path, redis: RedisTarget, **options: Any) -> None:
    """Answer track predictions over HTTP (the tracker's API) and on the tracker's Redis
    queue, from one model, until SIGTERM/SIGINT."""
    opts = ServeOptions(**options)
    if opts.api_key:
        redis.secrets.append(opts.api_key)
    sys.exit(run_service(model, redis, opts))


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    cli()
