"""Export the tracker's track history from Redis to sharded TFRecord files.

The tracker keeps one JSON string per departure under
`track_history:{station}:{route}:{trip}:{date}` and indexes those keys in sorted
sets `track_timeseries:{station}:{route}` scored by scheduled time. This script
reads exactly those two key families and nothing else:

    uv run src/imt_ml/export_track_data.py --output ./track_data_export
    uv run src/imt_ml/export_track_data.py --redis-url redis://user:pw@host:6379/0 \\
        --since 2025-01-01 --until 2025-03-31 --records-per-file 5000

The result is `<output>/<YYYY-MM-DD_HH-MM-SS>/track_data_NNNN.tfrecord` plus
`metadata.json`. The directory is built under a hidden `.NAME.partial` name and
renamed only when complete, so an interrupted export never looks finished.
"""

from __future__ import annotations

import datetime as dt
import itertools
import operator
import os
import shutil
import struct
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click
import orjson

if __package__ in (None, ""):  # run by path: `uv run src/imt_ml/export_track_data.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imt_ml.utils import (
    EXPORT_DIR_FORMAT,
    FEATURE_SCHEMA,
    METADATA_FILE,
    SHARD_PATTERN,
    TRACKER_TIMEZONE,
    UserError,
    log,
    progress,
    timestamped_dir,
    write_json,
)

SERIES_PATTERN = "track_timeseries:*"
HISTORY_PREFIX = "track_history:"
SERIES_PREFIX = "track_timeseries:"

#: Members fetched per ZRANGE + MGET round trip pair.
FETCH_CHUNK = 2000

#: Why a record was left out, in the order the summary lists them.
SKIP_REASONS = (
    "null_track",
    "empty_track",
    "non_numeric_track",
    "invalid_json",
    "missing_field",
    "wrong_type",
    "invalid_value",
    "expired_key",
    "duplicate",
)

# ---------------------------------------------------------------------------
# Parsing one assignment JSON into a record in schema order.
# ---------------------------------------------------------------------------

REQUIRED_FIELDS = (
    "station_id", "route_id", "trip_id", "headsign", "assignment_type",
    "direction_id", "day_of_week", "hour", "minute",
    "track_number",
    "scheduled_time",
    "actual_time",
    "recorded_time",
)  # fmt: skip

Record = tuple  # values in FEATURE_SCHEMA order


def _timestamp(value: Any) -> float | None:
    """Unix seconds of an ISO 8601 string with an offset; None if it is not one."""
    if not isinstance(value, str):
        return None
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    if parsed.tzinfo is None:  # the tracker always writes an offset
        return None
    return parsed.timestamp()


_REQUIRED = frozenset(REQUIRED_FIELDS)


def parse_assignment(raw: bytes | str | None) -> Record | str:
    """A record tuple (FEATURE_SCHEMA order), or the skip reason as a string.

    This runs once per exported record, so it is written for speed: one dict
    lookup per field, no per-field helper calls on the common path.
    """
    if raw is None:
        return "expired_key"
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return "invalid_json"
    if type(doc) is not dict:
        return "invalid_json"
    if not _REQUIRED <= doc.keys():
        return "missing_field"

    track = doc["track_number"]
    if track is None:
        return "null_track"
    if type(track) is not str:
        return "wrong_type"
    track = track.strip()
    if not track:
        return "empty_track"
    if not (track.isascii() and track.isdigit()):
        return "non_numeric_track"

    station, route, trip = doc["station_id"], doc["route_id"], doc["trip_id"]
    headsign, kind = doc["headsign"], doc["assignment_type"]
    if not (
        type(station) is str and type(route) is str and type(trip) is str
        and type(headsign) is str and type(kind) is str
        and station and route and trip
    ):  # fmt: skip
        return "wrong_type"
    direction, weekday, hour, minute = (
        doc["direction_id"], doc["day_of_week"], doc["hour"], doc["minute"]
    )  # fmt: skip
    # type() rather than isinstance(): a JSON true/false must not pass as 1/0.
    if not (type(direction) is int and type(weekday) is int and type(hour) is int
            and type(minute) is int):  # fmt: skip
        return "wrong_type"
    if not (0 <= direction <= 1 and 0 <= weekday <= 6 and 0 <= hour <= 23 and 0 <= minute <= 59):
        return "invalid_value"

    scheduled = _timestamp(doc["scheduled_time"])
    recorded = _timestamp(doc["recorded_time"])
    actual = 0.0 if doc["actual_time"] is None else _timestamp(doc["actual_time"])
    if scheduled is None or recorded is None or actual is None:
        return "invalid_value"

    return (
        station, route, trip, headsign, direction, kind, track,
        scheduled, actual, recorded, weekday, hour, minute,
    )  # fmt: skip


# ---------------------------------------------------------------------------
# tf.train.Example encoding.
#
# Building tf.train.Example messages through the protobuf API costs ~30 us a
# record, more than the whole rest of the export. The schema is fixed, so the
# wire format is written directly; tests parse the bytes back with
# tf.io.parse_example and compare them with the protobuf API's output.
# https://protobuf.dev/programming-guides/encoding/
#
#   Example  { features (1): Features }
#   Features { feature (1): repeated MapEntry { key (1): string, value (2): Feature } }
#   Feature  { bytes_list (1) | float_list (2) | int64_list (3) }, each { value (1) }
# Map entries may come in any order, so the strings go first and the numbers
# after them in one struct-packed block.
# ---------------------------------------------------------------------------

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


_NAMES = list(FEATURE_SCHEMA)
_STRING_SLOTS = [i for i, kind in enumerate(FEATURE_SCHEMA.values()) if kind == "bytes"]
_NUMBER_SLOTS = [i for i, kind in enumerate(FEATURE_SCHEMA.values()) if kind != "bytes"]
_get_strings = operator.itemgetter(*_STRING_SLOTS)
_get_numbers = operator.itemgetter(*_NUMBER_SLOTS)


def _string_headers(name: str) -> list[bytes]:
    """Everything before a string value's bytes, by value length, while one-byte lengths suffice."""
    headers = []
    for n in range(128):
        entry = _map_entry(name, _feature("bytes", b"\0" * n))
        if len(entry) - n != len(name) + 10:  # a length no longer fits in one byte
            break
        headers.append(entry[: len(entry) - n])
    return headers


_STRING_HEADERS = [_string_headers(_NAMES[i]) for i in _STRING_SLOTS]


def _number_block_struct() -> tuple[struct.Struct, list[bytes]]:
    """One Struct that packs every numeric feature's map entry (ints 0..127 only)."""
    fmt, prefixes = "<", []
    for i in _NUMBER_SLOTS:
        kind = FEATURE_SCHEMA[_NAMES[i]]
        placeholder = _map_entry(_NAMES[i], _feature(kind, 0.0 if kind == "float" else 0))
        width = 4 if kind == "float" else 1
        prefixes.append(placeholder[:-width])
        fmt += f"{len(placeholder) - width}s" + ("f" if kind == "float" else "B")
    return struct.Struct(fmt), prefixes


_NUMBER_BLOCK, _NUMBER_PREFIXES = _number_block_struct()


def encode_example_reference(record: Record) -> bytes:
    """Plain encoder for any values (any string length, any int64)."""
    entries = [
        _map_entry(name, _feature(kind, value))
        for (name, kind), value in zip(FEATURE_SCHEMA.items(), record, strict=True)
    ]
    return _length_delimited(b"\x0a", b"".join(entries))


def encode_example(record: Record) -> bytes:
    """Serialize a record (FEATURE_SCHEMA order) as a tf.train.Example."""
    parts = []
    try:
        for headers, value in zip(_STRING_HEADERS, _get_strings(record), strict=True):
            data = value.encode()
            parts.append(headers[len(data)])
            parts.append(data)
        parts.append(
            _NUMBER_BLOCK.pack(*itertools.chain.from_iterable(
                zip(_NUMBER_PREFIXES, _get_numbers(record), strict=True)
            ))
        )  # fmt: skip
    except (IndexError, struct.error):  # a long string or an int beyond one varint byte
        return encode_example_reference(record)
    body = b"".join(parts)
    return b"\x0a" + _varint(len(body)) + body


# ---------------------------------------------------------------------------
# What an export saw: counts for metadata.json and the closing summary.
# ---------------------------------------------------------------------------


class ExportStats:
    """Counts of written and skipped records; memory bounded by the vocabularies."""

    def __init__(self) -> None:
        self.written = 0
        self.skipped: Counter[str] = Counter()
        self.stations: Counter[str] = Counter()
        self.routes: Counter[str] = Counter()
        self.tracks: dict[str, Counter[str]] = defaultdict(Counter)
        self.first_scheduled: float | None = None
        self.last_scheduled: float | None = None

    def add(self, record: Record) -> None:
        self.written += 1
        station, route, scheduled = record[0], record[1], record[7]
        self.stations[station] += 1
        self.routes[route] += 1
        self.tracks[station][record[6]] += 1
        if self.first_scheduled is None or scheduled < self.first_scheduled:
            self.first_scheduled = scheduled
        if self.last_scheduled is None or scheduled > self.last_scheduled:
            self.last_scheduled = scheduled

    def skip(self, reason: str) -> None:
        self.skipped[reason] += 1

    def metadata(self, **extra: Any) -> dict[str, Any]:
        def iso(ts: float | None) -> str | None:
            return None if ts is None else dt.datetime.fromtimestamp(ts, dt.UTC).isoformat()

        return {
            "total_records": self.written,
            "created_at": dt.datetime.now(dt.UTC).isoformat(),
            "schema": dict(FEATURE_SCHEMA),
            "target": "track_number",
            "time_range": {
                "first_scheduled": iso(self.first_scheduled),
                "last_scheduled": iso(self.last_scheduled),
                "first_scheduled_timestamp": self.first_scheduled,
                "last_scheduled_timestamp": self.last_scheduled,
            },
            "stations": dict(self.stations.most_common()),
            "routes": dict(self.routes.most_common()),
            "tracks": {
                station: dict(sorted(counts.items(), key=lambda kv: int(kv[0])))
                for station, counts in sorted(self.tracks.items())
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


# ---------------------------------------------------------------------------
# Sharded, atomic TFRecord output.
# ---------------------------------------------------------------------------


class TFRecordShardWriter:
    """Writes `track_data_NNNN.tfrecord` shards into a hidden `.NAME.partial`
    directory and renames it to `NAME` (with metadata.json) only on commit()."""

    def __init__(self, output_root: Path | str, records_per_file: int) -> None:
        import tensorflow as tf

        self._tf = tf
        self.output_root = Path(output_root)
        self.records_per_file = records_per_file
        self.output_root.mkdir(parents=True, exist_ok=True)
        self.final_dir = timestamped_dir(self.output_root, EXPORT_DIR_FORMAT)
        self.partial_dir = self.output_root / f".{self.final_dir.name}.partial"
        self.partial_dir.mkdir()
        self.files: list[dict[str, Any]] = []
        self._writer: Any = None
        self._in_file = 0

    def write(self, serialized: bytes) -> None:
        if self._writer is None or self._in_file >= self.records_per_file:
            self._open_next()
        self._writer.write(serialized)
        self._in_file += 1
        self.files[-1]["records"] = self._in_file

    def _open_next(self) -> None:
        self._close_current()
        name = SHARD_PATTERN.format(len(self.files))
        self._writer = self._tf.io.TFRecordWriter(str(self.partial_dir / name))
        self._in_file = 0
        self.files.append({"file": name, "records": 0})

    def _close_current(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def commit(self, metadata: dict[str, Any]) -> Path:
        """Close the shards, write metadata.json and publish the directory."""
        self._close_current()
        write_json(self.partial_dir / METADATA_FILE, {**metadata, "files": self.files})
        os.rename(self.partial_dir, self.final_dir)
        return self.final_dir

    def abort(self) -> None:
        """Remove everything written so far."""
        self._close_current()
        shutil.rmtree(self.partial_dir, ignore_errors=True)

    def __enter__(self) -> TFRecordShardWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is not None and self.partial_dir.exists():
            self.abort()


# ---------------------------------------------------------------------------
# Reading the tracker's layout from Redis.
# ---------------------------------------------------------------------------


class RedisTarget:
    """Where to connect, described without the password (safe to print)."""

    def __init__(
        self,
        host: str,
        port: int,
        password: str | None = None,
        url: str | None = None,
        timeout: float = 10.0,
    ) -> None:
        self.url = url
        self.password = password
        self.timeout = timeout
        if url:
            parts = urlsplit(url)
            if parts.scheme not in ("redis", "rediss", "unix"):
                raise UserError("--redis-url must start with redis://, rediss:// or unix://")
            self.host = parts.hostname or "localhost"
            try:
                self.port = parts.port or 6379
            except ValueError as exc:
                raise UserError(f"--redis-url has an invalid port: {exc}") from None
            self.secrets = [s for s in (parts.password, parts.username) if s]
        else:
            self.host, self.port = host, port
            self.secrets = [password] if password else []

    @property
    def label(self) -> str:
        return f"{self.host}:{self.port}"

    def redact(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text

    def connect(self) -> Any:
        """A connected client (PING answered), or UserError with one clear line."""
        import redis

        options: dict[str, Any] = {
            "socket_connect_timeout": self.timeout,
            "socket_timeout": self.timeout * 3,
        }
        try:
            if self.url:
                client = redis.Redis.from_url(self.url, **options)
            else:
                client = redis.Redis(
                    host=self.host, port=self.port, password=self.password or None, **options
                )
            client.ping()
        except Exception as exc:
            raise self.error(exc) from None
        return client

    def error(self, exc: BaseException) -> UserError:
        """Translate a redis-py exception into a one-line message without secrets."""
        import redis

        text = self.redact(str(exc)) or type(exc).__name__
        if isinstance(exc, redis.AuthenticationError) or any(
            word in text for word in ("WRONGPASS", "NOAUTH", "invalid password", "invalid username")
        ):
            return UserError(
                f"Redis at {self.label} refused the credentials (check the password/username)"
            )
        if isinstance(exc, redis.TimeoutError):
            return UserError(f"Redis at {self.label} timed out: {text}")
        if isinstance(exc, redis.ConnectionError):
            return UserError(f"cannot reach Redis at {self.label}: {text}")
        return UserError(f"Redis at {self.label} failed: {type(exc).__name__}: {text}")


def _member_owner_series(member: bytes) -> bytes | None:
    """`track_timeseries:{station}:{route}` that should index this history key."""
    parts = member.split(b":", 3)
    if len(parts) < 4 or parts[0] + b":" != HISTORY_PREFIX.encode():
        return None
    return SERIES_PREFIX.encode() + parts[1] + b":" + parts[2]


class TrackDataExporter:
    """Streams track history from Redis into a TFRecordShardWriter.

    Memory stays flat: sorted sets are paged by rank, FETCH_CHUNK members at a
    time, and each page's values come back in one MGET.
    """

    def __init__(
        self,
        client: Any,
        since: float | None = None,
        until: float | None = None,
        chunk_size: int = FETCH_CHUNK,
    ) -> None:
        self.client = client
        self.since = since
        self.until = until
        self.chunk_size = chunk_size
        self.stats = ExportStats()

    def find_series(self) -> list[bytes]:
        """Every `track_timeseries:*` sorted set (SCAN, never KEYS)."""
        keys = []
        bar = progress(desc="Scanning Redis", unit=" sets")
        for key in self.client.scan_iter(match=SERIES_PATTERN, count=1000, _type="zset"):
            keys.append(key)
            bar.update(1)
        bar.close()
        return sorted(keys)

    def rank_ranges(self, series: list[bytes]) -> list[tuple[bytes, int, int]]:
        """(key, first rank, end rank exclusive) of the members within since/until."""
        # Ranks of the first member at/after `since` and the first at/after `until`;
        # "(x" is Redis's exclusive bound, so ZCOUNT(-inf, "(x") is the rank of x.
        low = "-inf" if self.since is None else f"({self.since!r}"
        high = "+inf" if self.until is None else f"({self.until!r}"
        pipe = self.client.pipeline(transaction=False)
        for key in series:
            pipe.zcount(key, "-inf", low)
            pipe.zcount(key, "-inf", high)
        counts = pipe.execute()
        ranges = []
        for i, key in enumerate(series):
            start = 0 if self.since is None else counts[2 * i]
            end = counts[2 * i + 1]
            if end > start:
                ranges.append((key, start, end))
        return ranges

    def _duplicated_elsewhere(self, members: list[bytes]) -> set[bytes]:
        """Members of a foreign series that their own series also lists."""
        owned = [(m, _member_owner_series(m)) for m in members]
        owned = [(m, s) for m, s in owned if s is not None]
        if not owned:
            return set()
        pipe = self.client.pipeline(transaction=False)
        for member, series in owned:
            pipe.zscore(series, member)
        return {m for (m, _), score in zip(owned, pipe.execute(), strict=True) if score is not None}

    def _fetch_page(self, key: bytes, first: int, last: int) -> tuple[list, list, set]:
        """Members ranked first..last, their JSON values, and those duplicated elsewhere."""
        members = self.client.zrange(key, first, last)
        values = self.client.mget(members) if members else []
        own_prefix = HISTORY_PREFIX.encode() + key[len(SERIES_PREFIX) :] + b":"
        foreign = [m for m in members if not m.startswith(own_prefix)]
        duplicated = self._duplicated_elsewhere(foreign) if foreign else set()
        return members, values, duplicated

    def _pages(
        self, ranges: list[tuple[bytes, int, int]]
    ) -> Iterator[tuple[bytes, list, list, set]]:
        """Pages in order, the next one fetched on a second thread while this one is used."""
        from concurrent.futures import ThreadPoolExecutor

        plan = [
            (key, first, min(first + self.chunk_size, end) - 1)
            for key, start, end in ranges
            for first in range(start, end, self.chunk_size)
        ]
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="redis-fetch") as pool:
            pending = pool.submit(self._fetch_page, *plan[0]) if plan else None
            for i, (key, _, _) in enumerate(plan):
                assert pending is not None
                page = pending.result()
                pending = pool.submit(self._fetch_page, *plan[i + 1]) if i + 1 < len(plan) else None
                yield (key, *page)

    def iter_records(self, ranges: list[tuple[bytes, int, int]]) -> Iterator[Record]:
        """Valid, de-duplicated records in (series, scheduled time) order."""
        total = sum(end - start for _, start, end in ranges)
        bar = progress(total=total, desc="Exporting records", unit=" rec", smoothing=0.1)
        current_key: bytes | None = None
        last_scheduled: float | None = None
        seen: set[tuple[str, str]] = set()
        skip = self.stats.skip
        try:
            for key, members, values, duplicated in self._pages(ranges):
                if key != current_key:
                    current_key, last_scheduled, seen = key, None, set()
                for member, raw in zip(members, values, strict=True):
                    if duplicated and member in duplicated:
                        skip("duplicate")
                        continue
                    record = parse_assignment(raw)
                    if isinstance(record, str):
                        skip(record)
                        continue
                    # The same trip at the same station and scheduled time under two
                    # keys: the score is the scheduled time, so they sit side by side.
                    if record[7] != last_scheduled:
                        last_scheduled, seen = record[7], set()
                    identity = (record[0], record[2])
                    if identity in seen:
                        skip("duplicate")
                        continue
                    seen.add(identity)
                    yield record
                bar.update(len(members))
        finally:
            bar.close()

    def export(self, writer: TFRecordShardWriter) -> Path:
        """Run the whole export into `writer`; returns the published directory."""
        series = self.find_series()
        if not series:
            raise UserError("no track history in Redis: no track_timeseries:* sorted sets found")
        ranges = self.rank_ranges(series)
        for record in self.iter_records(ranges):
            writer.write(encode_example(record))
            self.stats.add(record)
        if self.stats.written == 0:
            raise UserError(
                "no exportable records"
                + (" in the --since/--until range" if self.since or self.until else "")
                + f" ({self.stats.summary()})"
            )
        return writer.commit(
            self.stats.metadata(
                source="redis",
                series_count=len(series),
                since=self.since,
                until=self.until,
                records_per_file=writer.records_per_file,
            )
        )


# ---------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------


def parse_time_bound(text: str | None, *, end: bool) -> float | None:
    """Unix seconds for --since/--until.

    A date means midnight in the tracker's local time (America/New_York); an
    --until date includes that whole day. A full ISO datetime is taken as given
    (naive ones in local time).
    """
    if text is None:
        return None
    from zoneinfo import ZoneInfo

    local = ZoneInfo(TRACKER_TIMEZONE)
    try:
        if len(text) == 10:
            day = dt.date.fromisoformat(text)
            if end:
                day += dt.timedelta(days=1)
            return dt.datetime.combine(day, dt.time(), tzinfo=local).timestamp()
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        flag = "--until" if end else "--since"
        raise UserError(f"{flag} {text!r} is not a date (YYYY-MM-DD) or ISO datetime") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=local)
    return moment.timestamp()


def run_export(
    target: RedisTarget,
    output: Path,
    records_per_file: int,
    since: float | None = None,
    until: float | None = None,
) -> tuple[Path, ExportStats, float]:
    """Connect, export and publish; returns (directory, stats, seconds spent exporting)."""
    import redis

    client = target.connect()
    exporter = TrackDataExporter(client, since=since, until=until)
    try:
        with TFRecordShardWriter(output, records_per_file) as writer:
            started = time.perf_counter()  # after TensorFlow's import, which the writer does
            path = exporter.export(writer)
    except redis.RedisError as exc:
        raise target.error(exc) from None
    except OSError as exc:
        raise UserError(f"cannot write the export under {output}: {exc}") from None
    finally:
        client.close()
    return path, exporter.stats, time.perf_counter() - started


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "--output",
    "-o",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("track_data_export"),
    show_default=True,
    help="Export root; each export becomes a timestamped directory inside it.",
)
@click.option(
    "--redis-host",
    envvar="IMT_REDIS_ENDPOINT",
    default="localhost",
    show_default=True,
    help="Redis host [env: IMT_REDIS_ENDPOINT].",
)
@click.option(
    "--redis-port",
    envvar="IMT_REDIS_PORT",
    type=int,
    default=6379,
    show_default=True,
    help="Redis port [env: IMT_REDIS_PORT].",
)
@click.option(
    "--redis-password",
    envvar="IMT_REDIS_PASSWORD",
    default=None,
    help="Redis password [env: IMT_REDIS_PASSWORD]; never printed or saved.",
)
@click.option(
    "--redis-url",
    default=None,
    help="redis:// or rediss:// URL (may carry an ACL user and password); "
    "overrides host, port and password.",
)
@click.option(
    "--records-per-file",
    type=click.IntRange(min=1),
    default=10_000,
    show_default=True,
    help="Records per TFRecord shard.",
)
@click.option("--since", default=None, help="First scheduled date (YYYY-MM-DD, local) to export.")
@click.option("--until", default=None, help="Last scheduled date (YYYY-MM-DD, local), inclusive.")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0.1),
    default=10.0,
    show_default=True,
    help="Seconds to wait for Redis to connect.",
)
def cli(
    output: Path,
    redis_host: str,
    redis_port: int,
    redis_password: str | None,
    redis_url: str | None,
    records_per_file: int,
    since: str | None,
    until: str | None,
    timeout: float,
) -> None:
    """Export track assignments from the tracker's Redis to TFRecord files."""
    since_ts = parse_time_bound(since, end=False)
    until_ts = parse_time_bound(until, end=True)
    if since_ts is not None and until_ts is not None and until_ts <= since_ts:
        raise UserError("--until must not be earlier than --since")

    target = RedisTarget(redis_host, redis_port, redis_password, redis_url, timeout)
    log(f"Reading track history from Redis at {target.label}")
    path, stats, seconds = run_export(target, output, records_per_file, since_ts, until_ts)
    rate = stats.written / seconds if seconds > 0 else float("inf")
    log(
        f"Exported {stats.written:,} records in {seconds:.1f} s ({rate:,.0f} records/s) "
        f"to {path}; {stats.summary()}"
    )
    click.echo(str(path))


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
