"""Export the tracker's track history from Redis to sharded TFRecord files.

Reads exactly the tracker's two key families: a JSON string per departure under
`track_history:{station}:{route}:{trip}:{date}`, indexed by the sorted sets
`track_timeseries:{station}:{route}` (score: scheduled time). The result,
`<output>/<YYYY-MM-DD_HH-MM-SS>/track_data_NNNN.tfrecord` and `metadata.json`, is built as a
hidden `.NAME.partial` and renamed when complete: an interrupted export never looks finished.
Usage: docs/recording-and-export.md#exporting-track-history.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import math
import operator
import os
import shutil
import struct
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import click
import orjson

# Google's CRC-32C in C (SSE4.2 / ARMv8 CRC instructions, wheels everywhere; imports in ~2 ms).
from google_crc32c import value as crc32c

if __package__ in (None, ""):  # run by path: `uv run src/imt_ml/export_track_data.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imt_ml import utils
from imt_ml.utils import FEATURE_SCHEMA, RedisTarget, UserError, boston_clock, log, progress

SERIES_PATTERN = "track_timeseries:*"
HISTORY_PREFIX = "track_history:"
SERIES_PREFIX = "track_timeseries:"

#: Members fetched per ZRANGE + MGET round trip pair.
FETCH_CHUNK = 2000
#: Keys SCAN walks per call: the keyspace is large (a string per departure) and the
#: series are few; 1,000 a call made the search of 1M keys take a second of round trips.
SCAN_COUNT = 20_000

#: Why a record was left out, in the order the summary lists them.
SKIP_REASONS = (
    "null_track",
    "empty_track",
    "non_numeric_track",
    "invalid_track",
    "invalid_json",
    "missing_field",
    "wrong_type",
    "invalid_value",
    "expired_key",
    "duplicate",
)

# -- Parsing one assignment JSON into a record in schema order -------------------------
REQUIRED_FIELDS = ("station_id", "route_id", "trip_id", "headsign", "assignment_type",
                   "direction_id", "day_of_week", "hour", "minute", "track_number",
                   "scheduled_time", "actual_time", "recorded_time")  # fmt: skip


class Record(NamedTuple):
    """One exported record: FEATURE_SCHEMA's fields in order (a plain tuple encodes the same)."""

    station_id: str
    route_id: str
    trip_id: str
    headsign: str
    direction_id: int
    assignment_type: str
    track_number: str
    scheduled_timestamp: float
    actual_timestamp: float
    recorded_timestamp: float
    day_of_week: int
    hour: int
    minute: int


assert Record._fields == tuple(FEATURE_SCHEMA), "Record must follow FEATURE_SCHEMA"

_get_required = operator.itemgetter(*REQUIRED_FIELDS)
_fromisoformat = dt.datetime.fromisoformat
_EPOCH = dt.datetime(1970, 1, 1)
#: "+HH:MM"/"-HH:MM" suffix -> its offset in seconds, learnt from the data.
_OFFSETS: dict[str, float] = {}


def _iso_timestamp(value: Any) -> float:
    """Unix seconds of an ISO 8601 time with a UTC offset; TypeError/ValueError otherwise.
    A known offset suffix is taken off and subtracted: fromisoformat builds a new timezone
    for every "-05:00" it meets, which costs more than the parse."""
    offset = _OFFSETS.get(value[-6:])
    if offset is not None:
        return (_fromisoformat(value[:-6]) - _EPOCH).total_seconds() - offset
    parsed = _fromisoformat(value)
    utcoffset = parsed.utcoffset()
    if utcoffset is None:  # the tracker always writes an offset
        raise ValueError(f"no UTC offset in {value!r}")
    suffix = value[-6:]
    if suffix[0] in "+-" and suffix[3] == ":" and len(_OFFSETS) < 100:
        _OFFSETS[suffix] = utcoffset.total_seconds()
    return parsed.timestamp()


def track_label(track: Any) -> tuple[str, str]:
    """(the platform label, "") of a record's track, or ("", why the record is skipped)."""
    if track is None:
        return "", "null_track"
    if type(track) is not str:
        return "", "wrong_type"
    track = track.strip()
    if not track:
        return "", "empty_track"
    if not (track.isascii() and track.isdigit()):
        return "", "non_numeric_track"
    if track[0] == "0":  # one label per platform: "05" is track 5; "0" is no platform
        track = track.lstrip("0")
        if not track:
            return "", "invalid_track"
    return track, ""


def parse_assignment(raw: bytes | str | None) -> Record | str:
    """A record (FEATURE_SCHEMA order), or the skip reason as a string. It runs once per
    record, so it is written for speed: no per-field helper calls on the common path."""
    if raw is None:
        return "expired_key"
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return "invalid_json"
    if type(doc) is not dict:
        return "invalid_json"
    try:
        (station, route, trip, headsign, kind, direction, weekday, hour, minute, track, scheduled,
         actual, recorded) = _get_required(doc)  # fmt: skip
    except KeyError:
        return "missing_field"
    track, skipped = track_label(track)
    if skipped:
        return skipped
    # type() rather than isinstance(): a JSON true/false must not pass as 1/0.
    if not (
        type(station) is str and type(route) is str and type(trip) is str and type(headsign) is str
        and type(kind) is str and station and route and trip and type(direction) is int
        and type(weekday) is int and type(hour) is int and type(minute) is int
    ):  # fmt: skip
        return "wrong_type"
    if not (0 <= direction <= 1 and 0 <= weekday <= 6 and 0 <= hour <= 23 and 0 <= minute <= 59):
        return "invalid_value"
    try:
        scheduled_ts, recorded_ts = _iso_timestamp(scheduled), _iso_timestamp(recorded)
        actual_ts = 0.0 if actual is None else _iso_timestamp(actual)
    except (TypeError, ValueError):
        return "invalid_value"
    # The clock fields are written in Boston time, from the instant: the tracker's own
    # are UTC, other writers' local (they are only checked above, never trusted).
    weekday, hour, minute = boston_clock(scheduled_ts)
    return Record(station, route, trip, headsign, direction, kind, track, scheduled_ts, actual_ts,
                  recorded_ts, weekday, hour, minute)  # fmt: skip


# -- tf.train.Example encoding ----------------------------------------------------------
# The protobuf API costs ~30 us a record, more than the rest of the export, so the fixed
# schema's wire format (https://protobuf.dev/programming-guides/encoding/) is written
# directly; tests compare it with the protobuf API's output.
#   Example  { features (1): Features }
#   Features { feature (1): repeated MapEntry { key (1): string, value (2): Feature } }
#   Feature  { bytes_list (1) | float_list (2) | int64_list (3) }, each { value (1) }
_SMALL_VARINTS = [bytes((n,)) for n in range(128)]


def _varint(n: int) -> bytes:
    if 0 <= n < 128:
        return _SMALL_VARINTS[n]
    if n < 0:
        n += 1 << 64  # int64 two's complement, as protobuf encodes negatives
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _length_delimited(field_tag: bytes, payload: bytes) -> bytes:
    return field_tag + _varint(len(payload)) + payload


def _map_entry(name: str, feature: bytes) -> bytes:
    key = _length_delimited(b"\x0a", name.encode())
    return _length_delimited(b"\x0a", key + _length_delimited(b"\x12", feature))


def _feature(kind: str, value: Any) -> bytes:
    if kind == "bytes":
        data = value.encode() if isinstance(value, str) else value
        return _length_delimited(b"\x0a", _length_delimited(b"\x0a", data))
    if kind == "float":
        return _length_delimited(b"\x12", _length_delimited(b"\x0a", struct.pack("<f", value)))
    return _length_delimited(b"\x1a", _length_delimited(b"\x0a", _varint(value)))


def encode_example_reference(record: tuple) -> bytes:
    """Plain encoder for any values (any string length, any int64)."""
    entries = [
        _map_entry(name, _feature(kind, value))
        for (name, kind), value in zip(FEATURE_SCHEMA.items(), record, strict=True)
    ]
    return _length_delimited(b"\x0a", b"".join(entries))


class ExampleEncoder:
    """Fast tf.train.Example encoding for a stream of records (FEATURE_SCHEMA order). Most
    values repeat (a few stations, routes, tracks; 2 x 7 x 24 x 60 combinations of the small
    integers), so encoded map entries are cached, up to MAX_CACHED values each. Map entries
    may come in any order: strings, then integers, then floats."""

    MAX_CACHED = 100_000

    def __init__(self) -> None:
        self.names = list(FEATURE_SCHEMA)
        kinds = list(FEATURE_SCHEMA.values())
        string_slots = [i for i, k in enumerate(kinds) if k == "bytes"]
        self.int_slots = [i for i, k in enumerate(kinds) if k == "int64"]
        float_slots = [i for i, k in enumerate(kinds) if k == "float"]
        self.string_lookup: list[tuple[int, dict[str, bytes]]] = [(i, {}) for i in string_slots]
        self.int_cache: dict[tuple, bytes] = {}
        self.get_ints = operator.itemgetter(*self.int_slots)  # several slots: a tuple
        self.get_floats = operator.itemgetter(*float_slots)
        fmt, self.float_args = "<", []
        for i in float_slots:
            entry = _map_entry(self.names[i], _feature("float", 0.0))
            fmt += f"{len(entry) - 4}sf"
            self.float_args += [entry[:-4], 0.0]
        self.float_block = struct.Struct(fmt)

    def encode(self, record: tuple) -> bytes:
        """The record's serialized tf.train.Example."""
        try:
            parts = [cache[record[slot]] for slot, cache in self.string_lookup]
            parts.append(self.int_cache[self.get_ints(record)])
        except KeyError:  # a value not seen yet
            parts = self._encode_and_cache(record)
        args = self.float_args
        args[1::2] = self.get_floats(record)
        parts.append(self.float_block.pack(*args))
        body = b"".join(parts)
        return _example_header(len(body)) + body

    def _encode_and_cache(self, record: tuple) -> list[bytes]:
        """The string and integer entries of a record, cached while there is room."""
        parts = []
        for slot, cache in self.string_lookup:
            value = record[slot]
            entry = cache.get(value) or _map_entry(self.names[slot], _feature("bytes", value))
            if len(cache) < self.MAX_CACHED:
                cache[value] = entry
            parts.append(entry)
        ints = self.get_ints(record)
        entry = self.int_cache.get(ints) or b"".join(
            _map_entry(self.names[i], _feature("int64", v))
            for i, v in zip(self.int_slots, ints, strict=True)
        )
        if len(self.int_cache) < self.MAX_CACHED:
            self.int_cache[ints] = entry
        parts.append(entry)
        return parts


@functools.lru_cache(maxsize=4096)
def _example_header(length: int) -> bytes:
    return b"\x0a" + _varint(length)


#: Serialize a record (FEATURE_SCHEMA order) as a tf.train.Example.
encode_example = ExampleEncoder().encode


# -- What an export saw: counts for metadata.json and the closing summary ---------------
class ExportStats:
    """Counts of written and skipped records; memory bounded by the vocabularies."""

    def __init__(self) -> None:
        self.skipped: Counter[str] = Counter()
        #: (station, route, track) -> records; a few hundred keys at most.
        self.counts: dict[tuple[str, str, str], int] = {}
        self.first_scheduled, self.last_scheduled = math.inf, -math.inf

    def add(self, record: Record) -> None:
        """Count one written record (runs once per record: kept to the bone)."""
        key = (record.station_id, record.route_id, record.track_number)
        counts = self.counts
        counts[key] = counts.get(key, 0) + 1
        scheduled = record.scheduled_timestamp
        if scheduled < self.first_scheduled:
            self.first_scheduled = scheduled
        if scheduled > self.last_scheduled:
            self.last_scheduled = scheduled

    @property
    def written(self) -> int:
        return sum(self.counts.values())

    def skip(self, reason: str) -> None:
        self.skipped[reason] += 1

    def metadata(self, **extra: Any) -> dict[str, Any]:
        def iso(ts: float | None) -> str | None:
            return None if ts is None else dt.datetime.fromtimestamp(ts, dt.UTC).isoformat()

        stations: Counter[str] = Counter()
        routes: Counter[str] = Counter()
        tracks: dict[str, Counter[str]] = defaultdict(Counter)
        for (station, route, track), n in self.counts.items():
            stations[station] += n
            routes[route] += n
            tracks[station][track] += n
        first, last = (self.first_scheduled, self.last_scheduled) if self.counts else (None, None)
        return {
            "total_records": self.written,
            "created_at": dt.datetime.now(dt.UTC).isoformat(),
            "schema": dict(FEATURE_SCHEMA),
            # day_of_week, hour and minute: the scheduled instant's Boston wall clock.
            "clock": utils.TRACKER_TIMEZONE,
            "target": "track_number",
            "time_range": {
                "first_scheduled": iso(first),
                "last_scheduled": iso(last),
                "first_scheduled_timestamp": first,
                "last_scheduled_timestamp": last,
            },
            "stations": dict(stations.most_common()),
            "routes": dict(routes.most_common()),
            "tracks": {
                station: dict(sorted(counts.items(), key=lambda kv: int(kv[0])))
                for station, counts in sorted(tracks.items())
            },
            "skipped": {reason: self.skipped.get(reason, 0) for reason in SKIP_REASONS},
            "skipped_total": sum(self.skipped.values()),
            **extra,
        }

    def summary(self) -> str:
        skipped = sum(self.skipped.values())
        if not skipped:
            return "skipped none"
        parts = [f"{r} {self.skipped[r]:,}" for r in SKIP_REASONS if self.skipped.get(r)]
        return f"skipped {skipped:,} ({', '.join(parts)})"


# -- Sharded, atomic TFRecord output ----------------------------------------------------
def _masked_crc32c(data: bytes) -> int:
    """TFRecord's checksum: CRC-32C, rotated right by 15 bits, plus a constant (see
    https://www.tensorflow.org/tutorials/load_data/tfrecord#tfrecords_format_details)."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


_LENGTH = struct.Struct("<Q")
_CRC = struct.Struct("<I")


@functools.lru_cache(maxsize=4096)
def _record_header(length: int) -> bytes:
    """A TFRecord's first 12 bytes: the length and its masked CRC (records repeat lengths)."""
    packed = _LENGTH.pack(length)
    return packed + _CRC.pack(_masked_crc32c(packed))


def frame_tfrecord(data: bytes) -> bytes:
    """One TFRecord: length (u64 LE), masked CRC of the length, data, masked CRC of the data."""
    return _record_header(len(data)) + data + _CRC.pack(_masked_crc32c(data))


class TFRecordShardWriter:
    """Writes `track_data_NNNN.tfrecord` shards (framed here, without TensorFlow) into a
    hidden `.NAME.partial` directory, renamed to `NAME` with metadata.json on commit()."""

    #: Bytes buffered per shard before a write(2); records are ~400 bytes.
    BUFFER_BYTES = 1 << 20

    def __init__(self, output_root: Path | str, records_per_file: int) -> None:
        self.output_root = Path(output_root)
        self.records_per_file = records_per_file
        self.output_root.mkdir(parents=True, exist_ok=True)
        self.final_dir = utils.timestamped_dir(self.output_root, utils.EXPORT_DIR_FORMAT)
        self.partial_dir = self.output_root / f".{self.final_dir.name}.partial"
        self.partial_dir.mkdir()
        self.files: list[dict[str, Any]] = []
        self._file: Any = None
        self._in_file = 0

    def write(self, serialized: bytes) -> None:
        if self._in_file >= self.records_per_file or self._file is None:  # the next shard
            self._close_current()
            name = utils.SHARD_PATTERN.format(len(self.files))
            self._file = open(self.partial_dir / name, "wb", buffering=self.BUFFER_BYTES)
            self._in_file = 0
            self.files.append({"file": name, "records": 0})
        self._file.write(frame_tfrecord(serialized))
        self._in_file += 1

    def _close_current(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            self.files[-1]["records"] = self._in_file

    def commit(self, metadata: dict[str, Any]) -> Path:
        """Close the shards, write metadata.json and publish the directory."""
        self._close_current()
        utils.write_json(self.partial_dir / utils.METADATA_FILE, {**metadata, "files": self.files})
        os.rename(self.partial_dir, self.final_dir)
        return self.final_dir

    def __enter__(self) -> TFRecordShardWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is not None and self.partial_dir.exists():  # remove all written so far
            self._close_current()
            shutil.rmtree(self.partial_dir, ignore_errors=True)


# -- Reading the tracker's layout from Redis ---------------------------------------------
class Page(NamedTuple):
    """One page of a series: its values in score order, less members listed twice."""

    key: bytes
    values: list[bytes | None]
    members: int
    duplicates: int


def _duplicated_elsewhere(client: Any, members: list[bytes]) -> set[bytes]:
    """Those of a foreign series' `members` that their own station/route series also lists."""
    owned = []
    for member in members:
        parts = member.split(b":", 3)
        if len(parts) == 4 and parts[0] + b":" == HISTORY_PREFIX.encode():
            owned.append((member, SERIES_PREFIX.encode() + parts[1] + b":" + parts[2]))
    pipe = client.pipeline(transaction=False)
    for member, series in owned:
        pipe.zscore(series, member)
    return {m for (m, _), score in zip(owned, pipe.execute(), strict=True) if score is not None}


def fetch_page(client: Any, key: bytes, first: int, last: int) -> Page:
    """Members ranked first..last of a series and their values (one ZRANGE, one MGET), less
    (but counting) those of another station/route that their own series lists: read once."""
    members = client.zrange(key, first, last)
    values = client.mget(members) if members else []
    own_prefix = HISTORY_PREFIX.encode() + key[len(SERIES_PREFIX) :] + b":"
    foreign = [m for m in members if not m.startswith(own_prefix)]
    duplicated = _duplicated_elsewhere(client, foreign) if foreign else set()
    if duplicated:
        values = [v for m, v in zip(members, values, strict=True) if m not in duplicated]
    return Page(key, values, len(members), len(duplicated))


def read_pages(target: RedisTarget, plans: Any, pages: Any, fds: tuple[int, ...] = ()) -> None:
    """The reader process: take a plan from `plans`, send its pages to `pages` in order. An
    error is sent in place of a page; a closed pipe (the exporter is gone or had nothing to
    read) ends the process quietly; Ctrl-C is the exporter's. `fds`: the exporter's ends of
    the pipes, which a forked child must close to see the exporter go."""
    import pickle
    import signal

    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        plan = plans.recv()
        client = target.connect()
        for key, first, last in plan:
            pages.send(fetch_page(client, key, first, last))
    except (EOFError, BrokenPipeError, ConnectionResetError):
        return
    except Exception as exc:
        error: Exception = exc
        try:
            pickle.loads(pickle.dumps(exc))
        except Exception:
            error = RuntimeError(f"{type(exc).__name__}: {exc}")
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            pages.send(error)
    finally:
        pages.close()


class PageReader:
    """A child process that reads pages from Redis while this one parses and writes. Redis
    replies are parsed holding the GIL, so a reading thread would take its time from parsing
    and encoding, the bottleneck; a process gives each a core. Start it first (a fork is cheap
    with no threads and no Redis connection), then hand it a plan."""

    def __init__(self, target: RedisTarget) -> None:
        import fcntl
        import multiprocessing
        import threading

        # By its package name even when this file runs as __main__, so that a
        # spawned child (used where fork is unsafe) can find it.
        from imt_ml.export_track_data import read_pages

        can_fork = sys.platform == "linux" and "fork" in multiprocessing.get_all_start_methods()
        method = "fork" if can_fork and threading.active_count() == 1 else "spawn"
        context: Any = multiprocessing.get_context(method)
        plans_in, self._plans = context.Pipe(duplex=False)
        self._pages, pages_out = context.Pipe(duplex=False)
        # A whole page (~0.8 MB) fits in the pipe, so the reader can fetch the next one
        # while the exporter is busy (Linux; elsewhere the default size stays).
        with contextlib.suppress(AttributeError, OSError):
            fcntl.fcntl(pages_out.fileno(), fcntl.F_SETPIPE_SZ, 1 << 20)
        inherited = (self._plans.fileno(), self._pages.fileno()) if method == "fork" else ()
        self.process = context.Process(target=read_pages, name="imt-redis-reader", daemon=True,
                                       args=(target, plans_in, pages_out, inherited))  # fmt: skip
        self.process.start()
        plans_in.close()
        pages_out.close()

    def pages(self, plan: list[tuple[bytes, int, int]]) -> Iterator[Page]:
        """The planned pages (series key, first rank, last rank), in order."""
        self._plans.send(plan)
        for _ in plan:
            try:
                page = self._pages.recv()
            except EOFError:
                raise RuntimeError("the Redis reader process ended unexpectedly") from None
            if isinstance(page, BaseException):
                raise page
            yield page

    def close(self) -> None:
        self._plans.close()
        self._pages.close()
        self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join()


def find_series(client: Any) -> list[bytes]:
    """Every `track_timeseries:*` sorted set (SCAN, never KEYS)."""
    found = client.scan_iter(match=SERIES_PATTERN, count=SCAN_COUNT, _type="zset")
    return sorted(progress(found, desc="Scanning Redis", unit=" sets"))


def rank_ranges(
    client: Any, series: list[bytes], since: float | None, until: float | None
) -> list[tuple[bytes, int, int]]:
    """(key, first rank, end rank exclusive) of the members within since/until."""
    # Ranks of the first member at/after `since` and the first at/after `until`;
    # "(x" is Redis's exclusive bound, so ZCOUNT(-inf, "(x") is the rank of x.
    low = "-inf" if since is None else f"({since!r}"
    high = "+inf" if until is None else f"({until!r}"
    pipe = client.pipeline(transaction=False)
    for key in series:
        pipe.zcount(key, "-inf", low)
        pipe.zcount(key, "-inf", high)
    counts = pipe.execute()
    starts = [0] * len(series) if since is None else counts[::2]
    return [(k, s, e) for k, s, e in zip(series, starts, counts[1::2], strict=True) if e > s]


def iter_records(pages: Iterator[Page], total: int, stats: ExportStats) -> Iterator[Record]:
    """Valid, de-duplicated records in (series, scheduled time) order."""
    bar = progress(total=total, desc="Exporting records", unit=" rec", smoothing=0.1)
    current_key: bytes | None = None
    last_scheduled: float | None = None
    seen: set[tuple[str, str]] = set()
    skip = stats.skip
    try:
        for page in pages:
            if page.key != current_key:
                current_key, last_scheduled, seen = page.key, None, set()
            if page.duplicates:
                stats.skipped["duplicate"] += page.duplicates
            for raw in page.values:
                record = parse_assignment(raw)
                if isinstance(record, str):
                    skip(record)
                    continue
                # The same trip at the same station and scheduled time under two
                # keys: the score is the scheduled time, so they sit side by side.
                if record.scheduled_timestamp != last_scheduled:
                    last_scheduled, seen = record.scheduled_timestamp, set()
                identity = (record.station_id, record.trip_id)
                if identity in seen:
                    skip("duplicate")
                    continue
                seen.add(identity)
                yield record
            bar.update(page.members)
    finally:
        bar.close()


def export_to(
    writer: TFRecordShardWriter,
    client: Any,
    reader: PageReader,
    since: float | None,
    until: float | None,
) -> tuple[Path, ExportStats]:
    """Stream the history into `writer`: (the published directory, its stats). Memory stays
    flat: series are read by rank, FETCH_CHUNK members a page (one ZRANGE + MGET), by
    the reader process while this one parses and writes the previous page."""
    stats = ExportStats()
    series = find_series(client)
    if not series:
        raise UserError("no track history in Redis: no track_timeseries:* sorted sets found")
    ranges = rank_ranges(client, series, since, until)
    plan = [
        (key, first, min(first + FETCH_CHUNK, end) - 1)
        for key, start, end in ranges
        for first in range(start, end, FETCH_CHUNK)
    ]
    total = sum(end - start for _, start, end in ranges)
    for record in iter_records(reader.pages(plan), total, stats):
        writer.write(encode_example(record))
        stats.add(record)
    if stats.written == 0:
        where = " in the --since/--until range" if since or until else ""
        raise UserError(f"no exportable records{where} ({stats.summary()})")
    metadata = stats.metadata(source="redis", series_count=len(series), since=since, until=until)
    return writer.commit({**metadata, "records_per_file": writer.records_per_file}), stats


# -- Command line -------------------------------------------------------------------------
def parse_time_bound(text: str | None, *, end: bool) -> float | None:
    """Unix seconds for --since/--until: a date is local midnight (America/New_York), an
    --until date includes that whole day; an ISO datetime is as given (naive: local)."""
    if text is None:
        return None
    try:
        if len(text) != 10:
            return utils.parse_instant(text)
        day = dt.date.fromisoformat(text) + dt.timedelta(days=1 if end else 0)
    except ValueError:
        flag = "--until" if end else "--since"
        raise UserError(f"{flag} {text!r} is not a date (YYYY-MM-DD) or ISO datetime") from None
    return utils.parse_instant(day.isoformat())  # midnight, Boston time


def run_export(
    target: RedisTarget,
    output: Path,
    records_per_file: int,
    since: float | None = None,
    until: float | None = None,
) -> tuple[Path, ExportStats, float]:
    """Connect, export and publish; returns (directory, stats, seconds spent exporting)."""
    import redis

    reader = PageReader(target)  # first: it forks, best before any connection or thread
    try:
        with (
            contextlib.closing(target.connect()) as client,
            TFRecordShardWriter(output, records_per_file) as writer,
        ):
            started = time.perf_counter()
            path, stats = export_to(writer, client, reader, since, until)
    except redis.RedisError as exc:
        raise target.error(exc) from None
    except OSError as exc:
        raise UserError(f"cannot write the export under {output}: {exc}") from None
    finally:
        reader.close()
    return path, stats, time.perf_counter() - started


@click.command(
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog=utils.environment_epilog(utils.ENV_REDIS, utils.ENV_PROGRESS),
)
@click.option("--output", "-o", type=click.Path(file_okay=False, path_type=Path),
              default=Path("track_data_export"), show_default=True,
              help="Export root; each export becomes a timestamped directory inside it.")  # fmt: skip
@utils.redis_options
@click.option("--records-per-file", type=click.IntRange(min=1), default=10_000, show_default=True,
              help="Records per TFRecord shard.")  # fmt: skip
@click.option("--since", default=None, help="First scheduled date (YYYY-MM-DD, local) to export.")
@click.option("--until", default=None, help="Last scheduled date (YYYY-MM-DD, local), inclusive.")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=10.0, show_default=True,
              help="Seconds to wait for Redis to connect.")  # fmt: skip
def cli(output: Path, redis: RedisTarget, records_per_file: int, since: str | None,
        until: str | None, timeout: float) -> None:  # fmt: skip
    """Export track assignments from the tracker's Redis to TFRecord files."""
    since_ts = parse_time_bound(since, end=False)
    until_ts = parse_time_bound(until, end=True)
    if since_ts is not None and until_ts is not None and until_ts <= since_ts:
        raise UserError("--until must not be earlier than --since")
    redis.timeout = timeout
    log(f"Reading track history from Redis at {redis.label}")
    path, stats, seconds = run_export(redis, output, records_per_file, since_ts, until_ts)
    rate = stats.written / seconds if seconds > 0 else float("inf")
    log(
        f"Exported {stats.written:,} records in {seconds:.1f} s ({rate:,.0f} records/s) "
        f"to {path}; {stats.summary()}"
    )
    click.echo(str(path))


if __name__ == "__main__":
    cli()
