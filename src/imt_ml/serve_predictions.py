"""Serve track predictions: the tracker's HTTP API and its Redis queue, from one model
(the Inky MBTA Tracker removed both on 2026-02-10; its clients still speak them):

    uv run src/imt_ml/serve_predictions.py --model RUN_DIR/track_prediction_model_best.keras
    uv run src/imt_ml/serve_predictions.py --model ./registry        # follows `current`

docs/serving.md lists the endpoints (OpenAPI at /docs), the queue's keys and live accuracy.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import datetime as dt
import functools
import gc
import json
import math
import os
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any
from zoneinfo import ZoneInfo

import click
import orjson
from click import FloatRange, IntRange
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.middleware.cors import CORSMiddleware

if __package__ in (None, ""):  # run by path: `uv run src/imt_ml/serve_predictions.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imt_ml import record_track_data, utils
from imt_ml.utils import ModelRegistry, RedisTarget, UserError, log, option_field, parse_instant

#: Stations with track predictions, and the child stop families that belong to each
#: (a request may name `NEC-2287` or `NEC-2287-05` for South Station).
STATION_FAMILIES = {
    "NEC-2287": "place-sstat", "BNT-0000": "place-north", "NEC-2276": "place-bbsta",
    "WML-0012": "place-bbsta", "NEC-2265": "place-rugg",
}  # fmt: skip
BOSTON = ZoneInfo("America/New_York")
UNAVAILABLE = "Predictions are not available for this station"
#: The tracker's limits per client address and minute, by endpoint group.
DEFAULT_RATE_LIMITS = "predictions=100,chained=200,stats=50,historical=50,date=15"
RATE_GROUPS = ("predictions", "chained", "stats", "historical", "date")
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
    return STATION_FAMILIES.get("-".join(stop_id.split("-")[:2]), stop_id)


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat()


@dataclasses.dataclass
class ServeOptions:
    """Everything the service is told, once (each field is a command-line option)."""

    # fmt: off
    http_host: str = option_field("127.0.0.1", "Address the HTTP API listens on.")
    http_port: int = option_field(8080, "Port of the HTTP API.", IntRange(0, 65535))
    no_http: bool = option_field(False, "Answer only the Redis queue.")
    no_queue: bool = option_field(False, "Answer only HTTP.")
    min_confidence: float = option_field(0.25,
        "Queue answers below this confidence are not written (the tracker's worker "
        "dropped them too).", FloatRange(0, 1))
    rate_limits: str = option_field(DEFAULT_RATE_LIMITS,
        "Requests a client address may make a minute, by endpoint group.")
    no_rate_limit: bool = option_field(False,
        "No rate limits at all (benchmarks, trusted networks).")
    cors_origins: str = option_field("", "Comma-separated origins allowed by CORS (* for any).")
    max_body_bytes: int = option_field(1_048_576,
        "Largest request body accepted (HTTP 413 beyond).", IntRange(min=1))
    cache_seconds: float = option_field(3600.0,
        "Seconds an answer is reused for the same request.", FloatRange(min=0))
    api_url: str = option_field("https://api-v3.mbta.com", "MBTA V3 API (for /predictions/date).")
    api_key: str | None = option_field(None,
        "MBTA V3 API key [env: IMT_MBTA_API_KEY]; never printed.", envvar="IMT_MBTA_API_KEY")
    watch_interval: float = option_field(1.0, "Seconds between looks at a registry's `current`.",
                                         FloatRange(min=0.05))
    score_interval: float = option_field(30.0,
        "Seconds between comparisons of served answers with recorded tracks.", FloatRange(min=0.1))
    requests_key: str = option_field("ml:track_predict:requests",
                                     "Redis list the tracker LPUSHes requests on.")
    processing_key: str = option_field("ml:track_predict:processing",
        "Redis list holding requests taken but not yet answered.")
    result_prefix: str = option_field("ml:track_predict:result:",
                                      "Result key prefix; the request id follows.")
    latest_prefix: str = option_field("ml:track_predict:latest:",
        "Latest-result key prefix; station:route:direction:unix seconds follow.")
    result_ttl: int = option_field(86_400, "Seconds before a queue result expires.",
                                   IntRange(min=1))
    max_batch: int = option_field(256, "Most queue requests answered in one model call.",
                                  IntRange(min=1))
    log_interval: float = option_field(60.0, "Seconds between status lines.", FloatRange(min=0.1))
    # fmt: on

    def limits(self) -> dict[str, int]:
        """--rate-limits as {group: requests a minute}; UserError when malformed."""
        limits = {}
        for part in filter(None, (p.strip() for p in self.rate_limits.split(","))):
            name, _, value = part.partition("=")
            if name not in RATE_GROUPS or not value.isdigit():
                groups = ", ".join(RATE_GROUPS)
                raise UserError(f"--rate-limits: {part!r} is not GROUP=N (groups: {groups})")
            limits[name] = int(value)
        return limits


# -- The model: loaded, warmed up, swapped when a registry's `current` moves ---------------
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

    def historical_matches(self, station: str, trip_id: str, route: str) -> int:
        """Training records of the station + train number, else of the station + route."""
        train = trip_id.rsplit("-", 1)[-1]
        found = self.counts.get("station_train", {}).get(f"{station}|{train}")
        if found is None:
            found = self.counts.get("station_route", {}).get(f"{station}|{route}", 0)
        return int(found)


def load_model(path: Path, version: str, metadata: dict[str, Any] | None = None) -> LoadedModel:
    """A `.keras` model with its vocabulary and metadata, warmed up (the first answer is fast)."""
    import numpy as np

    from imt_ml import tfrecord_reader as tr

    predictor = tr.load_predictor(path)
    vocab_file = tr.vocab_file_for(path)
    found = [f for f in (vocab_file, path.with_name("model_vocab.json")) if f.is_file()]
    vocab = json.loads(found[0].read_text()) if found else {}
    if metadata is None:
        summary = path.with_name(vocab_file.name.replace("_vocab.json", "_summary.json"))
        metadata = json.loads(summary.read_text()) if summary.is_file() else {}
        metadata.setdefault("periods", vocab.get("split", {}))
    counts = (vocab.get("baselines") or {}).get("record_counts") or {}
    track_index = np.array([int(label) - 1 for label in predictor.labels])
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
    return LoadedModel(predictor, version, path, metadata, counts, now_iso(), track_index)


class ModelHolder:
    """The model that answers now. A registry's new `current` is loaded and warmed beside the
    old, then swapped in: a request holds the model it started with, so none fails or waits."""

    def __init__(self, source: Path) -> None:
        self.registry = ModelRegistry(source) if ModelRegistry.looks_like(source) else None
        self.swaps = 0
        if self.registry is None:
            if source.is_dir():
                raise UserError(f"{source} is neither a .keras file nor a model registry "
                                "(a directory with versions/ and current)")  # fmt: skip
            self.current = load_model(source, source.stem)
            return
        version = self.registry.current_version()
        if version is None:
            raise UserError(f"the model registry {source} has no current version yet (install "
                            "one: keep_model_current.py - promote --registry DIR "
                            "--model FILE)")  # fmt: skip
        self.current = self._load(version)

    def _load(self, version: int) -> LoadedModel:
        registry = self.registry
        assert registry is not None
        return load_model(registry.model_file(version), str(version), registry.metadata(version))

    def check(self) -> None:
        """Swap in the registry's current version if it changed."""
        version = self.registry.current_version() if self.registry else None
        if version is None or str(version) == self.current.version:
            return
        previous, self.current = self.current.version, self._load(version)
        self.swaps += 1
        log(f"{now_iso()} model {previous} -> {self.current.version} ({self.current.path})")

    def watch(self, interval: float, stop: threading.Event) -> None:
        """Check every `interval` seconds until `stop` is set."""
        while not stop.wait(interval):
            try:
                self.check()
            except Exception as exc:  # a broken version: keep answering with the old one
                log(f"{now_iso()} cannot load the registry's current version: "
                    f"{type(exc).__name__}: {str(exc)[:200]}; "
                    f"still serving {self.current.version}")  # fmt: skip
                stop.wait(max(interval, 10.0))


# -- Answers: one request in, one TrackPrediction out -------------------------------------
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
        """The model's input (its values, in order, are also the answer cache's key)."""
        return {"station_id": self.station_id, "route_id": self.route_id, "trip_id": self.trip_id,
                "headsign": self.headsign, "direction_id": self.direction_id,
                "scheduled_timestamp": self.timestamp}  # fmt: skip

    @property
    def suffix(self) -> str:
        """The tracker's key suffix for this departure: station:route:trip:UTC date."""
        day = dt.datetime.fromtimestamp(self.timestamp, dt.UTC).date().isoformat()
        return f"{self.station_id}:{self.route_id}:{self.trip_id}:{day}"


def asked_from(doc: dict[str, Any]) -> Asked:
    """An Asked from a PredictionRequest's fields; ValueError with the reason when unusable."""
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
    text = doc["scheduled_time"]
    try:
        timestamp = parse_instant(text)
        parsed = dt.datetime.fromisoformat(text.strip())
        if parsed.tzinfo is None:  # echoed as an aware time: Boston's when it has no offset
            parsed = dt.datetime.fromtimestamp(timestamp, BOSTON)
    except (ValueError, OverflowError):
        raise ValueError(f"scheduled_time {text!r} is not an ISO 8601 time") from None
    echoed = parsed.isoformat().replace("+00:00", "Z")  # UTC as pydantic writes it
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


def track_prediction(asked: Asked, answer: Answer, accuracy: float,
                     created_at: str) -> dict[str, Any]:  # fmt: skip
    """The tracker's TrackPrediction. `display_confidence` is rounded *down* to a 5% step, so
    a display never claims more than the model does (0.83 shows as 0.80)."""
    return {
        "station_id": asked.station_id, "route_id": asked.route_id, "trip_id": asked.trip_id,
        "headsign": asked.headsign, "direction_id": asked.direction_id,
        "scheduled_time": asked.scheduled_time, "track_number": answer.track,
        "confidence_score": round(answer.confidence, 6), "accuracy": round(accuracy, 6),
        "model_confidence": round(answer.model_confidence, 6),
        "display_confidence": math.floor(answer.confidence * 20 + 1e-9) / 20,
        "prediction_method": f"imt-ml model {answer.version}",
        "historical_matches": answer.matches, "created_at": created_at,
    }  # fmt: skip


class AnswerCache:
    """Answers reused per request and model for `ttl` seconds; at most `size`, LRU dropped."""

    def __init__(self, ttl: float, size: int = 100_000) -> None:
        self.ttl, self.size = ttl, size
        #: (version, *features) -> (expiry on the monotonic clock, answer)
        self.entries: collections.OrderedDict = collections.OrderedDict()

    def get(self, version: str, asked: Asked) -> Answer | None:
        key = (version, *asked.features().values())
        found = self.entries.get(key)
        if found is None or found[0] < time.monotonic():
            return None
        self.entries.move_to_end(key)
        return found[1]

    def put(self, asked: Asked, answer: Answer) -> None:
        if self.ttl > 0:
            key = (answer.version, *asked.features().values())
            self.entries[key] = (time.monotonic() + self.ttl, answer)
            if len(self.entries) > self.size:
                self.entries.popitem(last=False)


# -- Live accuracy: every answer kept, scored against the track recorded later ------------
class LiveAccuracy:
    """Keeps served answers in Redis (`imt:served:{suffix}`: model version -> answer) and,
    every `score_interval`, scores those whose departure has passed against `track_history:`
    under the same suffix, into `imt:live:{version}:{station}:{route}` (see docs/serving.md).
    A background thread makes the writes, so an answer never waits for Redis."""

    def __init__(self, client: Any, target: RedisTarget, score_interval: float) -> None:
        #: one redis-py client: its pool reconnects after a failure
        self.client, self.target, self.score_interval = client, target, score_interval
        #: (suffix, scheduled timestamp, version, answer) not yet written
        self.buffer: collections.deque = collections.deque(maxlen=200_000)
        #: (version, station, route) -> the counters of that hash, as numbers
        self.table: dict[tuple[str, str, str], dict[str, float]] = {}
        self.redis_ok = True

    def served(self, asked: Asked, answer: Answer) -> None:
        """Keep an answer for scoring (answers without a trip id cannot be matched)."""
        if asked.trip_id:
            value = orjson.dumps({"track": answer.track, "p": round(answer.confidence, 6)})
            self.buffer.append((asked.suffix, asked.timestamp, answer.version, value))

    def accuracy(self, version: str, station: str, route: str) -> float:
        row = self.table.get((version, station, route))
        return row["correct"] / row["total"] if row and row.get("total") else 0.0

    def stats(self, version: str, station: str, route: str) -> dict[str, Any]:
        row = self.table.get((version, station, route), {})
        total, correct = int(row.get("total", 0)), int(row.get("correct", 0))
        tracks = {k.removeprefix("track:"): int(v) for k, v in row.items() if k[:6] == "track:"}
        updated = row.get("updated")
        updated = dt.datetime.fromtimestamp(updated, dt.UTC).isoformat() if updated else None
        return {"total_predictions": total, "correct_predictions": correct,
                "accuracy_rate": correct / total if total else 0.0,
                "expected_calibration_error": self.ece(row),
                "mean_confidence": row.get("confidence_sum", 0.0) / total if total else 0.0,
                "last_updated": updated,
                "prediction_counts_by_track": {t: tracks[t] for t in sorted(
                    tracks, key=lambda t: int(t) if t.isdigit() else 999)}}  # fmt: skip

    @staticmethod
    def ece(row: dict[str, float]) -> float | None:
        """Expected calibration error over the confidence bins; None before any outcome."""
        total = row.get("total", 0)
        if not total:
            return None
        bins = range(CALIBRATION_BINS)
        gaps = [abs(row.get(f"bin{b}:confidence", 0) - row.get(f"bin{b}:correct", 0)) for b in bins]
        return sum(gap / total for gap in gaps)

    def run(self, stop: threading.Event) -> None:
        """Write, score and refresh (in a thread); once more, then end, when `stop` is set."""
        next_score = 0.0
        while True:
            stopping = stop.wait(1.0)
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
                        f"({self.target.redact(str(exc))[:200]}); "
                        "answers wait in memory")  # fmt: skip
                self.redis_ok = False
            if stopping:
                return

    def flush(self) -> None:
        """Write buffered answers (one pipeline); on failure they stay buffered."""
        batch = [self.buffer.popleft() for _ in range(min(len(self.buffer), 500))]
        try:
            pipe = self.client.pipeline(transaction=False)
            for suffix, timestamp, version, value in batch:
                pipe.hset(SERVED_PREFIX + suffix, version, value)
                pipe.expire(SERVED_PREFIX + suffix, SERVED_TTL)
                pipe.zadd(SERVED_INDEX, {suffix: timestamp})
            pipe.execute()
        except Exception:
            self.buffer.extendleft(reversed(batch))
            raise

    def score(self) -> None:
        """Compare answers whose departure has passed with the recorded tracks."""
        client, now = self.client, time.time()
        while True:
            due = client.zrangebyscore(SERVED_INDEX, "-inf", now, 0, 2000, withscores=True)
            if not due:
                return
            reads = client.pipeline(transaction=False)
            for member, _ in due:
                reads.get(b"track_history:" + member)
                reads.hgetall(SERVED_PREFIX.encode() + member)
            replies = reads.execute()
            pipe = client.pipeline(transaction=True)
            done = 0
            for (member, timestamp), recorded, answers in zip(due, replies[::2], replies[1::2],
                                                                strict=True):  # fmt: skip
                track = (_json_object(recorded) or {}).get("track_number")
                track = track.lstrip("0") or None if isinstance(track, str) else None
                if track is None and timestamp > now - SERVED_TTL:
                    continue  # not recorded yet: look again next time
                if track is not None:
                    for version, value in (answers or {}).items():
                        self._add_outcome(pipe, member, version, orjson.loads(value), track, now)
                pipe.zrem(SERVED_INDEX, member)
                pipe.delete(SERVED_PREFIX.encode() + member)
                done += 1
            pipe.execute()
            if done == 0:  # everything due is still waiting for its record
                return

    @staticmethod
    def _add_outcome(pipe: Any, member: bytes, version: bytes, answer: dict[str, Any], track: str,
                     now: float) -> None:  # fmt: skip
        station, route = member.decode().split(":")[:2]
        key = f"{LIVE_PREFIX}{version.decode()}:{station}:{route}"
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
        client = self.client
        keys = sorted(client.smembers(LIVE_KEYS))
        pipe = client.pipeline(transaction=False)
        for key in keys:
            pipe.hgetall(key)
        table = {}
        for key, row in zip(keys, pipe.execute(), strict=True):
            version, station, route = key.decode().removeprefix(LIVE_PREFIX).rsplit(":", 2)
            table[(version, station, route)] = {k.decode(): float(v) for k, v in row.items()}
        self.table = table


def _json_object(value: bytes | None) -> dict[str, Any] | None:
    """A stored JSON object; None when absent or not one."""
    with contextlib.suppress(orjson.JSONDecodeError):  # None too: orjson raises this for it
        doc = orjson.loads(value)
        return doc if isinstance(doc, dict) else None
    return None


# -- The service: what HTTP and the queue share -------------------------------------------
class RateLimiter:
    """Fixed one-minute windows per client address and endpoint group."""

    def __init__(self, limits: dict[str, int]) -> None:
        self.limits, self.window = limits, 0
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
    """The model, answer cache, live accuracy and metrics the HTTP API and the queue share."""

    def __init__(self, holder: ModelHolder, redis: Any, redis_target: RedisTarget,
                 options: ServeOptions) -> None:  # fmt: skip
        self.holder, self.redis, self.options = holder, redis, options
        self.redis_target = redis_target
        self.live = LiveAccuracy(redis, redis_target, options.score_interval)
        self.cache = AnswerCache(options.cache_seconds)
        self.limiter = None if options.no_rate_limit else RateLimiter(options.limits())
        self.mbta = record_track_data.MbtaClient(options.api_url, options.api_key)
        self.date_cache: dict[tuple[str, str], tuple[float, dict[str, Any]]] = {}
        self.metrics = Metrics(self)
        self.batcher = Batcher(holder)

    def finish(self, asked: list[Asked], answers: list[Answer]) -> list[dict[str, Any]]:
        """TrackPredictions for answered requests; each kept for live accuracy."""
        created = now_iso()
        out = []
        for a, answer in zip(asked, answers, strict=True):
            self.cache.put(a, answer)
            self.live.served(a, answer)
            self.metrics.prediction(a.station_id)
            accuracy = self.live.accuracy(answer.version, a.station_id, a.route_id)
            out.append(track_prediction(a, answer, accuracy, created))
        return out

    async def answer(self, asked: list[Asked]) -> list[dict[str, Any]]:
        """The HTTP answers, in order: `{"success": true, "prediction": {...}}` or UNAVAILABLE."""
        loaded = self.holder.current
        known = [a.station_id in loaded.predictor.stations for a in asked]
        usable = [a for a, k in zip(asked, known, strict=True) if k]
        answers = [self.cache.get(loaded.version, a) for a in usable]
        missing = [a for a, found in zip(usable, answers, strict=True) if found is None]
        if missing:
            model, calibrated, raw = await self.batcher.predict([a.features() for a in missing])
            fresh = iter(answers_from_probabilities(model, missing, calibrated, raw))
            answers = [found or next(fresh) for found in answers]
        done = iter(self.finish(usable, answers))  # type: ignore[arg-type]
        return [{"success": True, "prediction": next(done)} if k
                else {"success": False, "prediction": UNAVAILABLE} for k in known]  # fmt: skip


class Batcher:
    """Requests arriving while the model is busy share its next call (one per burst, not per
    request). Runs on the event loop; the model in one thread."""

    def __init__(self, holder: ModelHolder) -> None:
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


class Metrics:
    """/metrics in a registry of its own; the model, swaps and live accuracy read when scraped."""

    def __init__(self, service: PredictionService) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.service = service
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
        self.registry.register(self)  # collect() below

    def prediction(self, station: str) -> None:
        counter = self._by_station.get(station)
        if counter is None:
            counter = self._by_station[station] = self.predictions.labels(station)
        counter.inc()

    def collect(self) -> Any:
        from prometheus_client.core import GaugeMetricFamily

        holder, table = self.service.holder, self.service.live.table
        info = GaugeMetricFamily("imt_model_info", "The model answering now", labels=["version"])
        info.add_metric([holder.current.version], 1.0)
        swaps = GaugeMetricFamily("imt_model_swaps", "Models swapped in since start", holder.swaps)
        labels = ["version", "station", "route"]
        accuracy = GaugeMetricFamily("imt_live_accuracy", "Share of scored answers whose "
                                     "track was the one recorded", labels=labels)  # fmt: skip
        scored = GaugeMetricFamily("imt_live_scored", "Answers scored against a recorded "
                                   "track", labels=labels)  # fmt: skip
        ece = GaugeMetricFamily("imt_live_ece", "Expected calibration error of scored "
                                "answers (10 bins)", labels=labels)  # fmt: skip
        for key, row in sorted(table.items()):
            if row.get("total"):
                accuracy.add_metric(list(key), row["correct"] / row["total"])
                scored.add_metric(list(key), row["total"])
                ece.add_metric(list(key), LiveAccuracy.ece(row) or 0.0)
        return [info, swaps, accuracy, scored, ece]


# -- The Redis queue (the tracker's protocol), answered from the shared service -----------
#: A Redis write: key, value, seconds to expiry.
Write = tuple[str, bytes, int]
#: A queue request that cannot be answered: its id (None when it has none), why.
Refused = tuple[str | None, str]


@dataclasses.dataclass
class TrackRequest:
    """One usable request from the tracker's queue."""

    id: str
    doc: dict[str, Any]
    asked: Asked


def parse_track_request(raw: bytes) -> TrackRequest | Refused:
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
        return TrackRequest(str(request_id), doc, asked_from(doc))
    except ValueError as exc:
        return str(request_id), str(exc)


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
    """Answers the tracker's queue in batches (one model call, one transaction each); none is
    lost: what a dead worker left in the processing list is requeued when a worker (re)connects."""

    def __init__(self, service: PredictionService, stopping: threading.Event) -> None:
        self.service, self.target, self.opts = service, service.redis_target, service.options
        self.stopping = stopping  # set: finish the batch in hand and return
        self.answered = self.errors = self.batches = self.below = 0

    def run(self) -> None:
        """Serve until `stopping` is set."""
        import redis

        client = self.target.connect()
        self._requeue(client)
        while not self.stopping.is_set():
            try:
                batch = self._take_batch(client)
                if batch:
                    self._answer(client, batch)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                client = self._reconnect(exc)
        log(f"{now_iso()} queue stopped: answered {self.answered:,} requests ({self.errors:,} "
            f"with an error, {self.below:,} below --min-confidence) "
            f"in {self.batches:,} batches")  # fmt: skip

    def _reconnect(self, exc: Exception) -> Any:
        """A new connection after a lost one, retried with backoff (0.5 s doubling to 10 s)."""
        log(f"{now_iso()} queue: lost Redis at {self.target.label} "
            f"({self.target.redact(str(exc)) or type(exc).__name__}); reconnecting")  # fmt: skip
        delay = 0.5
        while not self.stopping.wait(delay):
            try:
                client = self.target.connect()
                self._requeue(client)
                log(f"{now_iso()} queue: reconnected to Redis at {self.target.label}")
                return client
            except Exception:
                delay = min(delay * 2, 10.0)
        return None

    def _requeue(self, client: Any) -> None:
        moved = client.eval(_REQUEUE, 2, self.opts.processing_key, self.opts.requests_key)
        if moved:
            log(f"{now_iso()} queue: requeued {moved:,} requests left unanswered by an "
                "earlier worker")  # fmt: skip

    def _take_batch(self, client: Any) -> list[bytes]:
        keys = (self.opts.requests_key, self.opts.processing_key)
        first = client.blmove(*keys, timeout=0.5, src="RIGHT", dest="LEFT")
        if first is None:
            return []
        return [first, *client.eval(_TAKE_MORE, 2, *keys, self.opts.max_batch - 1)]

    def _answer(self, client: Any, batch: list[bytes]) -> None:
        """Write a batch's results, errors, tracker records and removal in one transaction."""
        created_at = now_iso()
        loaded = self.service.holder.current
        parsed = [parse_track_request(raw) for raw in batch]
        requests = [p for p in parsed if isinstance(p, TrackRequest)]
        stations = loaded.predictor.stations
        good = [r for r in requests if r.asked.station_id in stations]
        # (id, why) of those that cannot be answered: unparsable, then for an unknown station
        refused = [p for p in parsed if not isinstance(p, TrackRequest)]
        refused += [(r.id, UNAVAILABLE) for r in requests if r.asked.station_id not in stations]
        try:
            answered = self._predict(loaded, good)
        except Exception as exc:  # the model failed on a batch: answer it, never stop
            log(f"{now_iso()} queue: prediction failed for a batch of {len(good)}: "
                f"{type(exc).__name__}: {exc}")  # fmt: skip
            failed = [(r.id, f"prediction failed: {type(exc).__name__}") for r in good]
            refused, answered = [*failed, *refused], []
        writes, trackers = self._result_writes(answered, refused, created_at)
        deletes = []
        stored = client.mget([f"track_prediction:{s}" for s, _ in trackers]) if trackers else []
        for (suffix, prediction), old in zip(trackers, stored, strict=True):
            # The tracker's rule for replacing its record; the negative one it supersedes goes.
            old = (_json_object(old) or {}).get("confidence_score")
            new = prediction["confidence_score"]
            beaten = isinstance(old, int | float) and new > old + TRACKER_MARGIN
            if new >= TRACKER_WRITE_CONFIDENCE or beaten:
                writes.append((f"track_prediction:{suffix}", orjson.dumps(prediction),
                               TRACK_PREDICTION_TTL))  # fmt: skip
                deletes.append(f"negative_track_prediction:{suffix}")
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

    def _result_writes(self, answered: list[tuple[TrackRequest, dict[str, Any], Any]],
                       refused: list[Refused], created_at: str
                       ) -> tuple[list[Write], list[tuple[str, dict[str, Any]]]]:  # fmt: skip
        """The result keys of each answer confident enough and of each refusal (one without
        an id is only logged), and the tracker's records (suffix, prediction) to consider."""
        opts = self.opts
        writes: list[Write] = []
        trackers: list[tuple[str, dict[str, Any]]] = []
        for request, prediction, row in answered:
            asked = request.asked
            if prediction["confidence_score"] < opts.min_confidence:
                self.below += 1
                continue
            body = result_body(request, prediction, row, created_at)
            latest = (f"{opts.latest_prefix}{asked.station_id}:{asked.route_id}:"
                      f"{asked.direction_id}:{int(asked.timestamp)}")  # fmt: skip
            writes += [(opts.result_prefix + request.id, body, opts.result_ttl),
                       (latest, body, opts.result_ttl)]  # fmt: skip
            if asked.trip_id:
                tracker = {**prediction, "prediction_method": TRACKER_PREDICTION_METHOD}
                trackers.append((asked.suffix, tracker))
        for request_id, reason in refused:
            self.errors += 1
            if request_id is None:
                log(f"{now_iso()} queue: dropped a request without a usable id: {reason}")
                continue
            body = orjson.dumps({"id": request_id, "error": reason, "created_at": created_at})
            writes.append((opts.result_prefix + request_id, body, opts.result_ttl))
        return writes, trackers

    def _predict(self, loaded: LoadedModel, good: list[TrackRequest]) -> list[tuple]:
        """One model call: (request, TrackPrediction, probabilities: index i is track i + 1)."""
        import numpy as np

        if not good:
            return []
        asked = [r.asked for r in good]
        calibrated, raw = loaded.predictor.both_probabilities([a.features() for a in asked])
        answers = answers_from_probabilities(loaded, asked, calibrated, raw)
        predictions = self.service.finish(asked, answers)
        by_track = np.zeros((len(good), int(loaded.track_index.max()) + 1))
        by_track[:, loaded.track_index] = calibrated
        return list(zip(good, predictions, by_track, strict=True))


# -- HTTP (FastAPI): one APIRouter, the service reached through ServiceDep -----------------
#: Endpoint labels for metrics (path templates, so ids do not make new series); a path
#: matches the part before any `{`, exactly or, ending in `/`, as a prefix.
ENDPOINTS = ("/predictions/date", "/predictions", "/chained-predictions",
             "/stats/{station_id}/{route_id}", "/historical/{station_id}/{route_id}", "/healthz",
             "/model", "/metrics", "/docs", "/openapi.json")  # fmt: skip


def endpoint_of(path: str) -> str:
    for name in ENDPOINTS:
        prefix = name.split("{")[0]
        if path == prefix or (prefix.endswith("/") and path.startswith(prefix)):
            return name
    return "other"


class EdgeMiddleware:
    """Plain ASGI, in front of everything: `//predictions` is `/predictions` (mbta-mcp's base
    URL ends with a slash); a body over the cap is HTTP 413 before any parsing; every request
    is counted and timed by endpoint."""

    def __init__(self, app: Any, service: PredictionService) -> None:
        self.app, self.service = app, service

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        path = scope["path"]
        if "//" in path:
            path = re.sub(r"/{2,}", "/", path)
            scope = {**scope, "path": path, "raw_path": path.encode()}
        status = [500]

        async def send_counted(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if scope["method"] in ("POST", "PUT", "PATCH"):
                replay = await self._read_capped(receive)
                if replay is None:
                    cap = self.service.options.max_body_bytes
                    detail = f"request body too large (at most {cap:,} bytes)"
                    await ORJSONResponse({"detail": detail}, 413)(scope, receive, send_counted)
                    return
                receive = replay
            await self.app(scope, receive, send_counted)
        finally:
            endpoint, metrics = endpoint_of(path), self.service.metrics
            metrics.requests.labels(endpoint, str(status[0])).inc()
            metrics.latency.labels(endpoint).observe(time.perf_counter() - started)

    async def _read_capped(self, receive: Callable) -> Callable | None:
        """Read the whole body: a `receive` that replays it, or None when over the cap."""
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
        unread = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay() -> dict:
            if unread:
                return unread.pop()
            await asyncio.Event().wait()  # a second receive waits for a disconnect that never comes
            return {"type": "http.disconnect"}

        return replay


class ORJSONResponse(Response):
    """JSON rendered by orjson (the endpoints return these, skipping FastAPI's encoder)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


# -- The bodies the endpoints parse themselves (their schemas are listed at /docs) --------
class PredictionRequest(BaseModel):
    """The tracker's PredictionRequest (as a JSON body or as query parameters)."""

    station_id: str = Field(examples=["place-sstat"])
    route_id: str = Field(examples=["CR-Worcester"])
    trip_id: str = Field("", examples=["CR-Weekday-Fall-26-520"])
    headsign: str = Field("", examples=["Worcester"])
    direction_id: int = Field(examples=[0])
    scheduled_time: str = Field(
        examples=["2026-12-02T17:35:00-05:00"],
        description="ISO 8601; without an offset it is Boston time",
    )


class ChainedRequest(BaseModel):
    predictions: list[PredictionRequest] = Field(max_length=MAX_CHAINED)


class DateRequest(BaseModel):
    target_date: str = Field(examples=["2026-12-03"], description="a date or datetime")


BODY_MODELS = (PredictionRequest, ChainedRequest, DateRequest)


def body_schema(model_name: str, required: bool = True) -> dict[str, Any]:
    """OpenAPI for a JSON body the endpoint parses itself (listed at /docs)."""
    return {"requestBody": {"required": required, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model_name}"}}}}}  # fmt: skip


async def get_service(request: Request) -> PredictionService:
    """The service the application was made for (create_app keeps it in app.state)."""
    return request.app.state.service


#: An endpoint parameter of this type receives the PredictionService.
ServiceDep = Annotated[PredictionService, Depends(get_service)]


def rate_limit(request: Request, service: PredictionService, group: str) -> None:
    """Raise the HTTP 429 to answer when the client may not make this request now."""
    client = request.client.host if request.client else "unknown"
    wait = service.limiter.allow(client, group) if service.limiter else None
    if wait is not None:
        detail = f"rate limit exceeded: {service.limiter.limits[group]} {group} requests a minute"
        raise HTTPException(429, detail, headers={"retry-after": str(math.ceil(wait))})


async def json_body(request: Request) -> Any:
    """The parsed JSON body; HTTP 422 when there is none or it is not JSON."""
    body = await request.body()
    if not body.strip():
        raise HTTPException(422, "a JSON body is required")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise HTTPException(422, f"the body is not JSON: {exc}") from None


def validated(doc: Any, where: str) -> Asked:
    """The Asked of one prediction request; HTTP 422 saying why (and `where`) when unusable."""
    if not isinstance(doc, dict):
        raise HTTPException(422, f"{where}: a prediction request must be a JSON object")
    try:
        return asked_from(doc)
    except ValueError as exc:
        raise HTTPException(422, f"{where}: {exc}") from None


# -- Errors: every one answered as {"detail": ...} (HTTP errors by FastAPI's own handler) --
async def invalid(_request: Request, exc: RequestValidationError) -> ORJSONResponse:
    detail = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
              for e in exc.errors()]  # fmt: skip
    return ORJSONResponse({"detail": detail}, status_code=422)


async def crashed(_request: Request, exc: Exception) -> ORJSONResponse:
    log(f"{now_iso()} HTTP: {type(exc).__name__}: {str(exc)[:300]}")
    return ORJSONResponse({"detail": "internal error"}, status_code=500)


router = APIRouter()  # the OpenAPI document lists the paths in the order declared here


@router.post("/predictions", openapi_extra=body_schema("PredictionRequest", required=False),
             summary="Predict the track of one departure (JSON body or query "
                     "parameters)")  # fmt: skip
async def predictions(request: Request, service: ServiceDep) -> Any:
    rate_limit(request, service, "predictions")
    query = request.query_params
    doc = dict(query) if "station_id" in query else await json_body(request)
    asked = validated(doc, "query" if "station_id" in query else "body")
    return ORJSONResponse((await service.answer([asked]))[0])


@router.post("/chained-predictions", openapi_extra=body_schema("ChainedRequest"),
             summary=f"Predict up to {MAX_CHAINED} departures in one call")  # fmt: skip
async def chained_predictions(request: Request, service: ServiceDep) -> Any:
    rate_limit(request, service, "chained")
    doc = await json_body(request)
    if not isinstance(doc, dict) or not isinstance(doc.get("predictions"), list):
        raise HTTPException(422, 'the body must be {"predictions": [request, ...]}')
    if len(doc["predictions"]) > MAX_CHAINED:
        raise HTTPException(422, f"at most {MAX_CHAINED} predictions a call "
                                 f"({len(doc['predictions'])} given)")  # fmt: skip
    asked = [validated(d, f"predictions[{i}]") for i, d in enumerate(doc["predictions"])]
    return ORJSONResponse({"results": await service.answer(asked)})


@router.get("/stats/{station_id}/{route_id}", summary="Live accuracy of the answers served")
def stats(request: Request, station_id: str, route_id: str, service: ServiceDep) -> Any:
    rate_limit(request, service, "stats")
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


@router.get("/historical/{station_id}/{route_id}", summary="Recorded track assignments")
def historical(request: Request, station_id: str, route_id: str, service: ServiceDep,
               days: int = Query(30, ge=1, le=366)) -> Any:  # fmt: skip
    rate_limit(request, service, "historical")
    station = parent_station(station_id)
    now = time.time()
    try:
        keys = service.redis.zrangebyscore(f"track_timeseries:{station}:{route_id}",
                                           now - days * 86_400, now)  # fmt: skip
        values = service.redis.mget(keys) if keys else []
    except Exception as exc:
        log(f"{now_iso()} /historical: Redis failed: {service.redis_target.redact(str(exc))[:200]}")
        raise HTTPException(503, "the history store (Redis) is not answering") from None
    return [doc for doc in map(_json_object, values) if doc is not None]


# -- Predictions by date: the day's scheduled departures (MBTA V3 API), each predicted -----
def boston_date(text: str) -> dt.date:
    """The Boston calendar date of a date or datetime string; HTTP 422 if neither."""
    text = text.strip()
    try:
        if len(text) == 10:
            return dt.date.fromisoformat(text)
        return dt.datetime.fromtimestamp(parse_instant(text), BOSTON).date()
    except (ValueError, OverflowError):
        why = f"target_date {text!r} is not a date or an ISO 8601 datetime"
        raise HTTPException(422, why) from None


async def date_answer(service: PredictionService, day: dt.date) -> dict[str, Any]:
    """That day's departures at the four stations, predicted; cached per date and model."""
    today = dt.datetime.now(BOSTON).date()
    if not today - dt.timedelta(days=1) <= day <= today + dt.timedelta(days=7):
        note = "Predictions by date are available from yesterday to 7 days ahead"
        return {"success": False, "departures": [], "note": note}
    loaded = service.holder.current
    key = (day.isoformat(), loaded.version)
    cached = service.date_cache.get(key)
    if cached and cached[0] > time.monotonic():
        return cached[1]
    try:
        departures = await run_in_threadpool(scheduled_departures, service, day)
    except Exception as exc:
        why = service.mbta.redact(str(exc))[:200]
        note = f"the MBTA API could not be asked for schedules: {why}"
        return {"success": False, "departures": [], "note": note}
    answers = await service.answer([a for _, a in departures]) if departures else []
    found = [a["prediction"] if a["success"] else None for a in answers]
    body = {"success": True, "note": None if departures else "no departures found for this date",
            "departures": [{"departure_info": info, "prediction": p}
                           for (info, _), p in zip(departures, found, strict=True)]}  # fmt: skip
    service.date_cache[key] = (time.monotonic() + service.options.cache_seconds, body)
    return body


def scheduled_departures(service: PredictionService, day: dt.date) -> list[tuple[dict, Asked]]:
    """(departure_info, request) for each scheduled commuter-rail departure of `day`."""
    document = service.mbta.get("/schedules", {
        "filter[stop]": ",".join(record_track_data.STATIONS), "filter[date]": day.isoformat(),
        "filter[route_type]": "2", "include": "stop,trip"})  # fmt: skip
    store = record_track_data.ResourceStore()  # the stops' parent stations, trips' headsigns
    for resource in document.get("included") or []:  # an unusable one is left out
        with contextlib.suppress(record_track_data.Malformed, AttributeError):
            store.add(resource)
    out = []
    for schedule in document.get("data") or []:
        try:
            attributes, relations = schedule["attributes"], schedule["relationships"]
            when = attributes.get("departure_time")
            if not when:
                continue  # an arrival only: nothing departs
            stop_id, trip_id, route_id = (
                relations[k]["data"]["id"] for k in ("stop", "trip", "route")
            )
            direction = int(attributes.get("direction_id", relations.get("direction_id", 0)) or 0)
            headsign = record_track_data.tracker_headsign(store.trips.get(trip_id, ""), route_id)
            asked = asked_from({"station_id": store.stops.get(stop_id, (stop_id,))[0],
                                "route_id": route_id, "trip_id": trip_id, "headsign": headsign,
                                "direction_id": direction, "scheduled_time": when})  # fmt: skip
        except (KeyError, TypeError, ValueError):
            continue  # a schedule without the promised fields
        out.append(({"trip_id": trip_id, "station_id": asked.station_id, "route_id": route_id,
                     "direction_id": direction, "departure_time": when}, asked))  # fmt: skip
    return out


@router.post("/predictions/date", openapi_extra=body_schema("DateRequest"),
             summary="Every departure of a date at the four stations, predicted")  # fmt: skip
async def predictions_for_date(request: Request, service: ServiceDep) -> Any:
    rate_limit(request, service, "date")
    doc = await json_body(request)
    if not isinstance(doc, dict) or not isinstance(doc.get("target_date"), str):
        raise HTTPException(422, 'the body must be {"target_date": "YYYY-MM-DD or a datetime"}')
    return ORJSONResponse(await date_answer(service, boston_date(doc["target_date"])))


@router.get("/healthz", summary="Liveness: the model that answers")
def healthz(service: ServiceDep) -> Any:
    return {"status": "ok", "model_version": service.holder.current.version,
            "queue": "off" if service.options.no_queue else "on",
            "live_accuracy_store": "ok" if service.live.redis_ok else "down"}  # fmt: skip


@router.get("/model", summary="Which model answers: version, training period, held-out figures")
def model(service: ServiceDep) -> Any:
    loaded = service.holder.current
    return {"version": loaded.version, "path": str(loaded.path), "loaded_at": loaded.loaded_at,
            "registry": str(service.holder.registry.root) if service.holder.registry else None,
            "tracks": loaded.predictor.labels, "stations": sorted(loaded.predictor.stations),
            "metadata": loaded.metadata}  # fmt: skip


@router.get("/metrics", summary="Prometheus metrics")
def metrics(service: ServiceDep) -> Any:
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def openapi_with_bodies(app: FastAPI, generate: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """FastAPI's OpenAPI document plus the hand-parsed bodies' schemas (for /docs)."""
    if app.openapi_schema is None:
        schema = generate()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model_class in BODY_MODELS:
            components[model_class.__name__] = model_class.model_json_schema(
                ref_template="#/components/schemas/{model}")  # fmt: skip
        app.openapi_schema = schema
    return app.openapi_schema


def create_app(service: PredictionService) -> FastAPI:
    """The FastAPI application (OpenAPI docs at /docs), `service` in app.state for ServiceDep."""
    app = FastAPI(title="imt-ml track predictions", default_response_class=ORJSONResponse,
                  description="The Inky MBTA Tracker's track-prediction API, answered by "
                              "imt-ml.")  # fmt: skip
    app.state.service = service
    app.add_middleware(EdgeMiddleware, service=service)
    origins = [o.strip() for o in service.options.cors_origins.split(",") if o.strip()]
    if origins:
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST"],
                           allow_headers=["*"])  # fmt: skip
    app.add_exception_handler(RequestValidationError, invalid)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, crashed)
    app.include_router(router)
    app.openapi = functools.partial(openapi_with_bodies, app, app.openapi)  # type: ignore
    return app


# -- Running it: one process, HTTP in the main thread, the queue and watchers beside it ----
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
    """One run of the service: its threads, the queue worker and HTTP, until SIGTERM/SIGINT."""

    def __init__(self, service: PredictionService, sock: socket.socket | None) -> None:
        self.service, self.sock = service, sock
        self.stopping = threading.Event()  # a signal came, or HTTP ended: the queue stops
        self.finished = threading.Event()  # the background threads end
        self.worker = None if service.options.no_queue else PredictionWorker(service, self.stopping)
        self.worker_thread: threading.Thread | None = None

    def run(self) -> None:
        """Start the background threads, announce, serve, and finish what is in hand."""
        service, options = self.service, self.service.options
        loops = {"live-accuracy": service.live.run, "status-log": self.status_log}
        if service.holder.registry is not None:
            loops["model-watch"] = functools.partial(service.holder.watch, options.watch_interval)
        for name, loop in loops.items():
            threading.Thread(target=loop, args=(self.finished,), name=name, daemon=True).start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.stop)
        where = []
        if self.sock is not None:
            port = self.sock.getsockname()[1]
            where.append(f"HTTP on http://{options.http_host}:{port} (docs at /docs)")
        if self.worker is not None:
            where.append(f"the queue {options.requests_key} on Redis at {self.worker.target.label}")
        loaded = service.holder.current
        log(f"{now_iso()} serving model {loaded.version} ({loaded.path}, "
            f"{len(loaded.predictor.labels)} tracks): {'; '.join(where)}")  # fmt: skip
        if self.worker is not None:
            self.worker_thread = threading.Thread(target=self.worker.run, name="queue", daemon=True)
            self.worker_thread.start()
        try:
            if self.sock is None:  # wait for a signal or the queue's end
                while not self.stopping.wait(0.5):
                    if self.worker_thread is not None and not self.worker_thread.is_alive():
                        break
            else:  # HTTP until uvicorn stops (on a signal, which it re-raises into stop())
                import uvicorn

                config = uvicorn.Config(create_app(service), log_level="warning",
                                        access_log=False, lifespan="on",
                                        timeout_graceful_shutdown=10)  # fmt: skip
                uvicorn.Server(config).run(sockets=[self.sock])
                if not self.stopping.is_set():
                    self.stop(signal.SIGTERM, None)
        finally:  # let the queue finish its batch, stop the threads, write the last answers
            self.stopping.set()
            if self.worker_thread is not None:
                self.worker_thread.join(timeout=30)
            self.finished.set()
            with contextlib.suppress(Exception):
                service.live.flush()  # the last answers, for scoring

    def stop(self, signum: int, _frame: Any) -> None:
        """The signal handler (uvicorn re-raises what it caught: it lands here too)."""
        if not self.stopping.is_set():
            log(f"{now_iso()} {signal.Signals(signum).name}: finishing what is in hand")
        self.stopping.set()

    def status_log(self, stop: threading.Event) -> None:
        """One line per --log-interval: HTTP requests, queue answers, the model, live accuracy."""
        interval, last = self.service.options.log_interval, (0.0, 0)
        while not stop.wait(interval):
            metrics = self.service.metrics.requests.collect()
            http = sum(s.value for m in metrics for s in m.samples if s.name.endswith("_total"))
            answered = self.worker.answered if self.worker else 0
            version = self.service.holder.current.version
            rows = [r for (v, _, _), r in self.service.live.table.items() if v == version]
            total = sum(r.get("total", 0) for r in rows)
            correct = sum(r.get("correct", 0) for r in rows)
            live = f"live accuracy {correct / total:.1%} of {total:,.0f} scored" if total else ""
            log(f"{now_iso()} last {interval:g} s: {http - last[0]:,.0f} HTTP requests, "
                f"{answered - last[1]:,} queue requests; model {version}; "
                f"{live or 'no answer scored yet'}")  # fmt: skip
            last = (http, answered)


def run_service(model: Path, target: RedisTarget, options: ServeOptions) -> int:
    """Load, warm up, answer until SIGTERM/SIGINT; finish what is in hand; exit code."""
    if options.no_http and options.no_queue:
        raise UserError("--no-http and --no-queue leave nothing to serve")
    options.limits()  # a malformed --rate-limits fails before the model loads
    # Each request allocates a few hundred objects; the default threshold (700) ran a young
    # collection every couple of requests, and the older generations in turn: p99 halved.
    gc.set_threshold(50_000, 20, 100)
    client = target.connect()  # a wrong password or host: one line, exit 1
    service = PredictionService(ModelHolder(model), client, target, options)
    sock = None if options.no_http else listening_socket(options.http_host, options.http_port)
    ServiceRun(service, sock).run()
    log(f"{now_iso()} stopped")
    return 0


@click.command(
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
    epilog=utils.environment_epilog(
        utils.ENV_REDIS, "IMT_MBTA_API_KEY (the MBTA API key)", utils.ENV_TF_LOG
    ),
)
@click.option("--model", "model", required=True, type=click.Path(exists=True, path_type=Path),
              help="A saved .keras model, or a model registry directory (its `current` version "
                   "is served and followed).")  # fmt: skip
@utils.redis_options
@utils.dataclass_options(ServeOptions)
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
