"""The exporter against a real redis-server: what it reads, writes, skips and refuses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from imt_ml.export_track_data import (
    TFRecordShardWriter,
    cli,
    crc32c,
    encode_example,
    encode_example_reference,
    frame_tfrecord,
    parse_assignment,
)
from imt_ml.sample_data import SampleHistory, seed_redis
from imt_ml.utils import FEATURE_SCHEMA, METADATA_FILE, free_port

from conftest import REDIS_PASSWORD, assignment, only_export_dir, read_export

REPO = Path(__file__).resolve().parents[1]
ONE_YEAR = 365 * 24 * 3600


def put(client, doc: dict | None, *, raw: str | None = None, series: str | None = None,
        member: str | None = None) -> str:  # fmt: skip
    """Store one assignment the way the tracker does; returns the history key."""
    from datetime import datetime

    base = doc or assignment()
    when = datetime.fromisoformat(base["scheduled_time"])
    member = member or (
        f"track_history:{base['station_id']}:{base['route_id']}:{base['trip_id']}:{when.date()}"
    )
    series = series or f"track_timeseries:{base['station_id']}:{base['route_id']}"
    payload = raw if raw is not None else (json.dumps(doc) if doc is not None else None)
    if payload is not None:
        client.set(member, payload, ex=ONE_YEAR)
    client.zadd(series, {member: when.timestamp()})
    return member


def export(tmp_path: Path, port: int, *args: str, env: dict | None = None):
    out = tmp_path / "export"
    result = CliRunner().invoke(
        cli, ["--output", str(out), "--redis-port", str(port), "--redis-host", "127.0.0.1", *args],
        env=env,
    )  # fmt: skip
    return result, out


def metadata(path: Path) -> dict:
    return json.loads((path / METADATA_FILE).read_text())


# ---------------------------------------------------------------------------
# Round trip and format
# ---------------------------------------------------------------------------


def test_sample_history_round_trips_through_redis_with_all_fields(redis_client, redis_server,
                                                                   tmp_path, clean_env):  # fmt: skip
    dirty = seed_redis(redis_client, 3000, seed=7)
    result, out = export(tmp_path, redis_server.port, "--records-per-file", "700")
    assert result.exit_code == 0, result.output
    path = only_export_dir(out)

    # What the exporter should have kept: the generator's clean records, parsed.
    expected = [
        parse_assignment(e.payload)
        for e in SampleHistory(seed=7).generate(3000)
        if e.kind == "clean"
    ]
    got = read_export(path)
    assert len(got) == len(expected) == 3000 - sum(dirty.values())

    def key(rec):
        return (rec[0], rec[2], np.float32(rec[7]))

    by_key = {key(tuple(r[name] for name in FEATURE_SCHEMA)): r for r in got}
    assert len(by_key) == len(got)
    for rec in expected:
        row = by_key[key(rec)]
        for name, value in zip(FEATURE_SCHEMA, rec, strict=True):
            if FEATURE_SCHEMA[name] == "float":
                assert row[name] == pytest.approx(np.float32(value)), name
            else:
                assert row[name] == value, name

    meta = metadata(path)
    assert meta["total_records"] == len(expected)
    assert meta["schema"] == FEATURE_SCHEMA
    assert {k: v for k, v in meta["skipped"].items() if v} == dict(dirty)
    assert sum(f["records"] for f in meta["files"]) == len(expected)
    assert set(meta["stations"]) == {"place-sstat", "place-bbsta", "place-rugg", "place-north"}
    assert len(meta["routes"]) == 12
    assert meta["time_range"]["first_scheduled"] < meta["time_range"]["last_scheduled"]
    # The closing summary names the directory; stdout carries the path alone.
    assert result.stdout.strip() == str(path)


EDGE_RECORDS = [
    ("place-sstat", "CR-Worcester", "CR-733772-520", "Worcester - Worcester Ln", 0,
     "historical", "5", 1736980500.0, 0.0, 1736979603.1, 2, 17, 35),
    ("place-north", "CR-Lowell", "x" * 300, "Lowell – Lowell Ln ünïcode", 1,
     "predicted", "10", 1.5e9, 1.5e9 + 60, 1.5e9 - 60, 6, 23, 59),
    ("s", "r", "t", "", 1000, "", "1", -1.0, 0.0, 3.4e38, -3, 200, 0),
    # Empty strings everywhere, a 100 kB headsign, emoji, int64 extremes.
    ("", "", "", "", -(2**63), "", "", 0.0, -3.4e38, 1e-30, 2**63 - 1, -1, 127),
    ("place-bbsta", "CR-Providence", "\x00\n\t\"", "🚆" * 25_000 + "é", 128, "historical",
     "13", 1.7e9, 1.7e9, 1.7e9, 16383, 16384, 2**31),
]  # fmt: skip


def reference_example(record):
    """The record as tf.train.Example, built with TensorFlow's own protobuf API."""
    import tensorflow as tf

    def feature(kind, value):
        if kind == "bytes":
            return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value.encode()]))
        if kind == "float":
            return tf.train.Feature(float_list=tf.train.FloatList(value=[value]))
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))

    return tf.train.Example(
        features=tf.train.Features(
            feature={
                name: feature(kind, value)
                for (name, kind), value in zip(FEATURE_SCHEMA.items(), record, strict=True)
            }
        )
    )


@pytest.mark.parametrize("record", EDGE_RECORDS)
def test_fast_encoder_matches_tensorflows_protobuf(record):
    import tensorflow as tf

    reference = reference_example(record)
    for encoded in (encode_example(record), encode_example_reference(record)):
        assert tf.train.Example.FromString(encoded) == reference


def test_shard_writer_framing_reads_back_with_tensorflow(tmp_path):
    """TFRecord files written without TensorFlow: every record back, checksums verified."""
    import tensorflow as tf

    records = EDGE_RECORDS * 3
    with TFRecordShardWriter(tmp_path, records_per_file=4) as writer:
        for record in records:
            writer.write(encode_example(record))
        path = writer.commit({"total_records": len(records)})
    files = sorted(str(p) for p in path.glob("track_data_*.tfrecord"))
    assert len(files) == 4  # 15 records, 4 a shard
    got = [tf.train.Example.FromString(raw.numpy()) for raw in tf.data.TFRecordDataset(files)]
    assert got == [reference_example(r) for r in records]

    # A flipped bit in a value fails TensorFlow's data checksum: the CRCs are real.
    first = Path(files[0])
    data = bytearray(first.read_bytes())
    data[40] ^= 0x01
    first.write_bytes(bytes(data))
    with pytest.raises(tf.errors.DataLossError, match="(?i)checksum|corrupt"):
        list(tf.data.TFRecordDataset([str(first)]))


def test_crc32c_is_the_castagnoli_checksum():
    # The standard check value of CRC-32C; an empty record's data CRC is 0, masked.
    assert crc32c(b"123456789") == 0xE3069283
    empty = frame_tfrecord(b"")
    assert len(empty) == 16 and empty[:8] == b"\0" * 8
    assert empty[12:] == (0xA282EAD8).to_bytes(4, "little")


def test_export_path_never_imports_tensorflow(redis_client, redis_server, tmp_path):
    """Redis export and the sample generator's direct export, each in a fresh process."""
    seed_redis(redis_client, 500, seed=3)
    code = f"""
import sys
from pathlib import Path
from imt_ml.export_track_data import cli
from imt_ml.sample_data import write_export
try:
    cli(["-o", {str(tmp_path / "redis")!r}, "--redis-host", "127.0.0.1",
         "--redis-port", "{redis_server.port}"], standalone_mode=False)
    write_export(Path({str(tmp_path / "direct")!r}), 500, seed=3, records_per_file=100)
finally:
    print("LOADED:", sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras")))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "LOADED: []" in proc.stdout
    assert len(read_export(only_export_dir(tmp_path / "redis"))) > 400
    assert len(read_export(only_export_dir(tmp_path / "direct"))) > 400


# ---------------------------------------------------------------------------
# Dirty data: skipped, counted, summarised once
# ---------------------------------------------------------------------------


def test_each_kind_of_dirty_record_is_skipped_and_counted(redis_client, redis_server, tmp_path,
                                                          clean_env):  # fmt: skip
    good = assignment()
    put(redis_client, good)
    put(redis_client, assignment(trip="CR-1-1", track=None))
    put(redis_client, assignment(trip="CR-1-2", track=""))
    put(redis_client, assignment(trip="CR-1-3", track="Commuter Rail"))
    put(redis_client, assignment(trip="CR-1-11", track="0"))  # no platform is track 0
    put(redis_client, assignment(trip="CR-1-4"), raw='{"station_id": "place-sstat", "rou')
    missing = assignment(trip="CR-1-5")
    del missing["headsign"]
    put(redis_client, missing)
    put(redis_client, assignment(trip="CR-1-6", direction="0"))
    put(redis_client, assignment(trip="CR-1-7", hour=True))
    put(redis_client, assignment(trip="CR-1-8", minute=75))
    put(
        redis_client,
        None,
        raw=json.dumps(assignment(trip="CR-1-9", scheduled_time="soon")),
        member="track_history:place-sstat:CR-Worcester:CR-1-9:2025-01-15",
    )
    put(
        redis_client,
        None,
        member="track_history:place-sstat:CR-Worcester:CR-1-10:2025-01-15",
        series="track_timeseries:place-sstat:CR-Worcester",
    )  # expired key
    # Duplicates: the good key listed by a second series, and its JSON under a second key.
    first_key = put(redis_client, good, series="track_timeseries:place-sstat:CR-Franklin")
    put(redis_client, good, member=first_key.replace("2025-01-15", "20250115"))
    # Unrelated keys of the tracker, one of them matching the pattern with the wrong type.
    redis_client.set("track_prediction:place-sstat:CR-Worcester:x:2025-01-15", "{}")
    redis_client.set("track_timeseries:not-a-zset", "oops")
    redis_client.hset("ml:config", "a", "1")

    result, out = export(tmp_path, redis_server.port)
    assert result.exit_code == 0, result.output
    meta = metadata(only_export_dir(out))
    assert meta["total_records"] == 1
    assert meta["skipped"] == {
        "null_track": 1, "empty_track": 1, "non_numeric_track": 1, "invalid_track": 1,
        "invalid_json": 1, "missing_field": 1, "wrong_type": 2, "invalid_value": 2,
        "expired_key": 1, "duplicate": 2,
    }  # fmt: skip
    # One summary line, not a line per record.
    assert "skipped 13 (" in result.stderr
    assert result.stderr.count("\n") <= 3


def test_reads_only_the_two_history_key_families(redis_client, redis_server, tmp_path, clean_env):
    """Watch the server with MONITOR: every key the exporter names is track history."""
    import redis

    seed_redis(redis_client, 300, seed=1)
    redis_client.set("track_prediction:place-sstat:CR-Worcester:x:2025-01-15", "{}")
    redis_client.set("vehicles:123", "{}")

    monitor_client = redis.Redis(host="127.0.0.1", port=redis_server.port)
    commands: list[str] = []
    ready = threading.Event()

    def watch():
        with monitor_client.monitor() as monitor:
            ready.set()
            for event in monitor.listen():
                if "imt-test-stop" in event["command"]:
                    return
                commands.append(event["command"])

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    ready.wait(5)
    time.sleep(0.2)
    result, _ = export(tmp_path, redis_server.port)
    redis_client.echo("imt-test-stop")
    thread.join(10)
    assert result.exit_code == 0, result.output

    verbs = {c.split()[0].upper() for c in commands}
    assert verbs <= {"PING", "SCAN", "ZCOUNT", "ZRANGE", "MGET", "ZSCORE", "CLIENT", "HELLO",
                     "INFO", "SELECT"}, verbs  # fmt: skip
    assert not {"SET", "DEL", "EXPIRE", "KEYS", "GET", "HGETALL", "FLUSHALL"} & verbs
    for command in commands:
        parts = command.split()
        verb = parts[0].upper()
        if verb == "SCAN":
            assert "MATCH track_timeseries:* " in command
        elif verb in {"ZCOUNT", "ZRANGE", "ZSCORE"}:
            assert parts[1].startswith("track_timeseries:"), command
        elif verb == "MGET":
            assert all(p.startswith("track_history:") for p in parts[1:]), command
    # Reads are batched: far fewer MGETs than records.
    assert 0 < sum(c.upper().startswith("MGET") for c in commands) < 40


# ---------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------


def test_since_and_until_select_by_local_scheduled_date(redis_client, redis_server, tmp_path,
                                                        clean_env):  # fmt: skip
    for i, day in enumerate(["2025-01-14", "2025-01-15", "2025-01-16", "2025-01-17"]):
        # 23:30 local is already the next day in UTC: dates are the tracker's local dates.
        put(redis_client, assignment(f"{day}T23:30:00-05:00", trip=f"CR-1-{i}"))
    result, out = export(tmp_path, redis_server.port, "--since", "2025-01-15", "--until",
                         "2025-01-16")  # fmt: skip
    assert result.exit_code == 0, result.output
    records = read_export(only_export_dir(out))
    assert sorted(r["trip_id"] for r in records) == ["CR-1-1", "CR-1-2"]

    result, _ = export(tmp_path, redis_server.port, "--since", "2026-01-01")
    assert result.exit_code == 1
    assert "no exportable records" in result.stderr

    result, _ = export(tmp_path, redis_server.port, "--since", "15/01/2025")
    assert result.exit_code == 1 and "--since" in result.stderr


def test_records_per_file_shards_the_export(redis_client, redis_server, tmp_path, clean_env):
    for i in range(250):
        put(redis_client, assignment(trip=f"CR-1-{i}"))
    result, out = export(tmp_path, redis_server.port, "--records-per-file", "100")
    assert result.exit_code == 0, result.output
    path = only_export_dir(out)
    shards = sorted(p.name for p in path.glob("*.tfrecord"))
    assert shards == ["track_data_0000.tfrecord", "track_data_0001.tfrecord",
                      "track_data_0002.tfrecord"]  # fmt: skip
    assert [f["records"] for f in metadata(path)["files"]] == [100, 100, 50]
    assert len(read_export(path)) == 250


def test_environment_variables_configure_the_connection(password_redis_server, tmp_path, clean_env):
    import redis

    client = redis.Redis(host="127.0.0.1", port=password_redis_server.port, password=REDIS_PASSWORD)
    client.flushall()
    put(client, assignment())
    out = tmp_path / "export"
    env = {
        "IMT_REDIS_ENDPOINT": "127.0.0.1",
        "IMT_REDIS_PORT": str(password_redis_server.port),
        "IMT_REDIS_PASSWORD": REDIS_PASSWORD,
    }
    result = CliRunner().invoke(cli, ["--output", str(out)], env=env)
    assert result.exit_code == 0, result.output
    assert metadata(only_export_dir(out))["total_records"] == 1
    assert REDIS_PASSWORD not in result.output
    assert REDIS_PASSWORD not in (only_export_dir(out) / METADATA_FILE).read_text()

    # A URL with the password works too, and the password is not echoed.
    url = f"redis://:{REDIS_PASSWORD.replace(' ', '%20')}@127.0.0.1:{password_redis_server.port}/0"
    result = CliRunner().invoke(cli, ["--output", str(out), "--redis-url", url])
    assert result.exit_code == 0, result.output
    assert "%20" not in result.output and REDIS_PASSWORD not in result.output


# ---------------------------------------------------------------------------
# Failures: one line, exit 1, nothing left behind, no password shown
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("password", ["wrong-password-123", None])
def test_bad_credentials_fail_cleanly(password_redis_server, tmp_path, clean_env, password):
    args = ["--redis-password", password] if password else []
    result, out = export(tmp_path, password_redis_server.port, *args)
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert "refused the credentials" in lines[-1]
    assert not any("Traceback" in line for line in lines)
    assert "wrong-password-123" not in result.output
    assert not out.exists() or not any(out.iterdir())


def test_unreachable_redis_fails_cleanly(tmp_path, clean_env):
    result, out = export(tmp_path, free_port(), "--timeout", "2")
    assert result.exit_code == 1
    assert "cannot reach Redis at 127.0.0.1:" in result.stderr
    assert "Traceback" not in result.output
    assert not out.exists() or not any(out.iterdir())


def test_a_redis_that_never_answers_times_out_cleanly(tmp_path, clean_env):
    import socket

    with socket.socket() as silent:  # accepts connections (backlog) but never replies
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        port = silent.getsockname()[1]
        started = time.monotonic()
        result, out = export(tmp_path, port, "--timeout", "0.5")
    assert result.exit_code == 1
    assert "timed out" in result.stderr and "Traceback" not in result.output
    assert time.monotonic() - started < 20
    assert not out.exists() or not any(out.iterdir())


def test_empty_redis_is_an_error_not_an_empty_export(redis_client, redis_server, tmp_path,
                                                     clean_env):  # fmt: skip
    result, out = export(tmp_path, redis_server.port)
    assert result.exit_code == 1
    assert "no track_timeseries" in result.stderr
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_interrupted_export_never_looks_complete(redis_client, redis_server, tmp_path, sig):
    seed_redis(redis_client, 60_000, seed=3)
    out = tmp_path / "export"
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "src/imt_ml/export_track_data.py"), "--output", str(out),
         "--redis-host", "127.0.0.1", "--redis-port", str(redis_server.port),
         "--records-per-file", "200"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, "IMT_ML_NO_PROGRESS": "1"},
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        partial = list(out.glob(".*.partial/track_data_0003.tfrecord")) if out.exists() else []
        if partial:
            break
        assert proc.poll() is None, "export finished before it could be interrupted"
        time.sleep(0.005)
    readers = child_pids(proc.pid)
    assert readers, "the exporter should have its Redis reader process"
    proc.send_signal(sig)
    proc.wait(30)
    assert proc.returncode != 0
    # The reader process goes too, even when the exporter was killed outright.
    deadline = time.monotonic() + 15
    while any(Path(f"/proc/{pid}").exists() and "Z" not in process_state(pid) for pid in readers):
        assert time.monotonic() < deadline, f"reader process(es) {readers} outlived the exporter"
        time.sleep(0.1)
    published = [p for p in out.iterdir() if not p.name.startswith(".")]
    assert published == []
    assert not list(out.rglob(METADATA_FILE))
    if sig == signal.SIGINT:  # a clean interrupt removes its partial directory too
        assert list(out.iterdir()) == []
        assert b"Traceback" not in proc.stderr.read()


def child_pids(pid: int) -> list[int]:
    pids = []
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        pids += [int(p) for p in children.read_text().split()]
    return pids


def process_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"


def test_runs_by_path_and_as_console_script():
    by_path = subprocess.run(
        [sys.executable, str(REPO / "src/imt_ml/export_track_data.py"), "--help"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "--records-per-file" in by_path.stdout and "IMT_REDIS_ENDPOINT" in by_path.stdout
    script = Path(sys.executable).parent / "export-track-data"
    assert script.exists()
    assert "--redis-url" in subprocess.run([str(script), "--help"], capture_output=True,
                                           text=True, check=True).stdout  # fmt: skip


def test_track_labels_are_normalised_so_05_is_track_5(redis_client, redis_server, tmp_path,
                                                       clean_env):  # fmt: skip
    """One platform, one label: "05" and "5" are the same class, and the queue's "index i is
    track i + 1" holds (before, "05" was a class of its own and "0" wrapped to the last)."""
    put(redis_client, assignment(trip="CR-1-520", track="05"))
    put(redis_client, assignment(trip="CR-1-522", track="5"))
    put(redis_client, assignment(trip="CR-1-524", track="10"))
    result, out = export(tmp_path, redis_server.port)
    assert result.exit_code == 0, result.output
    export_dir = only_export_dir(out)
    assert sorted(r["track_number"] for r in read_export(export_dir)) == ["10", "5", "5"]
    assert metadata(export_dir)["tracks"] == {"place-sstat": {"5": 2, "10": 1}}


def test_clock_fields_are_written_in_boston_time_from_the_instant(
    redis_client, redis_server, tmp_path, clean_env
):
    """The tracker's UTC record and a local-offset record of the same departure export the
    same Boston clock (Thursday 20:05), whatever the record's own hour/day_of_week say."""
    utc = assignment("2026-01-15T20:05:00-05:00", trip="CR-1-143", utc=True)
    local = assignment("2026-01-15T20:05:00-05:00", trip="CR-1-145", utc=False)
    assert (utc["hour"], utc["day_of_week"]) == (1, 4)  # as the tracker wrote it: UTC
    put(redis_client, utc)
    put(redis_client, local)
    result, out = export(tmp_path, redis_server.port)
    assert result.exit_code == 0, result.output
    export_dir = only_export_dir(out)
    rows = read_export(export_dir)
    assert {(r["day_of_week"], r["hour"], r["minute"]) for r in rows} == {(3, 20, 5)}
    assert metadata(export_dir)["clock"] == "America/New_York"
