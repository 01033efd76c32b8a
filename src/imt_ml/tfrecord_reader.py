"""Train, evaluate and serve track-prediction models from an imt-ml TFRecord export.

    uv run src/imt_ml/tfrecord_reader.py track_data_export train --epochs 30
    uv run src/imt_ml/tfrecord_reader.py track_data_export evaluate --model MODEL.keras
    echo '{"station_id": "place-sstat", ...}' | \\
        uv run src/imt_ml/tfrecord_reader.py - predict --model MODEL.keras

DATA_DIR is one export directory, or an export root (its newest complete export is
used). From a notebook:

    from imt_ml.tfrecord_reader import load_tfrecord_dataset, create_simple_model
    train_ds, val_ds, vocab_info = load_tfrecord_dataset("track_data_export")
    model = create_simple_model(vocab_info)
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import click
import numpy as np

if __package__ in (None, ""):  # run by path: `uv run src/imt_ml/tfrecord_reader.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imt_ml import evaluation as ev
from imt_ml import utils

# Also read as tfrecord_reader attributes (tests, benchmarks, the other stages).
from imt_ml.evaluation import (
    BASELINE_NAMES,
    CLOSED_TRACK_EXPECTED,
    Evaluation,
    baseline_answers,
    baseline_tables,
    best_possible_accuracy,
    boston_days,
    coverage_at_precision,
    expected_calibration_error,
    fold_indices,
    label_indices,
    load_sample_truth,
    majority_vote,
    member_weights,
    recency_weights,
    strongest_baseline,
)
from imt_ml.utils import METADATA_FILE, Run, UserError, keras, log, option_field, pct, section, tf

#: The custom layers and callbacks (imt_ml/layers.py), imported with Keras on first use.
track_layers: Any = utils.LazyModule("imt_ml.layers")
#: Records as columns: field name -> one value per record.
Columns = dict[str, np.ndarray]
#: Input name -> dtype. Strings are raw ids; the clock is only the scheduled instant (Unix
#: seconds, float64: exact), which the model converts to Boston time itself.
MODEL_INPUTS: dict[str, str] = {
    "station_id": "string",
    "route_id": "string",
    "trip_id": "string",
    "headsign": "string",
    "direction_id": "int64",
    "scheduled_timestamp": "float64",
}
DEFAULT_MODEL_PATH = "track_prediction_model"
VALIDATION_FRACTION = 0.2
#: The time split validates on at most this many newest days: a refit model's horizon.
VALIDATION_DAYS = 28
#: The newest days every mode holds out of every choice made in training (headline figures).
TEST_DAYS = 7.0
#: Epochs of the refit on every record (--refit-epochs), from the validated weights.
REFIT_EPOCHS = 2
#: The refit's starting rate as a share of --learning-rate (smaller: new trips over-confident).
REFIT_LR_FACTOR = 1.0
CLOSED_TRACK_LOOKBACK_DAYS = 28
#: BostonClock day number standing for "open" in the model's table of closing days.
OPEN_TRACK_DAY = 1e7


def serving_input_specs() -> dict[str, Any]:
    """One tf.TensorSpec per model input: a batch of raw values, named as the input."""
    return {name: tf.TensorSpec([None], dtype, name=name) for name, dtype in MODEL_INPUTS.items()}


def find_export_dir(data_dir: Path | str) -> Path:
    """`data_dir` itself if it is an export, else the newest complete export inside it."""
    path = Path(data_dir)
    if not path.exists():
        raise UserError(f"data directory {path} does not exist")
    if not path.is_dir():
        raise UserError(f"{path} is not a directory")
    shards = list(path.glob(utils.SHARD_GLOB))
    has_metadata = (path / METADATA_FILE).is_file()
    if shards and not has_metadata:
        raise UserError(f"{path} has TFRecord files but no {METADATA_FILE}: an incomplete export?")
    if has_metadata and not shards:
        raise UserError(f"{path} has {METADATA_FILE} but no track_data_*.tfrecord files")
    if shards:
        return path
    exports = sorted(p for p in path.iterdir() if p.is_dir() and (p / METADATA_FILE).is_file())
    exports = [p for p in exports if not p.name.startswith(".") and any(p.glob(utils.SHARD_GLOB))]
    if not exports:
        raise UserError(
            f"no export in {path}: expected track_data_*.tfrecord files and {METADATA_FILE} "
            "there or in a subdirectory"
        )
    return exports[-1]


def make_raw_dataset(files: list[str], batch_size: int = 8192) -> Any:
    """A tf.data pipeline of parsed record batches: read, batch, then parse_example."""
    spec = utils.tf_parse_spec()
    return (
        tf.data.TFRecordDataset(files, num_parallel_reads=tf.data.AUTOTUNE)
        .batch(batch_size)
        .map(lambda batch: tf.io.parse_example(batch, spec), num_parallel_calls=tf.data.AUTOTUNE)
        .prefetch(tf.data.AUTOTUNE)
    )


def read_export_columns(export_dir: Path) -> Columns:
    """Every record of an export as numpy columns (strings as Python str)."""
    files = sorted(str(p) for p in export_dir.glob(utils.SHARD_GLOB))
    try:
        expected = json.loads((export_dir / METADATA_FILE).read_text()).get("total_records")
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {export_dir / METADATA_FILE}: {exc}") from None
    chunks: dict[str, list[np.ndarray]] = defaultdict(list)
    bar = utils.progress(total=expected, desc=f"Reading {export_dir.name}", unit=" rec")
    try:
        for batch in make_raw_dataset(files):
            for name, tensor in batch.items():
                chunks[name].append(tensor.numpy())
            bar.update(len(batch["track_number"]))
    except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as exc:
        message = str(exc).strip().splitlines()[0]
        raise UserError(f"corrupt TFRecord data in {export_dir}: {message}") from None
    finally:
        bar.close()
    if not chunks:
        raise UserError(f"the export {export_dir} holds no records")
    columns = {name: np.concatenate(parts) for name, parts in chunks.items()}
    for name, values in columns.items():
        if values.dtype == object:
            columns[name] = np.array([v.decode() for v in values], dtype=object)
    # Exact instants from the float32 seconds (within about 64 s) and the minute of the
    # hour: that minute of the nearest hour (Boston's UTC offsets are whole hours).
    minute = columns["minute"].astype(np.float64) * 60
    t = columns["scheduled_timestamp"].astype(np.float64) - minute
    columns["scheduled_timestamp"] = np.round(t / 3600) * 3600 + minute
    return columns


# -- Splitting by time, and the vocabularies of the training half -------------


def split_records(
    timestamps: np.ndarray, split: str, seed: int, val_fraction: float = VALIDATION_FRACTION,
    test_days: float = 0, validation_days: float = VALIDATION_DAYS,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:  # fmt: skip
    """(train, validation, test indices, description): the newest `test_days` are the test
    window; of the rest, "time": the latest 20% (at most `validation_days`, all strictly
    later than training) validate; "random": a seeded shuffle."""
    test, rest = np.zeros(0, dtype=np.int64), np.arange(len(timestamps))
    if test_days > 0:
        test_cut = timestamps.max() - test_days * ev.SECONDS_PER_DAY
        test, rest = np.flatnonzero(timestamps > test_cut), np.flatnonzero(timestamps <= test_cut)
        if len(rest) < 10:
            days = (timestamps.max() - timestamps.min()) / ev.SECONDS_PER_DAY
            raise UserError(
                f"the export covers {days:.1f} days: holding out the newest {test_days:g} "
                "(--test-days) leaves too little to train on; lower it, or 0 for none"
            )
        test = test[np.argsort(timestamps[test], kind="stable")]
    ts = timestamps[rest]
    if split == "random":
        order = rest[np.random.default_rng(seed).permutation(len(rest))]
        n_val = max(1, int(round(len(rest) * val_fraction)))
        info = {"method": "random", "seed": seed}
        train, val = np.sort(order[n_val:]), np.sort(order[:n_val])
    else:
        order = np.argsort(ts, kind="stable")
        cut_time = ts[order[int(len(ts) * (1 - val_fraction))]] if len(ts) > 1 else ts[0]
        # No more than the horizon the model is used for: the weeks after its newest record.
        cut_time = max(cut_time, ts.max() - validation_days * ev.SECONDS_PER_DAY)
        train, val = rest[ts < cut_time], rest[ts >= cut_time]
        if len(train) == 0 or len(val) == 0:
            raise UserError("cannot split by time: every record has the same scheduled time")
        train = train[np.argsort(timestamps[train], kind="stable")]
        val = val[np.argsort(timestamps[val], kind="stable")]
        info = {"method": "time", "cut_timestamp": float(cut_time)}
    info.update({
        "train_period": ev.period(timestamps[train]),
        "validation_period": ev.period(timestamps[val]),
        "test_days": float(test_days),
        "test_period": ev.period(timestamps[test]),
    })  # fmt: skip
    return train, val, test, info


@dataclass(frozen=True)
class Vocabulary:
    """What a model knows of its training records; `to_json`/`from_json` round-trip all but
    the history tables (those live in the model's weights). `vocab[key]` reads a field."""

    tracks: list[str]
    stations: list[str]
    routes: list[str]
    headsigns: list[str]
    train_numbers: list[str]
    station_trains: list[str]
    station_trips: list[str]
    station_tracks: dict[str, list[str]]
    timestamp_mean: float
    timestamp_std: float
    record_counts: dict[str, int] = field(default_factory=dict)
    split: dict[str, Any] = field(default_factory=dict)
    history: dict[str, np.ndarray] = field(default_factory=dict, repr=False, compare=False)
    directions: tuple[int, ...] = (0, 1)
    #: Days in which a record's weight in the history tables halves (0: all equal).
    recency_half_life: float = ev.RECENCY_HALF_LIFE_DAYS
    #: Nats of evidence that set a train's records before its newest regime aside (0: never).
    change_threshold: float = ev.CHANGE_THRESHOLD_NATS
    #: 2: the clock comes from the scheduled instant in Boston time (no hour inputs).
    format_version: int = 2
    #: station -> track -> the Boston day number its closure starts (see `closed_tracks`).
    closed_tracks: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.tracks)

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)

    def sizes(self) -> dict[str, int]:
        keys = ("stations", "routes", "headsigns", "train_numbers", "station_trains",
                "station_trips", "tracks")  # fmt: skip
        return {key: len(self[key]) for key in keys}

    def to_json(self) -> dict[str, Any]:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        del fields["history"]
        return {**fields, "directions": list(self.directions), "num_classes": self.num_classes,
                "inputs": dict(MODEL_INPUTS)}  # fmt: skip

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Vocabulary:
        names = {f.name for f in dataclasses.fields(cls)} - {"history"}
        values = {k: v for k, v in doc.items() if k in names}
        values["directions"] = tuple(values.get("directions", (0, 1)))
        values.setdefault("station_trips", [])  # vocabularies written before it lack it
        return cls(**values)


def track_labels(columns: Columns, train_idx: np.ndarray) -> list[str]:
    """The model's classes: the numeric tracks of the training records, in numeric order."""
    tracks = columns["track_number"][train_idx]
    labels = sorted({t for t in tracks if t.isdigit()}, key=ev.track_sort_key)
    if len(labels) < 2:
        raise UserError(
            f"the training data holds {len(labels)} track(s) ({', '.join(labels) or 'none'}): "
            "a model needs at least two to choose between"
        )
    return labels


def build_vocabulary(
    columns: Columns,
    train_idx: np.ndarray,
    labels: list[str],
    record_counts: dict[str, int],
    split: dict[str, Any],
    recency_half_life: float = ev.RECENCY_HALF_LIFE_DAYS,
    change_threshold: float = ev.CHANGE_THRESHOLD_NATS,
) -> Vocabulary:
    """Vocabularies, normalisation constants and history tables, from the training records."""
    stations = columns["station_id"][train_idx]
    trips = columns["trip_id"][train_idx]
    trains = ev.train_numbers(trips)
    station_tracks: dict[str, set[str]] = defaultdict(set)
    for station, track in zip(stations, columns["track_number"][train_idx], strict=True):
        station_tracks[station].add(track)
    ts = columns["scheduled_timestamp"][train_idx].astype(np.float64)
    vocab = Vocabulary(
        tracks=labels,
        stations=sorted(set(stations) - {""}),
        routes=sorted(set(columns["route_id"][train_idx]) - {""}),
        headsigns=sorted(set(columns["headsign"][train_idx]) - {""}),
        train_numbers=sorted(set(trains) - {""}, key=ev.track_sort_key),
        station_trains=sorted({f"{s}:{t}" for s, t in zip(stations, trains, strict=True)}),
        # The season-specific identity of a trip: trip ids change with the schedule.
        station_trips=sorted({f"{s}:{t}" for s, t in zip(stations, trips, strict=True)}),
        station_tracks={
            s: sorted(t, key=ev.track_sort_key) for s, t in sorted(station_tracks.items())
        },
        timestamp_mean=float(ts.mean()),
        timestamp_std=float(ts.std() or 1.0),
        record_counts=record_counts,
        split=split,
        recency_half_life=recency_half_life,
        change_threshold=change_threshold,
        closed_tracks=closed_tracks(columns, train_idx),
    )
    return dataclasses.replace(vocab, history=history_tables(vocab, columns, train_idx))


def closed_tracks(columns: Columns, idx: np.ndarray) -> dict[str, dict[str, int]]:
    """Platforms out of use among the records `idx`: station -> track -> the Boston day after
    its last departure (the rule: docs/model.md, "Closed platforms")."""
    stations, tracks = columns["station_id"][idx], columns["track_number"][idx]
    days = boston_days(columns["scheduled_timestamp"][idx].astype(np.float64))
    weekdays = ev.boston_weekdays(days)
    kinds = np.where(weekdays < 5, 0, weekdays - 4)  # weekday, Saturday, Sunday
    closed: dict[str, dict[str, int]] = {}
    for station in sorted(set(stations.tolist())):
        at = stations == station
        d, t, kind = days[at], tracks[at], kinds[at]
        for track in sorted(set(t.tolist()), key=ev.track_sort_key):
            used = t == track
            last = int(d[used].max())
            after = d > last
            if not after.any():
                continue
            before = (d <= last) & (d > last - CLOSED_TRACK_LOOKBACK_DAYS)
            expected = 0.0
            for k in range(3):
                same = before & (kind == k)
                if same.any():
                    expected += (used & same).sum() / same.sum() * (after & (kind == k)).sum()
            if expected >= CLOSED_TRACK_EXPECTED:
                closed.setdefault(station, {})[track] = last + 1
    return closed


def history_tables(vocab: Vocabulary, columns: Columns, train_idx: np.ndarray) -> Columns:
    """Per station + trip id, station + train number and station + train number + weekday
    (row 0: unknown), the recency-weighted count of each track: over every record (`name`)
    and per group of days (`name_folds`, day number modulo HISTORY_FOLDS), so that in
    training a record's own track never counts as evidence for itself (TrackHistory)."""
    labels = vocab.tracks
    tracks = label_indices(columns["track_number"][train_idx], labels)
    stations = columns["station_id"][train_idx]
    trips = columns["trip_id"][train_idx]
    ts = columns["scheduled_timestamp"][train_idx]
    weights = recency_weights(ts, vocab.recency_half_life).astype(np.float32)
    weights *= regime_weights(columns, train_idx, labels, vocab.change_threshold)
    days = boston_days(ts)
    fold = days % utils.HISTORY_FOLDS
    known = tracks >= 0

    def rows_of(name: str, keys: np.ndarray) -> np.ndarray:
        row = {key: i for i, key in enumerate(vocab[f"{name}s"], start=1)}
        return np.array([row.get(f"{s}:{k}", 0) for s, k in zip(stations, keys, strict=True)])

    train_rows = rows_of("station_train", ev.train_numbers(trips))
    # row = the station + train row * 7 + Boston weekday (rows 0-6: an unknown train)
    day_rows = train_rows * 7 + ev.boston_weekdays(days)
    keyed = {
        "station_trip": (rows_of("station_trip", trips), len(vocab.station_trips) + 1),
        "station_train": (train_rows, len(vocab.station_trains) + 1),
        "station_train_day": (day_rows, 7 * (len(vocab.station_trains) + 1)),
    }

    tables = {}
    for name, (rows, n_rows) in keyed.items():
        folds = np.zeros((n_rows, utils.HISTORY_FOLDS * len(labels)), dtype=np.float32)
        column = fold * len(labels) + tracks
        np.add.at(folds, (rows[known], column[known]), weights[known])
        tables[name] = folds.reshape(len(folds), utils.HISTORY_FOLDS, len(labels)).sum(axis=1)
        tables[f"{name}_folds"] = folds
    return tables


def regime_weights(columns: Columns, idx: np.ndarray, labels: list[str],
                   threshold: float) -> np.ndarray:  # fmt: skip
    """0 for each record of `idx` older than its station + train number's newest regime (the
    train moved home, its platform closed or reopened), else 1: in the history tables such
    records describe a train that is no longer there (see docs/model.md)."""
    keys = np.array([f"{s}:{n}" for s, n in zip(columns["station_id"][idx],
                     ev.train_numbers(columns["trip_id"][idx]), strict=True)])  # fmt: skip
    tracks = label_indices(columns["track_number"][idx], labels)
    times = columns["scheduled_timestamp"][idx]
    return ev.regime_weights(keys, times, tracks, len(labels), threshold)


# -- Datasets: raw-value features, track indices as labels --------------------


def model_features(columns: Columns, idx: np.ndarray | None = None) -> Columns:
    """The model's raw inputs for the selected records (all without `idx`)."""
    feats = {}
    for name, dtype in MODEL_INPUTS.items():
        values = columns[name] if idx is None else columns[name][idx]
        feats[name] = values.astype(object if dtype == "string" else dtype)
    return feats


#: Share of training records whose train is hidden in each batch (for the unknown buckets).
HIDE_TRAIN_SHARE = 0.03
#: Below this many training records the batches hide trains (above: a tie, see the ablation).
AUGMENT_BELOW = 10_000


def hide_identities(features: dict[str, Any], labels: Any, *weights: Any, key: Any = 0) -> tuple:
    """Training augmentation: a share of records lose their trip id (and so their train
    number), to learn what to answer for a train never seen; `key` seeds the draw."""
    batch = tf.shape(labels)[0]
    draw = tf.random.stateless_uniform([batch], seed=tf.stack([tf.cast(key, tf.int64), 0]))
    out = dict(features)
    out["trip_id"] = tf.where(draw < HIDE_TRAIN_SHARE, tf.fill([batch], ""), features["trip_id"])
    return (out, labels, *weights)


def with_hidden_identities(batches: Any, seed: int) -> Any:
    """`hide_identities` on every batch, keyed by a seeded stream drawn anew every epoch."""
    keys = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
    return tf.data.Dataset.zip((batches, keys)).map(
        lambda batch, key: hide_identities(*batch, key=key), num_parallel_calls=tf.data.AUTOTUNE
    )


def make_dataset(
    features: Columns,
    labels: np.ndarray,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 42,
    augment: bool = False,
    sample_weights: np.ndarray | None = None,
) -> Any:
    """An in-memory tf.data pipeline of (raw feature dict, class index[, weight]) batches."""
    tensors = {name: tf.constant(values) for name, values in features.items()}
    parts: tuple = (tensors, tf.constant(labels))
    if sample_weights is not None:
        parts += (tf.constant(sample_weights, dtype=tf.float32),)
    # Shuffle and batch record indices, then gather each batch's columns at once (fast).
    ds = tf.data.Dataset.range(len(labels))
    if shuffle:
        ds = ds.shuffle(len(labels), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size).map(
        lambda idx: tf.nest.map_structure(lambda t: tf.gather(t, idx), parts),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True,
    )  # fmt: skip
    if augment:
        ds = with_hidden_identities(ds, seed)
    return ds.prefetch(tf.data.AUTOTUNE)


@dataclass(frozen=True)
class PreparedData:
    """Everything a training mode needs about one export (built by `prepare_split`)."""

    export_dir: Path
    metadata: dict[str, Any]
    columns: Columns
    train_idx: np.ndarray
    val_idx: np.ndarray
    split_info: dict[str, Any]
    vocab_info: Vocabulary
    train_labels: np.ndarray
    val_labels: np.ndarray  # -1 where the track never occurred in training
    augmented: bool
    batch_size: int
    train_ds: Any
    val_ds: Any  # None when no validation record has a track the model knows
    #: The newest records, held out of every choice made in training (headline figures).
    test_idx: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @property
    def val_known(self) -> np.ndarray:
        """Validation positions whose track the model can name."""
        return np.flatnonzero(self.val_labels >= 0)


class Export(NamedTuple):
    """One export, read: its directory, its metadata and its records as columns."""

    export_dir: Path
    metadata: dict[str, Any]
    columns: Columns


def load_export(data_dir: Path | str) -> Export:
    """(export directory, its metadata, its records as columns), checked for use."""
    export_dir = find_export_dir(data_dir)
    if Path(data_dir).resolve() != export_dir.resolve():
        log(f"Using the newest export: {export_dir}")
    metadata = json.loads((export_dir / METADATA_FILE).read_text())
    columns = read_export_columns(export_dir)
    n = len(columns["track_number"])
    if n < 10:
        raise UserError(f"the export {export_dir} holds only {n} records: too few to train on")
    return Export(export_dir, metadata, columns)


def prepare_split(
    export_dir: Path,
    metadata: dict[str, Any],
    columns: Columns,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    split_info: dict[str, Any],
    batch_size: int = 256,
    seed: int = 42,
    augment: bool | None = None,
    test_idx: np.ndarray | None = None,
    recency_half_life: float = ev.RECENCY_HALF_LIFE_DAYS,
    change_threshold: float = ev.CHANGE_THRESHOLD_NATS,
) -> PreparedData:
    """Vocabularies and history tables from `train_idx`, and the two datasets."""
    labels = track_labels(columns, train_idx)
    train_labels = label_indices(columns["track_number"][train_idx], labels)
    keep = train_labels >= 0  # the exporter only writes numeric tracks; belt and braces
    train_idx, train_labels = train_idx[keep], train_labels[keep]
    val_labels = label_indices(columns["track_number"][val_idx], labels)
    augmented = len(train_idx) < AUGMENT_BELOW if augment is None else augment
    test_idx = np.zeros(0, dtype=np.int64) if test_idx is None else test_idx
    counts = {
        "total": int(len(columns["track_number"])),
        "train": int(len(train_idx)),
        "validation": int(len(val_idx)),
        "validation_unknown_track": int((val_labels < 0).sum()),
        "test": int(len(test_idx)),
    }
    known = np.flatnonzero(val_labels >= 0)  # none when refitting on every record
    vocab = build_vocabulary(
        columns, train_idx, labels, counts, split_info, recency_half_life, change_threshold
    )
    return PreparedData(
        export_dir=export_dir, metadata=metadata, columns=columns,
        train_idx=train_idx, val_idx=val_idx, test_idx=test_idx, split_info=split_info,
        vocab_info=vocab, train_labels=train_labels, val_labels=val_labels,
        augmented=augmented, batch_size=batch_size,
        train_ds=make_dataset(model_features(columns, train_idx), train_labels, batch_size,
                              shuffle=True, seed=seed, augment=augmented),
        val_ds=make_dataset(model_features(columns, val_idx[known]), val_labels[known], batch_size)
        if len(known) else None,
    )  # fmt: skip


def prepare_data(
    data_dir: Path | str,
    batch_size: int = 256,
    split: str = "time",
    seed: int = 42,
    validation_split: float = VALIDATION_FRACTION,
    augment: bool | None = None,
    test_days: float = 0,
) -> PreparedData:
    """Read an export, hold out the newest `test_days`, split the rest and prepare it."""
    export = load_export(data_dir)
    ts = export.columns["scheduled_timestamp"]
    train, val, test, info = split_records(ts, split, seed, validation_split, test_days)
    return prepare_split(*export, train, val, info, batch_size, seed, augment, test)


def load_tfrecord_dataset(
    data_dir: Path | str,
    batch_size: int = 256,
    split: str = "time",
    validation_split: float = VALIDATION_FRACTION,
    seed: int = 42,
    test_days: float = 7,
) -> tuple[Any, Any, Vocabulary]:
    """(train_ds, val_ds, vocab_info) for an export directory or root: batches of (raw
    feature dict, track index), the newest `test_days` held out of both, split by time
    unless `split="random"`; val_ds leaves out tracks never seen in training."""
    data = prepare_data(data_dir, batch_size, split, seed, validation_split, test_days=test_days)
    return data.train_ds, data.val_ds, data.vocab_info


# -- Model layers: preprocessing lives in the model, so a saved model takes raw values --
# (custom layers register under "imt_ml" once Keras is imported; see __init__.py).


@dataclass
class ModelConfig:
    """Architecture and regularisation of one model."""

    hidden_units: tuple[int, ...] = (256, 128)  # widths of the dense layers
    dropout: float = 0.3  # after each dense layer
    l1: float = 1e-6  # penalty on dense kernels
    l2: float = 1e-4  # penalty on dense kernels
    batch_norm: bool = True  # after each dense layer
    station_embedding: int = 4
    route_embedding: int = 6
    headsign_embedding: int = 6
    train_embedding: int = 16
    hide_trip: float = 0.15  # share of training records that read their trip as new (NewTrips)
    #: In training, a new trip's train keeps its whole counts (NewTrips; see bench-drift).
    new_trip_whole_train: bool = True
    weekday_history: bool = True  # read the station + train number + weekday table too
    trip_history: bool = True  # read the station + trip id table (features and evidence)
    train_history: bool = True  # the station + train number table (and its weekday one)
    evidence: bool = True  # add the tables' log-shares to the logits (EvidenceLogits)
    other_days: bool = True  # in training, read the tables without the own group of days
    closed_tracks: bool = True  # give a platform the records say is closed no probability
    seed: int = 42


def build_raw_inputs() -> dict[str, Any]:
    return {
        name: keras.Input(shape=(), dtype=dtype, name=name) for name, dtype in MODEL_INPUTS.items()
    }


def _fixed_table(index: Any, table: np.ndarray, name: str, fixed: dict[Any, np.ndarray]) -> Any:
    """Rows of a constant table by index (a frozen embedding; `fixed` collects layer -> table)."""
    layer = keras.layers.Embedding(*table.shape, trainable=False, name=name)
    fixed[layer] = table
    return layer(index)


def _lookup(values: Any, vocabulary: list[str], name: str) -> Any:
    """Index of each value in the vocabulary, 0 for an unknown one."""
    return keras.layers.StringLookup(vocabulary=vocabulary, name=f"{name}_lookup")(values)


def _embed(index: Any, vocabulary: list[str], dim: int, name: str) -> Any:
    """An embedding of `dim` per value (None for 0: the model does without it)."""
    if dim == 0:
        return None
    return keras.layers.Embedding(len(vocabulary) + 1, dim, name=f"{name}_embedding")(index)


def identity_features(
    inputs: dict[str, Any], vocab_info: Vocabulary, cfg: ModelConfig, fixed: dict, clock: Any
) -> tuple[list[Any], list[Any]]:
    """(features, the history features the model reads, the trip table's) of the train:
    its number's embedding and what the lookup tables know of it."""
    if not vocab_info.history:
        raise ValueError("the vocabulary has no history tables: build it from the records "
                         "(prepare_split or load_tfrecord_dataset)")  # fmt: skip
    number = track_layers.TrainNumber(name="train_number")(inputs["trip_id"])
    keys = {
        "station_train": track_layers.JoinStrings(name="station_train")([inputs["station_id"], number]),
        "station_trip": track_layers.JoinStrings(name="station_trip")([inputs["station_id"], inputs["trip_id"]]),
    }  # fmt: skip
    train = _embed(_lookup(number, vocab_info.train_numbers, "train"),
                   vocab_info.train_numbers, cfg.train_embedding, "train")  # fmt: skip
    weekday = ["station_train_day"] if cfg.weekday_history else []
    names = ["station_trip", "station_train", *weekday]
    rows = {name: _lookup(keys[name], vocab_info[f"{name}s"], name) for name in keys}
    if "station_train_day" in names:  # the train's row and the Boston weekday
        rows["station_train_day"] = track_layers.DayRow(name="station_train_day_row")(
            [rows["station_train"], clock]
        )
    readable = []
    for name in names:
        index = rows[name]
        counts = [_fixed_table(index, vocab_info.history[name + suffix], f"{name}_counts{suffix}", fixed)
                  for suffix in ("", "_folds")]  # fmt: skip
        readable.append(track_layers.OtherDays(name=f"{name}_other_days")([*counts, clock])
                        if cfg.other_days else counts[0])  # fmt: skip
    readable = track_layers.NewTrips(
        cfg.hide_trip, seed=cfg.seed, name="new_trips", whole_train=cfg.new_trip_whole_train
    )(readable)
    histories = [track_layers.TrackHistory(name=f"{name}_history")(counts)
                 for name, counts in zip(names, readable, strict=True)]  # fmt: skip
    read = [h for name, h in zip(names, histories, strict=True)
            if (cfg.trip_history if name == "station_trip" else cfg.train_history)]  # fmt: skip
    return [train, *read], read, histories[0]


def time_features(inputs: dict[str, Any], vocab_info: Vocabulary, clock: Any) -> list[Any]:
    """Boston hour, minute and day of week as sin/cos pairs; the scheduled time standardised."""
    timestamp = keras.layers.Normalization(
        mean=vocab_info.timestamp_mean, variance=vocab_info.timestamp_std**2, name="timestamp_norm"
    )(keras.layers.Reshape((1,), name="timestamp_column")(inputs["scheduled_timestamp"]))
    return [
        track_layers.CyclicalEncoding(24, column=0, name="hour_cyclical")(clock),
        track_layers.CyclicalEncoding(60, column=1, name="minute_cyclical")(clock),
        track_layers.CyclicalEncoding(7, column=2, name="day_cyclical")(clock),
        timestamp,
    ]


def dense_logits(x: Any, num_classes: int, cfg: ModelConfig) -> Any:
    """Dense layers with L1/L2, batch normalisation and dropout, then one logit per track."""
    layers = keras.layers
    regularizer = keras.regularizers.L1L2(l1=cfg.l1, l2=cfg.l2)
    for i, units in enumerate(cfg.hidden_units):
        x = layers.Dense(units, kernel_regularizer=regularizer, name=f"dense_{i}")(x)
        if cfg.batch_norm:
            x = layers.BatchNormalization(name=f"batch_norm_{i}")(x)
        x = layers.Activation("relu", name=f"relu_{i}")(x)
        if cfg.dropout:
            x = layers.Dropout(cfg.dropout, seed=cfg.seed + i, name=f"dropout_{i}")(x)
    return layers.Dense(num_classes, name="logits")(x)


def track_outputs(logits: Any, station_index: Any, clock: Any, trip_history: Any,
                  vocab_info: Vocabulary, cfg: ModelConfig, fixed: dict) -> Any:  # fmt: skip
    """Logits -> labelled, calibrated probabilities over the tracks open at the station."""
    layers = keras.layers
    # Tracks never seen at a station get a -1e4 logit there (row 0: unknown, all allowed).
    allowed = _fixed_table(station_index, station_track_mask(vocab_info),
                           "station_track_mask", fixed)  # fmt: skip
    penalty = layers.Rescaling(scale=1e4, offset=-1e4, name="mask_penalty")(allowed)
    # And from its closing day on, a platform the records say is closed (closed_tracks).
    closing = station_table(vocab_info, OPEN_TRACK_DAY, vocab_info.closed_tracks)
    since = _fixed_table(station_index, closing, "closing_days", fixed)
    masked = [logits, penalty]
    if cfg.closed_tracks:
        masked.append(track_layers.ClosedTracks(name="closed_tracks")([since, clock]))

    probabilities = layers.Activation("softmax", name="softmax")(
        layers.Add(name="masked_logits")(masked)
    )

    known_trip = track_layers.KnownKey(name="known_trip")(trip_history)
    return track_layers.TrackProbabilities(
        vocab_info.tracks, vocab_info.station_tracks, name="track_probabilities"
    )([probabilities, known_trip])


def create_simple_model(
    vocab_info: Vocabulary, config: ModelConfig | None = None, name: str = "track_predictor"
) -> Any:
    """A Keras model: raw values in (see MODEL_INPUTS), track probabilities out; its layers
    are described in docs/model.md."""
    cfg = config or ModelConfig()
    layers = keras.layers
    inputs = build_raw_inputs()
    fixed: dict[Any, np.ndarray] = {}
    station_index = _lookup(inputs["station_id"], vocab_info.stations, "station")
    clock = track_layers.BostonClock(name="boston_clock")(inputs["scheduled_timestamp"])
    identity, histories, trip_history = identity_features(inputs, vocab_info, cfg, fixed, clock)
    direction_index = layers.IntegerLookup(vocabulary=[0, 1], name="direction_lookup")(
        inputs["direction_id"]
    )
    embedded = [
        _embed(station_index, vocab_info.stations, cfg.station_embedding, "station"),
        _embed(_lookup(inputs["route_id"], vocab_info.routes, "route"),
               vocab_info.routes, cfg.route_embedding, "route"),
        _embed(_lookup(inputs["headsign"], vocab_info.headsigns, "headsign"),
               vocab_info.headsigns, cfg.headsign_embedding, "headsign"),
        *identity,
        layers.Embedding(3, 2, name="direction_embedding")(direction_index),
    ]  # fmt: skip
    x = layers.Concatenate(name="features")(
        [e for e in embedded if e is not None] + time_features(inputs, vocab_info, clock)
    )
    logits = dense_logits(x, vocab_info.num_classes, cfg)
    if histories and cfg.evidence:
        # the weekday table refines the train-number one
        finer = int(len(histories) > 1 and cfg.weekday_history and cfg.train_history)
        evidence = track_layers.EvidenceLogits(finer=finer, name="evidence_logits")(histories)
        logits = layers.Add(name="logits_with_evidence")([logits, evidence])
    outputs = track_outputs(logits, station_index, clock, trip_history, vocab_info, cfg, fixed)
    model = keras.Model(inputs=inputs, outputs=outputs, name=name)
    for layer, table in fixed.items():
        layer.set_weights([table])
    return model


def station_table(vocab: Vocabulary, fill: float, cells: dict[str, dict[str, Any]]) -> np.ndarray:
    """(stations + 1) x tracks of `fill` but for the station -> track -> value `cells`."""
    table = np.full((len(vocab.stations) + 1, vocab.num_classes), fill, dtype=np.float32)
    row = {s: i for i, s in enumerate(vocab.stations, start=1)}
    column = {t: j for j, t in enumerate(vocab.tracks)}
    for station, tracks in cells.items():
        for track, value in tracks.items():
            if station in row and track in column:
                table[row[station], column[track]] = value
    return table


def station_track_mask(vocab_info: Vocabulary) -> np.ndarray:
    """(stations + 1) x tracks of 0/1: which tracks each station used in training."""
    tracks = vocab_info.station_tracks
    used = {s: dict.fromkeys(tracks.get(s, vocab_info.tracks), 1.0) for s in vocab_info.stations}
    mask = station_table(vocab_info, 0.0, used)
    mask[0] = 1.0
    return mask


def model_labels(model: Any) -> list[str]:
    """The track label of each output class of a model built here."""
    return list(model.get_layer("track_probabilities").labels)


# -- Evaluation: the model against baselines, calibration and coverage --------


def predict_probabilities(model: Any, features: Columns, batch_size: int = 4096) -> np.ndarray:
    n = len(next(iter(features.values())))
    if n == 0:
        return np.zeros((0, len(model_labels(model))), dtype=np.float32)
    ds = tf.data.Dataset.from_tensor_slices({k: tf.constant(v) for k, v in features.items()})
    return np.asarray(model.predict(ds.batch(batch_size), verbose=0))


def with_calibration(model: Any, confidence_map: ev.ConfidenceMap | None,
                     new_trip_map: ev.ConfidenceMap | None = None) -> Any:  # fmt: skip
    """The same model with its output layer's confidence maps replaced by these."""
    output = model.get_layer("track_probabilities")
    layer = track_layers.TrackProbabilities(
        output.labels, output.station_tracks, name="track_probabilities",
        confidence_map=confidence_map._asdict() if confidence_map else None,
        new_trip_map=new_trip_map._asdict() if new_trip_map else None,
    )  # fmt: skip
    return keras.Model(inputs=model.inputs, outputs=layer(output.input), name=model.name)


def as_new_trips(model: Any) -> Any | None:
    """The model (same weights) reading every trip as new; None without a NewTrips layer."""
    names = {layer.name for layer in model.layers if isinstance(layer, track_layers.NewTrips)}
    if not names:
        return None
    config = model.get_config()
    for layer in config["layers"]:
        if layer["config"].get("name") in names:
            layer["config"]["always"] = True
    copy = keras.Model.from_config(config)
    copy.set_weights(model.get_weights())
    return copy


def raw_probabilities(output_layer: Any) -> Any:
    """The tensor of the model's own probabilities that its output layer maps."""
    inputs = output_layer.input
    return inputs[0] if isinstance(inputs, list | tuple) else inputs


def known_trips(model: Any, columns: Columns, idx: np.ndarray) -> np.ndarray:
    """Which records' station + trip id the model knows (all, for a model without that lookup)."""
    try:
        vocabulary = set(model.get_layer("station_trip_lookup").get_vocabulary())
    except ValueError:
        return np.ones(len(idx), dtype=bool)
    keys = (
        f"{s}:{t}" for s, t in zip(columns["station_id"][idx], columns["trip_id"][idx], strict=True)
    )
    return np.array([k in vocabulary for k in keys], dtype=bool)


def uncalibrated(model: Any) -> Any:
    """The model's own probabilities, before its output layer's confidence map."""
    return keras.Model(model.inputs, raw_probabilities(model.get_layer("track_probabilities")))


def fit_new_trip_map(
    model: Any, columns: Columns, labels: list[str],
    sources: list[tuple[Any, np.ndarray]], past_changes: bool,
) -> tuple[ev.ConfidenceMap | None, tuple[float, float] | None, str]:  # fmt: skip
    """(the map for unknown trips, its ECE before and after, what it was fitted on): per
    source, (a past change's proxy or None for the model reading them as new, records)."""
    new_conf, new_correct, starts = [], [], []
    for proxy, new_idx in sources:
        if len(new_idx) == 0:
            continue
        # A proxy reads its change's new trips as new by itself (its vocabulary predates them).
        as_new = uncalibrated(proxy) if proxy is not None else as_new_trips(uncalibrated(model))
        if as_new is None:  # a model with no way to read its records as new (an ensemble)
            continue
        new_y = label_indices(columns["track_number"][new_idx], labels)
        fit_new = (new_y >= 0) & (~known_trips(proxy, columns, new_idx) if proxy is not None
                                  else True)  # fmt: skip
        new_probs = predict_probabilities(as_new, model_features(columns, new_idx))
        new_conf.append(new_probs.max(axis=1)[fit_new])
        new_correct.append((new_probs.argmax(axis=1) == new_y)[fit_new])
        starts.append(ev.iso_utc(columns["scheduled_timestamp"][new_idx].min())[:10])
    new_map, new_ece, source = None, None, ""
    fitted = sum(len(c) for c in new_conf)
    if fitted >= 50:
        conf, hit = np.concatenate(new_conf), np.concatenate(new_correct)
        new_map = ev.fit_confidence_map(conf, hit)
        new_ece = (expected_calibration_error(conf, hit),
                   expected_calibration_error(new_map.at(conf), hit))  # fmt: skip
        source = (
            f"the {fitted:,} records of the first {VALIDATION_DAYS} days of "
            + ("the last change" if len(starts) == 1 else f"each of the last {len(starts)} changes")
            + f" of schedule in the records ({', '.join(starts)}) "
            "whose trip was new then, each read with the history of the records before it only "
            "(what the model would have known the day before: the train numbers' evidence as "
            "stale as on the first day of the next schedule)"
            if past_changes
            else "the same validation records read as new trips (no evidence of the trip; of "
            "the train, only its other trips): no change of schedule in the records to learn from"
        )  # fmt: skip
    return new_map, new_ece, source


def calibrate_model(
    model: Any, columns: Columns, idx: np.ndarray, labels: list[str],
    new_schedule: Sequence[tuple[Any, np.ndarray]] = (),
) -> tuple[Any, ev.Calibration]:  # fmt: skip
    """Fit a confidence map on the records `idx` and return the model with it applied. The
    map for unknown trips is fitted on `new_schedule` where given (per past change of
    schedule, see `save_calibrated`), else on the records `idx` read as new trips."""
    probs = predict_probabilities(uncalibrated(model), model_features(columns, idx))
    y = label_indices(columns["track_number"][idx], labels)
    # Fit on the trips the model knows (what the weeks after a cut-off ask about).
    flags = known_trips(model, columns, idx)
    known = flags if flags.sum() >= 100 else np.ones_like(flags)
    # The map never changes the answer: the top class's probability is its confidence.
    confidence, correct = probs.max(axis=1), probs.argmax(axis=1) == y
    fit = known & (y >= 0)
    cmap = ev.fit_confidence_map(confidence[fit], correct[fit]) if fit.sum() >= 50 else None
    # New trips get their own map: per (a past change's proxy or None, its records).
    sources: list[tuple[Any, np.ndarray]] = list(new_schedule)
    if not sources and (y >= 0).sum() >= 50:
        sources = [(None, idx)]
    new_map, new_ece, source = fit_new_trip_map(model, columns, labels, sources, bool(new_schedule))
    calibrated = with_calibration(model, cmap, new_map)
    output = calibrated.get_layer("track_probabilities")
    gated = isinstance(output.input, list | tuple)  # the map applies to known trips only
    flags = flags[:, None].astype(np.float32)
    after = np.asarray(output([probs, flags] if gated else probs)).max(axis=1)
    info = ev.Calibration(
        cmap, expected_calibration_error(confidence, correct),
        expected_calibration_error(after, correct), int(len(idx)),
        ev.reliability_bins(confidence, correct), ev.reliability_bins(after, correct),
        new_map if gated else None, new_ece if gated else None,
        source if gated else "",
    )  # fmt: skip
    return calibrated, info


def evaluate_model(
    model: Any,
    columns: Columns,
    idx: np.ndarray,
    tables: dict[str, Any] | None,
    truth: dict | None,
    calibration: ev.Calibration | None = None,
) -> Evaluation:
    labels = model_labels(model)
    probs = predict_probabilities(model, model_features(columns, idx))
    true_tracks = columns["track_number"][idx]
    metrics = ev.evaluate_predictions(probs, true_tracks, labels, columns["station_id"][idx])
    correct = metrics["predicted_tracks"] == true_tracks
    confidence = probs.max(axis=1) if len(probs) else np.zeros(0)

    def coverage(conf: np.ndarray, hits: np.ndarray) -> dict[float, float]:
        return {p: coverage_at_precision(conf, hits, p) for p in ev.PRECISION_TARGETS}

    answerable, baselines = {"model": coverage(confidence, correct)}, {}
    answers = baseline_answers(tables, columns, idx) if tables else {}
    for name, (predicted, share) in answers.items():
        hits = predicted == true_tracks
        baselines[name] = float(hits.mean())
        if not np.isnan(share).any():
            answerable[name] = coverage(share, hits)
    best = best_possible_accuracy(truth, columns, idx)
    return Evaluation(metrics, baselines, best, labels, probs, answerable, calibration)


def dataset_section(data: PreparedData) -> list[str]:
    counts, split, vocab = data.vocab_info.record_counts, data.split_info, data.vocab_info
    lines = [
        f"- Export: `{data.export_dir}`",
        f"- Records: {counts['total']:,} (training {counts['train']:,}, "
        f"validation {counts['validation']:,})",
    ]
    if split["method"] == "time":
        train, val = split["train_period"], split["validation_period"]
        lines += [
            f"- Split: by time, the latest {100 * VALIDATION_FRACTION:.0f}% of the records but at "
            f"most the last {VALIDATION_DAYS} days validate (the horizon a refit model is used "
            "for); every validation record is later than every training record",
            f"- Training period: {train[0]} to {train[1]}",
            f"- Validation period: {val[0]} to {val[1]}",
        ]
    else:
        lines.append(
            f"- Split: random (seed {split['seed']}); the same train appears on both sides"
        )
    if unknown := counts["validation_unknown_track"]:
        lines.append(f"- Validation records with a track unseen in training: {unknown:,}")
    if (skipped := data.metadata.get("skipped_total")) is not None:
        lines.append(f"- Records the exporter skipped: {skipped:,}")
    return section(
        "Dataset Information",
        *lines,
        *ev.closed_track_lines(vocab),
        "",
        "Vocabulary sizes (from the training records; one more index for unknown values):",
        "",
        utils.markdown_table(["Vocabulary", "Size"], [[k, v] for k, v in vocab.sizes().items()]),
        "",
        f"Tracks (class order): {', '.join(vocab.tracks)}",
    )


def model_section(model: Any, cfg: ModelConfig, class_weight: str, augmented: bool) -> list[str]:
    trainable = int(sum(np.prod(w.shape) for w in model.trainable_weights))
    new_trip = ("no evidence of the trip, the train's kept whole" if cfg.new_trip_whole_train
                else "the train's other trips only")  # fmt: skip
    weekday = " and the station + train number + weekday" if cfg.weekday_history else ""
    units = " -> ".join(str(u) for u in cfg.hidden_units)
    return section(
        "Model Details",
        f"- Parameters: {int(model.count_params()):,} ({trainable:,} trainable)",
        f"- Dense layers: {units} -> {model.output.shape[-1]} (softmax)",
        f"- Embeddings: station {cfg.station_embedding}, route {cfg.route_embedding}, headsign "
        f"{cfg.headsign_embedding}, train number {cfg.train_embedding}, direction 2",
        "- Lookup-table evidence: each track's share and the record count for the station + "
        f"trip id, the station + train number{weekday}, with their log-shares added to the "
        "logits (a learned weight each)",
        "- Time features: Boston hour, minute and day of week of the scheduled instant as "
        "sin/cos pairs; scheduled timestamp standardised",
        f"- Regularisation: L1 {cfg.l1:g}, L2 {cfg.l2:g} on dense kernels; dropout "
        f"{cfg.dropout:g}; batch normalisation {'on' if cfg.batch_norm else 'off'}",
        "- Output restricted to the tracks each station used in training (all tracks for an "
        "unknown station)",
        f"- Class weights: {class_weight}",
        f"- Data augmentation: {'on' if augmented else 'off'} (per batch, {HIDE_TRAIN_SHARE:.0%} "
        f"of records hidden with their train number); in the model, {cfg.hide_trip:.0%} read "
        f"their trip as new ({new_trip})",
    )


# -- Training loop: options, callbacks, fit -----------------------------------


@dataclass
class TrainOptions:
    """Options shared by the training modes; every field is also a command-line option."""

    # fmt: off
    # Large batches cost about as much per step as small ones; 10 epochs reach the plateau.
    epochs: int = option_field(10, "Maximum epochs.", click.IntRange(min=1))
    batch_size: int = option_field(1024, None, click.IntRange(min=1))
    learning_rate: float = option_field(2e-3, None, click.FloatRange(min=0, min_open=True))
    model_path: str = option_field(DEFAULT_MODEL_PATH, "File name prefix of the saved files.")
    seed: int = option_field(42, "Random seed.")
    early_stop_patience: int = option_field(3, "Epochs without a better val_loss before stopping.",
                                            click.IntRange(min=1))
    early_stop_min_delta: float = option_field(1e-4, "Smallest val_loss change that counts as better.")
    reduce_lr_patience: int = option_field(2, "Epochs without a better val_loss before the rate is cut.",
                                           click.IntRange(min=1))
    reduce_lr_factor: float = option_field(0.5, "Factor applied to the rate on a plateau.",
                                           click.FloatRange(0, 1, min_open=True, max_open=True))
    scheduler_tmax: int = option_field(0, "Epochs of the cosine schedule (0: --epochs).",
                                       click.IntRange(min=0))
    no_early_stop: bool = option_field(False, "Train all --epochs.")
    no_scheduler: bool = option_field(False, "Keep the learning rate constant.")
    test_days: float = option_field(
        TEST_DAYS, "Hold out the newest DAYS from every choice made in training; the headline "
        "figures come from them (0: none, and the headline is a tuning figure).",
        click.FloatRange(min=0), metavar="DAYS")
    split: str = option_field("time", "Of the rest, time: the latest 20% (at most --validation-days) "
                              "validate; random: a seeded shuffle.", click.Choice(["time", "random"]))
    validation_days: float = option_field(
        VALIDATION_DAYS, "With --split time, validate on at most the newest DAYS before the test "
        "window (the horizon the model is used for; backtest uses its --horizon).",
        click.FloatRange(min=0, min_open=True), metavar="DAYS")
    # No class weights by default: they shift probabilities off the frequencies (calibration).
    class_weight: str = option_field("none", "Per-class loss weights.",
                                     click.Choice(["balanced", "sqrt", "none"]))
    recency_half_life: float = option_field(
        ev.RECENCY_HALF_LIFE_DAYS, "A record's weight halves with every DAYS of age before the newest "
        "(0: all equal).", click.FloatRange(min=0), metavar="DAYS")
    change_threshold: float = option_field(
        ev.CHANGE_THRESHOLD_NATS, "Leave a train's records out of the history tables once its "
        "newer ones differ from them by this many nats (it moved home, its platform closed or "
        "reopened; 0: never).",
        click.FloatRange(min=0), metavar="NATS")
    no_refit: bool = option_field(False, "Save the validated models instead of refitting them on "
                                  "every record.")
    refit_epochs: int = option_field(
        REFIT_EPOCHS, "Epochs of the refit on every record, continuing from the validated weights "
        "(0: keep those weights; only the vocabularies and history tables are rebuilt from every "
        "record, which takes seconds).", click.IntRange(min=0))
    refit_lr_factor: float = option_field(
        REFIT_LR_FACTOR, "The refit's starting learning rate as a share of --learning-rate (its "
        "optimizer starts afresh; the rate then decays over the refit's epochs).",
        click.FloatRange(min=0, min_open=True), metavar="SHARE")
    # fmt: on


def model_option(help: str = "A saved .keras model.") -> Callable[[Callable], Callable]:
    """--model, a saved model file (`evaluate`, `predict`, `serve`)."""
    return click.option("--model", "model_file", type=click.Path(path_type=Path), required=True,
                        help=help)  # fmt: skip


#: The options of `train`, `ensemble` and `cv`, from TrainOptions.
training_options = utils.dataclass_options(TrainOptions)


def class_weights(labels: np.ndarray, num_classes: int, mode: str) -> dict[int, float] | None:
    """'balanced': n / (k * count) for each class present; 'sqrt': its square root."""
    if mode == "none":
        return None
    counts = np.bincount(labels, minlength=num_classes)
    present = counts > 0
    weights = np.ones(num_classes)
    weights[present] = len(labels) / (present.sum() * counts[present])
    if mode == "sqrt":
        weights = np.sqrt(weights)
    return {i: float(w) for i, w in enumerate(weights)}


def compile_model(model: Any, learning_rate: float) -> None:
    top3 = keras.metrics.SparseTopKCategoricalAccuracy(k=3, name="top3_accuracy")
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy", top3],
    )


def training_callbacks(
    opts: TrainOptions, best_path: Path | None, log_dir: Path | None
) -> list[Any]:
    """Best checkpoint, early stopping, the learning-rate schedule and TensorBoard, as asked."""
    callbacks = []
    if best_path is not None:
        callbacks.append(keras.callbacks.ModelCheckpoint(
            str(best_path), monitor="val_accuracy", mode="max", save_best_only=True
        ))  # fmt: skip
    if not opts.no_early_stop:
        callbacks.append(keras.callbacks.EarlyStopping(
            monitor="val_loss", patience=opts.early_stop_patience,
            min_delta=opts.early_stop_min_delta, restore_best_weights=True,
        ))  # fmt: skip
    if not opts.no_scheduler:
        callbacks.append(track_layers.CosineWithPlateau(
            opts.learning_rate, opts.scheduler_tmax or opts.epochs,
            opts.reduce_lr_patience, opts.reduce_lr_factor,
        ))  # fmt: skip
    if log_dir is not None:
        callbacks.append(keras.callbacks.TensorBoard(log_dir=str(log_dir), write_graph=False))
    return callbacks


def weighted_training_data(data: PreparedData, opts: TrainOptions) -> tuple[Any, Any]:
    """(training dataset, Keras class weights); a recency half-life makes them sample weights."""
    labels = data.train_labels
    weights = class_weights(labels, data.vocab_info.num_classes, opts.class_weight)
    per_record = None
    if opts.recency_half_life > 0:
        ts = data.columns["scheduled_timestamp"][data.train_idx]
        per_class = np.array(list(weights.values()))[labels] if weights else 1.0
        per_record = per_class * recency_weights(ts, opts.recency_half_life)
        weights = None
    # Built here, after the recipe seeded every generator.
    features = model_features(data.columns, data.train_idx)
    ds = make_dataset(
        features, labels, opts.batch_size, True, opts.seed, data.augmented, per_record
    )
    return ds, weights


def fit_model(
    model: Any,
    data: PreparedData,
    opts: TrainOptions,
    best_path: Path | None,
    log_dir: Path | None,
    label: str = "",
    extra_callbacks: list[Any] | None = None,
    initial_epoch: int = 0,
) -> tuple[dict[str, list[float]], float]:
    """Compile and fit with the options' callbacks; returns (history, seconds). From an
    `initial_epoch` > 0 the model is a checkpoint that keeps its optimizer state."""
    # The options' callbacks first: the schedule logs the rate later callbacks read.
    callbacks = training_callbacks(opts, best_path, log_dir) + list(extra_callbacks or [])
    if initial_epoch == 0:
        compile_model(model, opts.learning_rate)
    quiet = bool(os.environ.get("IMT_ML_NO_PROGRESS")) or not sys.stderr.isatty()
    if label:
        log(label)
    train_ds, weights = weighted_training_data(data, opts)
    started = time.perf_counter()
    # Keras prints epoch lines on stdout; keep stdout for the paths the modes print.
    with contextlib.redirect_stdout(sys.stderr):
        history = model.fit(
            train_ds, validation_data=data.val_ds, epochs=opts.epochs, class_weight=weights,
            callbacks=callbacks, verbose=2 if quiet else 1, initial_epoch=initial_epoch,
            shuffle=False,  # train_ds already reshuffles every epoch
        )  # fmt: skip
    seconds = time.perf_counter() - started
    return {k: [float(v) for v in vals] for k, vals in history.history.items()}, seconds


def vocab_file_for(model_file: Path) -> Path:
    """`{model_path}_vocab.json` beside a `{model_path}_best.keras` / `_final.keras` file."""
    stem = model_file.name.removesuffix(".keras")
    stem = next((stem[: -len(s)] for s in ("_best", "_final") if stem.endswith(s)), stem)
    return model_file.with_name(f"{stem}_vocab.json")


def save_vocab(path: Path, data: PreparedData, recency_half_life: float) -> None:
    """The vocabularies as JSON (the history tables live in the model's weights), with the
    baselines' lookup tables of the same training records."""
    tables = baseline_tables(data.columns, data.train_idx, recency_half_life)
    utils.write_json(path, {**data.vocab_info.to_json(), "baselines": tables})


# -- Modes --------------------------------------------------------------------


def save_calibrated(
    model: Any, data: PreparedData, best_path: Path, final_path: Path, config: ModelConfig
) -> ev.Calibration:
    """After a validated fit: calibrate the best checkpoint (the final weights if no epoch
    beat the first) and the final weights on the validation records, and save both; the
    map for new trips is fitted on the last changes of schedule (`past_vocabularies`)."""
    if not best_path.exists():
        model.save(best_path)
    tracks = data.vocab_info.tracks
    pasts = past_vocabularies(data)
    best = keras.models.load_model(best_path, compile=False)
    # The best checkpoint is often the last epoch: the same weights, calibrated once.
    same = all(np.array_equal(a, b) for a, b in zip(best.get_weights(), model.get_weights(),
                                                    strict=True))  # fmt: skip
    targets = [(best, [best_path, final_path])] if same else [(best, [best_path]),
                                                              (model, [final_path])]  # fmt: skip
    calibrations = []
    for weights, paths in targets:
        # Per past change, a proxy: the weights reading the tables of the records before it
        # answer its new trips as the model will on the next change's first day.
        proxies = []
        for vocab, after in pasts:
            proxy = create_simple_model(vocab, config, name=weights.name)
            transfer_weights(proxy, weights, data.vocab_info, vocab)
            proxies.append((proxy, after))
        calibrated, info = calibrate_model(weights, data.columns, data.val_idx, tracks, proxies)
        for path in paths:
            calibrated.save(path)
        calibrations.append(info)
    return calibrations[0]  # the best checkpoint's


#: A day this share of whose station + trip ids are new starts a schedule (new ids each season).
NEW_SCHEDULE_SHARE = 0.5
#: Days of records a change of schedule needs before and after it to stand in for the next.
NEW_SCHEDULE_BEFORE_DAYS, NEW_SCHEDULE_AFTER_DAYS = 28, 7
#: How many past changes of schedule (the newest) the map for new trips is fitted on.
NEW_SCHEDULE_CHANGES = 3


def schedule_changes(columns: Columns, idx: np.ndarray, limit: int | None = None) -> list[float]:
    """The first scheduled time (unix s) of each new schedule among the records `idx`, oldest
    first (the newest `limit` only): the first of a run of days (gaps under a week) on each
    of which at least NEW_SCHEDULE_SHARE of the station + trip ids are new, with
    NEW_SCHEDULE_BEFORE_DAYS days of records before it and NEW_SCHEDULE_AFTER_DAYS after."""
    if len(idx) == 0:
        return []
    order = idx[np.argsort(columns["scheduled_timestamp"][idx], kind="stable")]
    ts = columns["scheduled_timestamp"][order]
    days = boston_days(ts)
    keys = np.array([f"{s}:{t}" for s, t in zip(columns["station_id"][order],
                                                 columns["trip_id"][order], strict=True)])  # fmt: skip
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    new = days[first][inverse] == days
    day_list, starts = np.unique(days, return_index=True)
    share = np.add.reduceat(new.astype(np.float64), starts) / np.diff(np.append(starts, len(days)))
    ok = ((share >= NEW_SCHEDULE_SHARE) & (day_list - days[0] >= NEW_SCHEDULE_BEFORE_DAYS)
          & (days[-1] - day_list >= NEW_SCHEDULE_AFTER_DAYS - 1))  # fmt: skip
    candidates = day_list[ok]
    runs = [day for i, day in enumerate(candidates) if i == 0 or day - candidates[i - 1] >= 7]
    found = [float(ts[np.searchsorted(days, day)]) for day in runs]
    return found[-limit:] if limit else found


def last_schedule_change(columns: Columns, idx: np.ndarray) -> float | None:
    """The first scheduled time of the newest new schedule in `idx` (or None)."""
    changes = schedule_changes(columns, idx, 1)
    return changes[-1] if changes else None


def past_vocabularies(data: PreparedData) -> list[tuple[Vocabulary, np.ndarray]]:
    """Per last NEW_SCHEDULE_CHANGES changes of schedule in the training and validation
    records: (the vocabulary of the records before it, the records of its first weeks)."""
    pool = np.concatenate([data.train_idx, data.val_idx])
    ts = data.columns["scheduled_timestamp"][pool]
    pasts = []
    for change in schedule_changes(data.columns, pool, NEW_SCHEDULE_CHANGES):
        before = pool[ts < change]
        after = pool[(ts >= change) & (ts < change + VALIDATION_DAYS * ev.SECONDS_PER_DAY)]
        vocab = build_vocabulary(data.columns, before, data.vocab_info.tracks, {}, {},
                                 data.vocab_info.recency_half_life,
                                 data.vocab_info.change_threshold)  # fmt: skip
        pasts.append((vocab, after))
    return pasts


def chosen_epochs(history: dict[str, list[float]], opts: TrainOptions) -> tuple[int, int]:
    """(epochs of the `_best` checkpoint: best val_accuracy, of the `_final` weights: the
    last epoch, or the best val_loss one when early stopping restored it)."""
    final = len(history["loss"])
    if "val_accuracy" not in history:  # no validation record had a known track
        return final, final
    best = int(np.argmax(history["val_accuracy"])) + 1
    if not opts.no_early_stop:
        final = int(np.argmin(history["val_loss"])) + 1
    return best, final


def every_record_data(source: Export | PreparedData, opts: TrainOptions) -> PreparedData:
    """Every record of `source`'s export as training data (and vocabularies), no validation."""
    everything = np.arange(len(source.columns["track_number"]))
    return prepare_split(source.export_dir, source.metadata, source.columns, everything,
                         everything[:0], {"method": "all records"}, opts.batch_size, opts.seed,
                         recency_half_life=opts.recency_half_life,
                         change_threshold=opts.change_threshold)  # fmt: skip


def fit_on_every_record(
    source: Export | PreparedData,
    opts: TrainOptions,
    config: ModelConfig,
    epochs: int,
    name: str = "track_predictor",
    warm: tuple[Any, Vocabulary] | None = None,
    data: PreparedData | None = None,
) -> tuple[Any, PreparedData, float]:
    """(model, its data, seconds): `epochs` of training on every record of `source`'s export."""
    data = data or every_record_data(source, opts)
    keras.utils.set_random_seed(config.seed)
    model = create_simple_model(data.vocab_info, config, name=name)
    if warm is not None:
        transfer_weights(model, *warm, data.vocab_info)
    if epochs == 0:  # the validated weights, reading tables of every record
        log(f"Refit on all {len(data.train_idx):,} records: vocabularies and history tables only "
            "(--refit-epochs 0)")  # fmt: skip
        return model, data, 0.0
    fixed = dataclasses.replace(opts, learning_rate=opts.learning_rate * opts.refit_lr_factor,
                                epochs=epochs, no_early_stop=True, scheduler_tmax=0)  # fmt: skip
    label = f"Refit on all {len(data.train_idx):,} records for {epochs} epochs"
    _, seconds = fit_model(model, data, fixed, None, None, label)
    return model, data, seconds


def refit_on_every_record(
    data: PreparedData,
    opts: TrainOptions,
    config: ModelConfig,
    history: dict[str, list[float]],
    calibration: ev.Calibration,
    files: ModelFiles,
    name: str = "track_predictor",
) -> dict[str, Any]:
    """The validated `files.best` and `files.final` each continue for --refit-epochs on every
    record (and its vocabularies), keep their confidence maps and are saved over themselves,
    the vocabularies over `files.vocab`. One refit serves both if they chose the same epoch."""
    best_epochs, final_epochs = chosen_epochs(history, opts)
    # validated weights -> where their refit is saved
    targets = ({files.best: [files.best, files.final]} if best_epochs == final_epochs
               else {files.best: [files.best], files.final: [files.final]})  # fmt: skip
    all_data = every_record_data(data, opts)
    epochs = opts.refit_epochs
    seconds = 0.0
    for source, paths in targets.items():
        warm = (load_saved_model(source), data.vocab_info)
        model, _, took = fit_on_every_record(data, opts, config, epochs, name, warm, all_data)
        seconds += took
        refit = with_calibration(model, calibration.confidence_map, calibration.new_trip_map)
        for path in paths:
            refit.save(path)
    save_vocab(files.vocab, all_data, opts.recency_half_life)
    return {"records": int(len(all_data.train_idx)), "best_epochs": best_epochs,
            "final_epochs": final_epochs, "epochs": epochs, "seconds": seconds,
            "learning_rate": opts.learning_rate * opts.refit_lr_factor,
            "calibration": calibration.describe(), "vocab_info": all_data.vocab_info}  # fmt: skip


#: Embedding layer -> the vocabulary its rows follow (row 0 is "unknown").
EMBEDDING_VOCABULARIES = {"station_embedding": "stations", "route_embedding": "routes",
                          "headsign_embedding": "headsigns", "train_embedding": "train_numbers"}  # fmt: skip
#: Epochs of a warm-started fit: it starts near its optimum.
WARM_EPOCHS = 3


def transfer_weights(model: Any, source: Any, source_vocab: Vocabulary, vocab: Vocabulary) -> None:
    """Start `model` (built for `vocab`) from `source`'s learnt weights (for `source_vocab`):
    same-shaped weights are copied, embedding rows and logit columns follow their token or
    track (new tokens start from the unknown row); fixed tables are left alone."""
    source_layers = {layer.name: layer for layer in source.layers}
    for layer in model.layers:
        old = source_layers.get(layer.name)
        if old is None or not layer.weights or not any(w.trainable for w in layer.weights):
            continue  # new, weightless, or a fixed table built from the new records
        new_values = [np.array(w) for w in layer.get_weights()]
        old_values = old.get_weights()
        if len(new_values) != len(old_values):
            continue
        for i, (new, previous) in enumerate(zip(new_values, old_values, strict=True)):
            if layer.name in EMBEDDING_VOCABULARIES and new.shape[1:] == previous.shape[1:]:
                field_name = EMBEDDING_VOCABULARIES[layer.name]
                rows = {token: r for r, token in enumerate(source_vocab[field_name], start=1)}
                # A new token starts from the unknown row: what the model answered for it
                # before (for train numbers a trained row, see hide_identities).
                for r, token in enumerate(["", *vocab[field_name]]):
                    new[r] = previous[rows.get(token, 0)]
            elif layer.name == "logits" and new.shape[:-1] == previous.shape[:-1]:
                columns = {label: c for c, label in enumerate(source_vocab.tracks)}
                for c, label in enumerate(vocab.tracks):
                    if label in columns:
                        new[..., c] = previous[..., columns[label]]
            elif new.shape == previous.shape:
                new = previous
            else:
                continue
            new_values[i] = new
        layer.set_weights(new_values)


def take_records(columns: Columns, idx: np.ndarray) -> Columns:
    """The columns of the records `idx` only (in that order)."""
    return {name: values[idx] for name, values in columns.items()}


def prepare_training_data(
    source: Path | str | Export, opts: TrainOptions, test_days: float | None = None
) -> PreparedData:
    """An export (a directory, or one already read) split as the recipe splits it: the
    newest `test_days` (default --test-days) held out, then by --split, --validation-days."""
    export = source if isinstance(source, Export) else load_export(source)
    train, val, test, info = split_records(
        export.columns["scheduled_timestamp"], opts.split, opts.seed, VALIDATION_FRACTION,
        opts.test_days if test_days is None else test_days, opts.validation_days,
    )  # fmt: skip
    return prepare_split(*export, train, val, info, opts.batch_size, opts.seed, test_idx=test,
                         recency_half_life=opts.recency_half_life,
                         change_threshold=opts.change_threshold)  # fmt: skip


@dataclass
class FittedModel:
    """What the recipe made: the saved files, the validated model and how it was chosen."""

    files: ModelFiles
    config: ModelConfig
    #: The calibrated best checkpoint of the validated fit (before any refit), as loaded.
    validated: Any
    #: The vocabulary the saved models read: every record's after a refit.
    vocab: Vocabulary
    calibration: ev.Calibration
    history: dict[str, list[float]]
    fit_seconds: float
    seconds: float
    #: The refit's figures (`refit_on_every_record`); None without one.
    refit: dict[str, Any] | None = None

    @property
    def epochs(self) -> int:
        return len(self.history.get("loss", []))

    def load(self) -> Any:
        """The saved best model, as a consumer loads it."""
        return load_saved_model(self.files.best)


def fit_track_model(
    data: PreparedData,
    opts: TrainOptions,
    files: ModelFiles,
    config: ModelConfig | None = None,
    warm: tuple[Any, Vocabulary] | None = None,
    log_dir: Path | None = None,
    label: str = "",
    before_refit: Callable[[FittedModel], bool] | None = None,
    name: str = "track_predictor",
) -> FittedModel:
    """THE training recipe every mode calls (docs/training.md, "One recipe"): fit, calibrate,
    refit unless --no-refit or `before_refit` (retrain's gate) says no. With `warm` (a model
    and its vocabulary) the fit starts from its weights for at most WARM_EPOCHS."""
    started = time.perf_counter()
    cfg = config or ModelConfig(seed=opts.seed)
    if warm is not None:
        opts = dataclasses.replace(opts, epochs=min(opts.epochs, WARM_EPOCHS))
    keras.utils.set_random_seed(cfg.seed)
    files.best.parent.mkdir(parents=True, exist_ok=True)
    save_vocab(files.vocab, data, opts.recency_half_life)
    model = create_simple_model(data.vocab_info, cfg, name=name)
    if warm:
        transfer_weights(model, *warm, data.vocab_info)
    history, fit_seconds = fit_model(model, data, opts, files.best, log_dir, label)
    calibration = save_calibrated(model, data, files.best, files.final, cfg)
    fitted = FittedModel(files, cfg, load_saved_model(files.best), data.vocab_info, calibration,
                         history, fit_seconds, 0.0)  # fmt: skip
    wanted = before_refit(fitted) if before_refit is not None else True
    if wanted and not opts.no_refit:
        fitted.refit = refit_on_every_record(data, opts, cfg, history, calibration, files, name)
        fitted.vocab = fitted.refit["vocab_info"]
    fitted.seconds = time.perf_counter() - started
    return fitted


@dataclass
class TrainResult:
    run_dir: Path
    #: The headline: the test window's figures (the validation records' without one).
    evaluation: Evaluation
    history: dict[str, list[float]]
    fit_seconds: float
    #: The validation records' figures: what checkpointing and calibration were tuned on.
    tuning: Evaluation | None = None

    @property
    def epochs_run(self) -> int:
        return len(self.history.get("loss", []))


@dataclass(frozen=True)
class ModelFiles:
    """Where one model's files go: `{prefix}_best.keras`, `_final.keras`, `_vocab.json`, ..."""

    best: Path
    final: Path
    vocab: Path
    summary: Path

    @classmethod
    def under(cls, run_dir: Path, prefix: str) -> ModelFiles:
        names = ("best.keras", "final.keras", "vocab.json", "summary.json")
        return cls(*(run_dir / f"{prefix}_{name}" for name in names))


def held_out_evaluations(
    model: Any, data: PreparedData, tables: dict[str, Any], calibration: ev.Calibration | None
) -> tuple[Evaluation, Evaluation | None]:
    """(tuning figures on the validation records, headline ones on the test window or None)."""
    truth = load_sample_truth(data.export_dir)
    tuning = evaluate_model(model, data.columns, data.val_idx, tables, truth, calibration)
    if len(data.test_idx) == 0:
        return tuning, None
    return tuning, evaluate_model(model, data.columns, data.test_idx, tables, truth, calibration)


def run_train(
    data_dir: Path | str,
    opts: TrainOptions,
    config: ModelConfig | None = None,
    mode: str = "train",
    mode_sections: Callable[[Path], list[str]] | None = None,
    data: PreparedData | None = None,
) -> TrainResult:
    """`train`: the recipe on one export; writes the models, vocab, summary and
    training_report.md under output/{mode}_<time>/. `tune` reuses it: `mode` names the
    directory and report, `mode_sections(run_dir)` adds its own sections."""
    data = data or prepare_training_data(data_dir, opts)
    run = Run.start(mode)
    files = ModelFiles.under(run.run_dir, opts.model_path)
    fitted = fit_track_model(data, opts, files, config, log_dir=run.path("logs"))
    tables = baseline_tables(data.columns, data.train_idx, opts.recency_half_life)
    tuning, test = held_out_evaluations(fitted.validated, data, tables, fitted.calibration)
    evaluation = test or tuning
    ev.plot_reliability_diagram(fitted.calibration, run.path("reliability_diagram.png"))
    serving = export_serving_model(fitted.load(), serving_dir_for(files.best))
    history = fitted.history
    report = [
        utils.overview_section(run, data.export_dir),
        ev.performance_section(history, files.best),
        *ev.evaluation_sections(tuning, test, data),
        utils.configuration_section(opts),
        dataset_section(data),
        utils.timing_section(run, *ev.epoch_lines(history, opts, fitted.fit_seconds)),
        model_section(fitted.validated, fitted.config, opts.class_weight, data.augmented),
        ev.refit_section(fitted.refit, files.best, files.final),
        mode_sections(run.run_dir) if mode_sections else [],
        ev.schedule_section(opts, mode),
        ev.figures_section(run, history, evaluation),
        ev.train_files_section(files, serving),
    ]
    utils.write_report(run, f"Training Report - {mode.capitalize()}", report,
                 ev.train_headline(evaluation, test is not None))  # fmt: skip
    utils.write_json(files.summary, model_summary(data, tuning, test, fitted))
    return TrainResult(run.run_dir, evaluation, history, fitted.fit_seconds, tuning)


def trained_until(data: PreparedData, fitted: FittedModel) -> float:
    """The newest scheduled time the saved model learnt from (unix s)."""
    ts = data.columns["scheduled_timestamp"]
    return float(ts.max() if fitted.refit else ts[data.train_idx].max())


def model_summary(data: PreparedData, tuning: Evaluation | None, test: Evaluation | None,
                  fitted: FittedModel) -> dict[str, Any]:  # fmt: skip
    """`{model_path}_summary.json` and a registry version's metadata: what a model was trained
    on, until when, and its held-out and tuning figures (`promote`, `retrain`, the server)."""
    return {
        "export": str(data.export_dir),
        "periods": data.split_info,
        "held_out": ev.evaluation_figures(test),
        "tuning": ev.evaluation_figures(tuning),
        "trained_until": trained_until(data, fitted),
        "refit_records": fitted.refit["records"] if fitted.refit else None,
    }


# -- ensemble: members of different shapes, averaged into one model -----------

DEFAULT_ENSEMBLE_MODEL_PATH = "track_prediction_ensemble_model"
DEFAULT_CV_MODEL_PATH = "track_prediction_cv_model"

#: Member architectures, cycled, each with its own seed; all near the default's capacity
#: (much smaller or more regularised members were weaker and dragged the average down).
ENSEMBLE_VARIANTS: list[dict[str, Any]] = [
    {"hidden_units": (256, 128), "dropout": 0.3},
    {"hidden_units": (384, 192), "dropout": 0.3, "train_embedding": 24},
    {"hidden_units": (256, 128, 64), "dropout": 0.25, "l2": 5e-5},
    {"hidden_units": (256, 256), "dropout": 0.3, "batch_norm": False, "l1": 1e-5},
    {"hidden_units": (320, 160), "dropout": 0.35, "l2": 2e-4, "route_embedding": 8},
]  # fmt: skip


def describe_config(cfg: ModelConfig) -> str:
    return (
        f"dense {'-'.join(map(str, cfg.hidden_units))}, dropout {cfg.dropout:g}, "
        f"L1 {cfg.l1:g}, L2 {cfg.l2:g}, batch norm {'on' if cfg.batch_norm else 'off'}, "
        f"embeddings {cfg.station_embedding}/{cfg.route_embedding}/{cfg.headsign_embedding}/"
        f"{cfg.train_embedding}, seed {cfg.seed}"
    )


def build_ensemble_model(members: list[Any], vocab_info: Vocabulary, weights: list[float]) -> Any:
    """Raw values in, the members' probabilities weighted by `member_weight_i` layers out."""
    inputs = build_raw_inputs()
    outputs = [keras.layers.Rescaling(w, name=f"member_weight_{i}")(member(inputs))
               for i, (member, w) in enumerate(zip(members, weights, strict=True))]  # fmt: skip
    mean = keras.layers.Add(name="mean_probabilities")(outputs) if len(outputs) > 1 else outputs[0]
    labelled = track_layers.TrackProbabilities(
        vocab_info.tracks, vocab_info.station_tracks, name="track_probabilities"
    )(mean)
    return keras.Model(inputs=inputs, outputs=labelled, name="track_ensemble")


@dataclass
class EnsembleResult:
    run_dir: Path
    soft_vote: Evaluation
    majority_vote_accuracy: float
    member_accuracy: list[float]
    member_seconds: list[float]
    agreement: dict[str, float]
    #: The combined model on the held-out test window (None with --test-days 0).
    test: Evaluation | None = None


@dataclass
class Member:
    """One trained ensemble member: the recipe's result with its own architecture."""

    index: int
    fitted: FittedModel
    evaluation: Evaluation

    @property
    def row(self) -> list[Any]:
        f = self.fitted
        return [self.index, describe_config(f.config), f"{f.validated.count_params():,}",
                f.epochs, f"{f.fit_seconds:.1f}",
                pct(self.evaluation.metrics["top1_accuracy"])]  # fmt: skip


def train_member(
    run: Run, data: PreparedData, opts: TrainOptions, index: int, cfg: ModelConfig, count: int
) -> Member:
    """One member by the recipe (vocabulary in the shared `_vocab.json`), scored on validation."""
    files = dataclasses.replace(ModelFiles.under(run.run_dir, f"{opts.model_path}_{index}"),
                                vocab=run.path(f"{opts.model_path}_vocab.json"))  # fmt: skip
    fitted = fit_track_model(data, opts, files, cfg, log_dir=run.path("logs") / f"member_{index}",
                             label=f"Member {index + 1}/{count}: {describe_config(cfg)}",
                             name=f"track_predictor_{index}")  # fmt: skip
    scored = evaluate_model(fitted.validated, data.columns, data.val_idx, None, None)
    log(f"Member {index + 1}/{count}: validation top-1 {pct(scored.metrics['top1_accuracy'])}")
    return Member(index, fitted, scored)


def save_combined(
    members: list[Any], weights: list[float], data: PreparedData, tables: dict[str, Any], path: Path
) -> tuple[Evaluation, ev.Calibration, Any]:
    """The members' weighted average, calibrated as a whole, saved and scored as loaded."""
    combined, calibration = calibrate_model(
        build_ensemble_model(members, data.vocab_info, weights), data.columns, data.val_idx,
        data.vocab_info.tracks,
    )  # fmt: skip
    combined.save(path)
    combined = load_saved_model(path)
    truth = load_sample_truth(data.export_dir)
    return evaluate_model(combined, data.columns, data.val_idx, tables, truth, calibration), \
        calibration, combined  # fmt: skip


def save_refit_combined(
    members: list[Member], weights: list[float], calibration: ev.Calibration, path: Path
) -> list[dict[str, Any]]:
    """The refit members' average saved over `path` with the combined map; the refits' figures."""
    refit = [m.fitted.load() for m in members]
    with_calibration(
        build_ensemble_model(refit, members[0].fitted.vocab, weights), calibration.confidence_map
    ).save(path)
    return [m.fitted.refit for m in members if m.fitted.refit is not None]


def run_ensemble(data_dir: Path | str, opts: TrainOptions, num_models: int) -> EnsembleResult:
    """`ensemble`: train `num_models` different members, save each and their average."""
    if num_models < 1:
        raise UserError("--num-models must be at least 1")
    data = prepare_training_data(data_dir, opts)
    run = Run.start("ensemble")
    mp = opts.model_path
    tables = baseline_tables(data.columns, data.train_idx, opts.recency_half_life)
    variants = [ENSEMBLE_VARIANTS[i % len(ENSEMBLE_VARIANTS)] for i in range(num_models)]
    members = [train_member(run, data, opts, i, ModelConfig(**v, seed=opts.seed + 1000 * i),
                            num_models) for i, v in enumerate(variants)]  # fmt: skip
    probs = [m.evaluation.probabilities for m in members]
    true_tracks = data.columns["track_number"][data.val_idx]
    weights = member_weights(probs, label_indices(true_tracks, data.vocab_info.tracks))
    combined_path = run.path(f"{mp}_combined.keras")
    soft, calibration, combined = save_combined(
        [m.fitted.validated for m in members], weights, data, tables, combined_path
    )
    _, test = held_out_evaluations(combined, data, tables, calibration)
    ev.plot_reliability_diagram(calibration, run.path("reliability_diagram.png"))
    refits = [] if opts.no_refit else save_refit_combined(members, weights, calibration,
                                                          combined_path)  # fmt: skip
    serving = export_serving_model(load_saved_model(combined_path), run.path(f"{mp}_serving"))
    majority = np.array(soft.labels, dtype=object)[majority_vote(probs)] == true_tracks
    accuracy = [m.evaluation.metrics["top1_accuracy"] for m in members]
    seconds = [m.fitted.fit_seconds for m in members]
    agreement = ev.member_agreement(probs)
    result = EnsembleResult(
        run.run_dir, soft, float(majority.mean()), accuracy, seconds, agreement, test
    )
    report = [
        utils.overview_section(run, data.export_dir, f"- Members: {num_models}"),
        votes_section(result),
        ev.ensemble_members_section(members, weights),
        *ev.evaluation_sections(soft, test, data),
        utils.configuration_section(opts),
        dataset_section(data),
        utils.timing_section(run, f"- Mean fit time per member: {np.mean(seconds):.1f} s"),
        ensemble_model_section(run, combined, opts, data, soft),
        ev.ensemble_refit_section(refits, calibration),
        ev.ensemble_files_section(mp, combined_path, serving),
    ]
    headline = (
        f"soft vote {pct(soft.metrics['top1_accuracy'])}, majority vote "
        f"{pct(result.majority_vote_accuracy)}, best member {pct(max(result.member_accuracy))}"
    )
    if test:
        headline += f"; held-out test window top-1 {pct(test.metrics['top1_accuracy'])}"
    utils.write_report(run, "Training Report - Ensemble", report, headline)
    return result


def votes_section(result: EnsembleResult) -> list[str]:
    """How the members vote together, on the validation records."""
    soft, majority = result.soft_vote.metrics["top1_accuracy"], result.majority_vote_accuracy
    rows = [
        ["Ensemble, soft vote (weighted mean probability; the combined model)", pct(soft)],
        ["Ensemble, majority vote (ties to the higher mean probability)", pct(majority)],
        ["Best single member", pct(max(result.member_accuracy))],
    ]
    agree = result.agreement
    return section(
        "Final Performance Metrics (tuning figures: the validation records)",
        utils.markdown_table(["", "Validation top-1"], rows),
        "",
        f"Members agree on every validation record's track {pct(agree['all_agree'])} of the "
        f"time; two members agree {pct(agree['mean_pairwise'])} of the time on average.",
    )


def ensemble_model_section(
    run: Run, combined: Any, opts: TrainOptions, data: PreparedData, soft: Evaluation
) -> list[str]:
    confusion = ev.plot_confusion_matrix(
        soft.metrics["confusion"], soft.labels, run.path("confusion_matrix.png")
    )
    augmented = "on" if data.augmented else "off"
    return section(
        "Model Details",
        f"- Combined model parameters: {combined.count_params():,}",
        "- Every member: embeddings, sin/cos time features, standardised timestamp, dense layers "
        "with L1/L2, dropout and (unless noted) batch normalisation; output restricted to the "
        "station's tracks",
        f"- Class weights: {opts.class_weight}; data augmentation: {augmented}",
        "",
        f"![Confusion matrix]({confusion.name})",
    )


# -- cv: k-fold cross-validation, folds contiguous in time by default ---------


def fold_row(r: dict[str, Any], shuffled: bool) -> list[Any]:
    """One fold's row of the report's table, from its cv_results.json figures."""
    return [r["fold"], "(shuffled)" if shuffled else r["validation_period"],
            f"{r['validation_records']:,}", f"{r['accuracy']:.4f}", f"{r['loss']:.4f}",
            f"{r['baseline_accuracy']:.4f}", f"{r['difference']:+.4f}",
            BASELINE_NAMES.get(r["baseline"], "n/a")]  # fmt: skip


def cv_fold(
    run: Run, export: Export, opts: TrainOptions, j: int, folds: list[np.ndarray], shuffled: bool,
    test_idx: np.ndarray,
) -> dict[str, Any]:  # fmt: skip
    """Fold j's model by the recipe (trained on every other fold, validated and calibrated
    on its own, no refit), saved and scored on its fold and on the test window."""
    val_idx, columns = folds[j], export.columns
    train_idx = np.sort(np.concatenate([f for i, f in enumerate(folds) if i != j]))
    split_info = {"method": "cv-random" if shuffled else "cv-time", "fold": j}
    data = prepare_split(*export, train_idx, val_idx, split_info, opts.batch_size, opts.seed,
                         test_idx=test_idx, recency_half_life=opts.recency_half_life,
                         change_threshold=opts.change_threshold)  # fmt: skip
    prefix = f"{opts.model_path}_fold_{j}"
    files = dataclasses.replace(
        ModelFiles.under(run.run_dir, prefix), best=run.path(f"{prefix}.keras")
    )
    fitted = fit_track_model(data, dataclasses.replace(opts, no_refit=True), files,
                             ModelConfig(seed=opts.seed + j), label=f"Fold {j + 1}/{len(folds)}")  # fmt: skip
    export_serving_model(fitted.validated, run.path(f"{prefix}_serving"))
    tables = baseline_tables(columns, data.train_idx, opts.recency_half_life)
    tuning, test = held_out_evaluations(fitted.validated, data, tables, fitted.calibration)
    result = fold_result(j, data, tuning, test, fitted)
    log(f"Fold {j + 1}/{len(folds)}: top-1 {pct(result['accuracy'])}, "
        f"baseline {pct(result['baseline_accuracy'])}")  # fmt: skip
    return result


def fold_result(j: int, data: PreparedData, tuning: Evaluation, test: Evaluation | None,
                fitted: FittedModel) -> dict[str, Any]:  # fmt: skip
    """One fold's figures as cv_results.json holds them."""
    val_idx = data.val_idx
    name, baseline = strongest_baseline(tuning.baselines) or ("", math.nan)
    accuracy = tuning.metrics["top1_accuracy"]
    result = {"fold": j + 1, "validation_records": int(len(val_idx)),
              "training_records": int(len(data.train_idx)),
              "validation_period": ev.validation_period(data.columns["scheduled_timestamp"][val_idx]),
              "accuracy": accuracy, "loss": ev.log_loss(tuning, data.columns["track_number"][val_idx]),
              "baseline": name, "baseline_accuracy": baseline,
              "difference": accuracy - baseline, "epochs": fitted.epochs,
              "fit_seconds": fitted.fit_seconds}  # fmt: skip
    if tuning.best_possible:
        result["best_possible"] = tuning.best_possible["accuracy"]
    if test is not None:
        _, test_baseline = strongest_baseline(test.baselines) or ("", math.nan)
        test_accuracy = test.metrics["top1_accuracy"]
        result.update({"test_accuracy": test_accuracy, "test_baseline_accuracy": test_baseline,
                       "test_difference": test_accuracy - test_baseline})  # fmt: skip
    return result


def run_cv(data_dir: Path | str, opts: TrainOptions, k: int, shuffle_folds: bool) -> Path:
    """`cv`: train and score one model per fold; report the spread and the intervals."""
    export = load_export(data_dir)
    n = len(export.columns["track_number"])
    # The newest --test-days stay out of every fold: the fold models are scored there too.
    ts = export.columns["scheduled_timestamp"]
    *_, test_idx, split_info = split_records(ts, "time", opts.seed, test_days=opts.test_days)
    rest = np.setdiff1d(np.arange(n), test_idx)
    indices = [rest[f] for f in fold_indices(ts[rest], k, shuffle_folds, opts.seed)]
    for j, val_idx in enumerate(indices):  # every fold trainable before any trains
        if len(set(np.delete(export.columns["track_number"], val_idx))) < 2:
            raise UserError(f"fold {j + 1}'s training records hold fewer than two tracks")
    run = Run.start("cv")
    results = [cv_fold(run, export, opts, j, indices, shuffle_folds, test_idx) for j in range(k)]
    assignment = np.full(n, -1, dtype=np.int64)  # -1: the test window
    for j, val_idx in enumerate(indices):
        assignment[val_idx] = j
    np.save(run.path("fold_assignment.npy"), assignment)
    # The model to deploy: `train`'s recipe on the same export with the same options.
    files = ModelFiles.under(run.run_dir, opts.model_path)
    label = "Deployable model: the train recipe on every fold"
    deployed = fit_track_model(prepare_training_data(export, opts), opts, files, label=label)
    export_serving_model(deployed.load(), serving_dir_for(files.best))
    method = "random (shuffled)" if shuffle_folds else "contiguous periods of time"
    keys = ["accuracy", "baseline_accuracy", "difference"]
    keys += [f"test_{key}" for key in keys] if len(test_idx) else []
    summary = {key: ev.mean_confidence_interval([r[key] for r in results]) for key in keys}
    summary["test_period"] = split_info["test_period"]  # type: ignore[assignment]
    utils.write_json(run.path("cv_results.json"), {
        "k_folds": k, "fold_method": method, "folds": results, **summary,
        "options": dataclasses.asdict(opts),
    })  # fmt: skip
    report = [
        utils.overview_section(run, f"{export.export_dir} ({n:,} records)",
                               f"- Folds: {k}, {method}; each fold validates on its records and trains on all the others"),
        ev.cv_performance_section(summary),
        ev.cv_folds_section([fold_row(r, shuffle_folds) for r in results]),
        utils.configuration_section(opts),
        utils.timing_section(None, f"- Mean fit time per fold: {np.mean([r['fit_seconds'] for r in results]):.1f} s"),
        ev.cv_deployable_section(opts.model_path, deployed),
        ev.cv_files_section(opts.model_path),
    ]  # fmt: skip
    headline = f"mean validation (tuning) accuracy {ev.interval(summary['accuracy'])}"
    if "test_accuracy" in summary:
        headline = (f"mean held-out test window accuracy {ev.interval(summary['test_accuracy'])}; "
                    + headline)  # fmt: skip
    utils.write_report(run, "Training Report - Cross-Validation", report, headline)
    return run.run_dir


# -- tune: Ray Tune random search with ASHA, then the best config retrained -------


@dataclass
class TuneOptions:
    """Options of `tune`; every field is also a command-line option."""

    # fmt: off
    max_epochs: int = option_field(30, "Epochs a trial may run (ASHA stops weak ones earlier).",
                                   click.IntRange(min=1))
    final_epochs: int = option_field(50, "Epochs for retraining the best configuration.",
                                     click.IntRange(min=1))
    num_samples: int = option_field(20, "Configurations to try.")
    project_name: str = option_field("track_tuning", "Name of the search in --ray-dir.")
    asha_grace_period: int = option_field(3, "Epochs every trial gets before ASHA may stop it.",
                                          click.IntRange(min=1))
    asha_reduction_factor: int = option_field(3, "ASHA keeps the best 1/factor of trials at each rung.",
                                              click.IntRange(min=2))
    ray_dir: str = option_field("ray_results", "Where Ray keeps results: a local path, shared storage, "
                                "or a URI (s3://, gs://).")
    ray_address: str | None = option_field(None, "Join a running Ray cluster (host:port, "
                                           "ray://host:10001 or auto).")
    cpus_per_trial: float = option_field(1.0, None, click.FloatRange(min=0, min_open=True))
    gpus_per_trial: float = option_field(0.0, None, click.FloatRange(min=0))
    seed: int = option_field(42, "Random seed.")
    resume: bool = option_field(False, "Continue an interrupted search found in --ray-dir/--project-name.")
    model_path: str = option_field(DEFAULT_MODEL_PATH, "File name prefix of the saved files.")
    test_days: float = option_field(TEST_DAYS, "Hold out the newest DAYS from the search and the "
                                    "retraining; the headline figures come from them.",
                                    click.FloatRange(min=0), metavar="DAYS")
    # fmt: on


#: The one search space of `tune` (Ray Tune) and the distributed launcher (Keras Tuner):
#: name -> ("choice", values) or ("uniform" / "loguniform", low, high).
SEARCH_SPACE: dict[str, tuple] = {
    "hidden_layers": ("choice", [1, 2, 3]),
    "first_units": ("choice", [128, 256, 512]),
    "width_decay": ("choice", [0.5, 1.0]),
    "dropout": ("uniform", 0.1, 0.5),
    "l2": ("loguniform", 1e-6, 1e-3),
    "learning_rate": ("loguniform", 3e-4, 3e-3),
    "batch_size": ("choice", [256, 512, 1024, 2048]),
    "route_embedding": ("choice", [4, 6, 8]),
    "train_embedding": ("choice", [8, 16, 24]),
    # The evidence path: how fast the history tables (and the loss) forget old records.
    "recency_half_life": ("choice", [30.0, 60.0, 120.0]),
}


def tune_search_space() -> dict[str, Any]:
    """SEARCH_SPACE as Ray Tune domains."""
    from ray import tune

    return {name: getattr(tune, kind)(*args) for name, (kind, *args) in SEARCH_SPACE.items()}


def describe_search_space() -> list[list[str]]:
    """[name, distribution] of each hyperparameter of SEARCH_SPACE."""
    rows = []
    for name, (kind, *args) in SEARCH_SPACE.items():
        if kind == "choice":
            text = "choice of " + ", ".join(str(c) for c in args[0])
        else:
            text = f"{kind.replace('loguniform', 'log-uniform')} {args[0]:g} to {args[1]:g}"
        if name == "first_units":
            text += " (later layers: times width_decay per layer)"
        rows.append([name, text])
    return rows


def model_config_from_trial(config: dict[str, Any], seed: int) -> ModelConfig:
    units = tuple(
        max(16, int(config["first_units"] * config["width_decay"] ** i))
        for i in range(config["hidden_layers"])
    )
    embeddings = {key: int(config[key]) for key in ("route_embedding", "train_embedding")}
    penalties = {key: float(config[key]) for key in ("dropout", "l2")}
    return ModelConfig(hidden_units=units, seed=seed, **embeddings, **penalties)


def data_for_recipe(data: PreparedData, opts: TrainOptions) -> PreparedData:
    """The same split with `opts`' batch size and half-life (rebuilt only if they differ)."""
    if (opts.batch_size, opts.recency_half_life) == (data.batch_size,
                                                     data.vocab_info.recency_half_life):  # fmt: skip
        return data
    return prepare_split(data.export_dir, data.metadata, data.columns, data.train_idx,
                         data.val_idx, data.split_info, opts.batch_size, opts.seed,
                         test_idx=data.test_idx, recency_half_life=opts.recency_half_life,
                         change_threshold=opts.change_threshold)  # fmt: skip


def search_recipe(config: dict[str, Any], max_epochs: int, seed: int) -> TrainOptions:
    """The training options of a searched configuration, for its trial and for retraining
    the winner (only `epochs`, the cap, may differ); everything else is `train`'s recipe."""
    return TrainOptions(
        epochs=max_epochs, batch_size=int(config["batch_size"]),
        learning_rate=float(config["learning_rate"]), seed=seed, scheduler_tmax=max_epochs,
        recency_half_life=float(config.get("recency_half_life", ev.RECENCY_HALF_LIFE_DAYS)),
    )  # fmt: skip


def tune_trial(
    config: dict[str, Any],
    columns: Columns,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    max_epochs: int,
    seed: int,
    threads: int,
) -> None:
    """One Ray Tune trial: `search_recipe` for up to max_epochs, reporting every epoch (with a
    checkpoint, so a resumed search continues the trial where it stopped)."""
    from ray import tune

    os.environ.setdefault("TF_NUM_INTRAOP_THREADS", str(threads))
    os.environ.setdefault("TF_NUM_INTEROP_THREADS", "1")
    opts = search_recipe(config, max_epochs, seed)
    data = prepare_split(Path("."), {}, columns, train_idx, val_idx, {"method": "time"},
                         opts.batch_size, seed, recency_half_life=opts.recency_half_life,
                         change_threshold=opts.change_threshold)  # fmt: skip
    start_epoch, checkpoint = 0, tune.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            model = keras.models.load_model(Path(folder) / "model.keras")
            start_epoch = json.loads((Path(folder) / "state.json").read_text())["epoch"]
    else:
        keras.utils.set_random_seed(seed)
        model = create_simple_model(data.vocab_info, model_config_from_trial(config, seed))
    fit_model(model, data, opts, None, None, extra_callbacks=[track_layers.ReportEachEpoch(opts)],
              initial_epoch=start_epoch)  # fmt: skip


def run_tune(data_dir: Path | str, topts: TuneOptions) -> TrainResult:
    """`tune`: ASHA-pruned random search with Ray Tune, then retrain the best config."""
    if topts.num_samples < 1:
        raise UserError("--num-samples must be at least 1")
    started = time.perf_counter()
    data = prepare_data(data_dir, 256, "time", topts.seed, test_days=topts.test_days)
    ray_dir = topts.ray_dir if utils.is_uri(topts.ray_dir) else str(Path(topts.ray_dir).resolve())
    trials = run_search(data, topts, ray_dir)
    finished = sorted((t for t in trials if "error" not in t),
                      key=lambda t: -t["best_val_accuracy"])  # fmt: skip
    if not finished:
        first = trials[0].get("error") if trials else "none ran"
        raise UserError(f"every trial failed; first error: {first}")
    seconds, best = time.perf_counter() - started, finished[0]
    stopped = sum(t["epochs"] < topts.max_epochs for t in finished)
    log(f"Search done in {seconds:.0f} s: {len(finished)} trials, {stopped} stopped early by "
        f"ASHA; best validation accuracy {best['best_val_accuracy']:.4f}")  # fmt: skip
    config = best["config"]
    opts = dataclasses.replace(search_recipe(config, topts.max_epochs, topts.seed),
                               epochs=topts.final_epochs, model_path=topts.model_path,
                               test_days=topts.test_days)  # fmt: skip
    data = data_for_recipe(data, opts)
    search_record = {**dataclasses.asdict(topts), "best_val_accuracy": best["best_val_accuracy"]}
    lines = search_lines(topts, trials, finished, seconds, ray_dir)
    return retrain_best(data, opts, model_config_from_trial(config, topts.seed), "tune", config,
                        search_record, lines)  # fmt: skip


def retrain_best(
    data: PreparedData, opts: TrainOptions, cfg: ModelConfig, mode: str,
    hyperparameters: dict[str, Any], search: dict[str, Any], lines: list[str],
) -> TrainResult:  # fmt: skip
    """Retrain a search's best configuration like `train` (under output/{mode}_<time>/),
    with `{model_path}_config.json` beside the model and the search's report `lines`."""

    def sections(run_dir: Path) -> list[str]:
        utils.write_json(run_dir / f"{opts.model_path}_config.json", {
            "hyperparameters": hyperparameters, "model_config": dataclasses.asdict(cfg),
            "training": dataclasses.asdict(opts), "search": search,
        })  # fmt: skip
        return lines

    return run_train(data.export_dir, opts, cfg, mode=mode, mode_sections=sections, data=data)


def make_tuner(trainable: Any, topts: TuneOptions, ray_dir: str) -> Any:
    """A new Ray Tune search, or the one under `ray_dir` continued with --resume."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    experiment = f"{ray_dir.rstrip('/')}/{topts.project_name}"
    if topts.resume:
        if not tune.Tuner.can_restore(experiment):
            raise UserError(f"--resume: no search to continue at {experiment}")
        log(f"Resuming the search in {experiment}")
        return tune.Tuner.restore(experiment, trainable=trainable, resume_unfinished=True,
                                  resume_errored=True)  # fmt: skip
    scheduler = ASHAScheduler(
        time_attr="training_iteration", max_t=topts.max_epochs,
        grace_period=min(topts.asha_grace_period, topts.max_epochs),
        reduction_factor=topts.asha_reduction_factor,
    )  # fmt: skip
    return tune.Tuner(
        trainable,
        param_space=tune_search_space(),
        tune_config=tune.TuneConfig(
            metric="val_accuracy", mode="max", scheduler=scheduler, num_samples=topts.num_samples,
            search_alg=BasicVariantGenerator(random_state=topts.seed),
        ),
        run_config=tune.RunConfig(
            name=topts.project_name, storage_path=ray_dir,
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1), verbose=1,
            # A trial whose worker died (a lost node, a busy machine) runs again from its
            # last checkpoint, once, rather than leave a hole in the search.
            failure_config=tune.FailureConfig(max_failures=1),
        ),
    )  # fmt: skip


def run_search(data: PreparedData, topts: TuneOptions, ray_dir: str) -> list[dict[str, Any]]:
    """Every trial's configuration, epochs, best validation accuracy and nodes (or error)."""
    ray = utils.connect_ray(topts.ray_address, num_cpus=None)
    try:
        from ray import tune

        from imt_ml.tfrecord_reader import tune_trial as trial_fn  # by module name, for the workers

        if topts.ray_address and not utils.is_uri(ray_dir):
            utils.check_shared_storage(ray, Path(ray_dir))
        trainable = tune.with_resources(
            tune.with_parameters(
                trial_fn, columns=data.columns, train_idx=data.train_idx, val_idx=data.val_idx,
                max_epochs=topts.max_epochs, seed=topts.seed,
                threads=max(1, int(topts.cpus_per_trial)),
            ),
            {"cpu": topts.cpus_per_trial, "gpu": topts.gpus_per_trial},
        )  # fmt: skip
        tuner = make_tuner(trainable, topts, ray_dir)
        log(f"Searching {topts.num_samples} configurations (Ray results: "
            f"{ray_dir.rstrip('/')}/{topts.project_name})")  # fmt: skip
        with contextlib.redirect_stdout(sys.stderr):
            results = tuner.fit()
        return [trial_summary(results[i]) for i in range(len(results))]
    finally:
        ray.shutdown()


def trial_summary(result: Any) -> dict[str, Any]:
    frame = result.metrics_dataframe
    if result.error or frame is None or frame.empty:
        error = " ".join(str(result.error).split())[:200]  # one line, for the report
        return {"config": result.config, "error": error, "epochs": 0,
                "best_val_accuracy": float("nan"), "nodes": []}  # fmt: skip
    return {
        "config": result.config,
        "epochs": int(frame["training_iteration"].max()),
        "best_val_accuracy": float(frame["val_accuracy"].max()),
        "nodes": sorted(set(frame["node_id"])) if "node_id" in frame else [],
    }


def search_lines(
    topts: TuneOptions, trials: list[dict], finished: list[dict], seconds: float, ray_dir: str
) -> list[str]:
    """The report's search section: the trials that `finished`, best first."""
    nodes = sorted({n for t in finished for n in t["nodes"]})
    stopped = sum(t["epochs"] < topts.max_epochs for t in finished)
    return section(
        "Hyperparameter Search",
        f"- Ray Tune random search, {topts.num_samples} samples, seed {topts.seed}; metric: "
        "validation accuracy (reported every epoch)",
        f"- ASHA: max {topts.max_epochs} epochs, grace period {topts.asha_grace_period}, "
        f"reduction factor {topts.asha_reduction_factor}",
        f"- Trials finished: {len(finished)}; stopped early by ASHA: {stopped}; "
        f"failed: {len(trials) - len(finished)}"
        + next((f" (the first: {t['error']})" for t in trials if "error" in t), ""),
        f"- Search wall time: {seconds:.1f} s",
        f"- Ray cluster: {topts.ray_address or 'local'}; nodes that ran trials: {len(nodes)}; "
        f"{topts.cpus_per_trial:g} CPU and {topts.gpus_per_trial:g} GPU per trial",
        f"- Ray results: `{ray_dir.rstrip('/')}/{topts.project_name}`",
        "",
        "Search space:",
        "",
        utils.markdown_table(["Hyperparameter", "Distribution"], describe_search_space()),
        "",
        "Top trials:",
        "",
        utils.markdown_table(ev.TOP_TRIALS_HEADER, ev.top_trial_rows(finished[:10])),
        "",
        f"The best configuration is retrained below for up to {topts.final_epochs} epochs and "
        f"saved with `{topts.model_path}_config.json`.",
    )


def run_evaluate(data_dir: Path | str, model_file: Path) -> tuple[Path, Evaluation]:
    """`evaluate`: score a saved model on every record of an export."""
    export_dir = find_export_dir(data_dir)
    model = load_saved_model(model_file)
    columns = read_export_columns(export_dir)
    idx = np.arange(len(columns["track_number"]))
    vocab_path = vocab_file_for(model_file)
    tables = json.loads(vocab_path.read_text()).get("baselines") if vocab_path.exists() else None
    evaluation = evaluate_model(model, columns, idx, tables, load_sample_truth(export_dir))
    run = Run.start("evaluate")
    m = evaluation.metrics
    confusion = ev.plot_confusion_matrix(
        m["confusion"], evaluation.labels, run.path("confusion_matrix.png")
    )
    baselines = (f"tables from the model's training data (`{vocab_path.name}`)" if tables
                 else "not available (no vocab JSON beside the model)")  # fmt: skip
    about = [f"- Model: `{model_file}`", f"- Data: `{export_dir}` (all {len(idx):,} records)",
             f"- Baselines: {baselines}", ""]  # fmt: skip
    utils.write_report(run, "Evaluation Report", [about, ev.evaluation_section(evaluation, "Evaluation"),
                                            [f"![Confusion matrix]({confusion.name})", ""]],
                 f"top-1 {pct(m['top1_accuracy'])}, top-3 {pct(m['top3_accuracy'])} on {len(idx):,} records",
                 name="evaluation_report.md")  # fmt: skip
    return run.run_dir, evaluation


def load_saved_model(model_file: Path | str) -> Any:
    """Load a model saved by this module, with one clear error if it cannot be."""
    path = Path(model_file)
    if not path.is_file():
        raise UserError(f"model file {path} does not exist")
    try:
        track_layers.register  # noqa: B018  (imports the custom layers, registering them)
        model = keras.models.load_model(path, compile=False)
        model_labels(model)
    except Exception as exc:  # Keras raises many kinds for a foreign or broken file
        if "'temperature'" in str(exc):
            raise UserError(f"{path} was saved by an imt-ml that calibrated with temperatures; "
                            "this one calibrates with a confidence map: train it again") from None  # fmt: skip
        raise UserError(
            f"cannot load {path} as an imt-ml model: {type(exc).__name__}: {str(exc)[:200]}"
        ) from None
    if "hour" in {i.name for i in model.inputs}:
        raise UserError(f"{path} was saved by an imt-ml that took the clock from hour/day_of_week "
                        "inputs; this one reads it from the scheduled instant in Boston time: "
                        "train it again")  # fmt: skip
    return model


# -- Prediction from raw tracker JSON -----------------------------------------


def features_from_assignment(doc: Any) -> dict[str, Any]:
    """Model inputs from one tracker assignment JSON object; ValueError if unusable. The
    clock is `scheduled_time` (without a UTC offset: Boston local time); the record's own
    hour, minute and day_of_week are ignored. A missing trip id or headsign is unknown."""
    if not isinstance(doc, dict):
        raise ValueError("expected a JSON object")
    for name in ("station_id", "route_id", "scheduled_time", "direction_id"):
        if doc.get(name) is None:
            raise ValueError(f"missing field {name}")
    try:
        timestamp = utils.parse_instant(doc["scheduled_time"])
    except (ValueError, OverflowError):
        raise ValueError(
            f"scheduled_time {doc['scheduled_time']!r} is not an ISO 8601 time"
        ) from None
    direction = doc["direction_id"]
    if type(direction) is not int or direction not in (0, 1):
        raise ValueError("direction_id must be 0 or 1")
    return {
        "station_id": str(doc["station_id"]),
        "route_id": str(doc["route_id"]),
        "trip_id": str(doc.get("trip_id") or ""),
        "headsign": str(doc.get("headsign") or ""),
        "direction_id": direction,
        "scheduled_timestamp": timestamp,
    }


class TrackPredictor:
    """A saved model that takes tracker assignments and answers with track labels:
    `load_predictor(path).predict([assignment])[0][:2]` -> `[('5', 0.81), ('6', 0.11)]`."""

    #: Records per call of the compiled model; larger inputs go in chunks.
    CHUNK = 4096

    def __init__(self, model: Any) -> None:
        self.model = model
        output = model.get_layer("track_probabilities")
        self.labels = list(output.labels)
        self.station_tracks = {s: set(t) for s, t in output.station_tracks.items()}
        self.stations = set(self.station_tracks)
        # One traced graph for every batch size: calibrated probabilities and the model's own.
        both = keras.Model(model.inputs, [model.output, raw_probabilities(output)])
        self._forward = tf.function(
            lambda inputs: both(inputs, training=False), input_signature=[serving_input_specs()]
        )

    def probabilities(self, records: list[dict[str, Any]]) -> np.ndarray:
        """Class probabilities (columns in `self.labels` order) for assignment dicts."""
        return self.both_probabilities([features_from_assignment(r) for r in records])[0]

    def both_probabilities(self, features: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
        """(calibrated, the model's own before calibration) class probabilities."""
        if not features:
            return (np.zeros((0, len(self.labels)), dtype=np.float32),) * 2
        parts = []
        for chunk in utils.chunked(features, self.CHUNK):
            columns = {
                name: tf.constant([f[name] for f in chunk], dtype=dtype)
                for name, dtype in MODEL_INPUTS.items()
            }
            parts.append([t.numpy() for t in self._forward(columns)])
        calibrated, raw = zip(*parts, strict=True)
        return np.concatenate(calibrated), np.concatenate(raw)

    def predict(self, records: list[dict[str, Any]]) -> list[list[tuple[str, float]]]:
        """For each record, (track, probability) pairs, most likely first. Only tracks the
        station used in training are listed (all tracks for an unknown station)."""
        results = []
        for record, probs in zip(records, self.probabilities(records), strict=True):
            allowed = self.station_tracks.get(record["station_id"], set(self.labels))
            order = np.argsort(-probs, kind="stable")
            results.append(
                [(self.labels[j], float(probs[j])) for j in order if self.labels[j] in allowed]
            )
        return results


def load_predictor(model_file: Path | str) -> TrackPredictor:
    return TrackPredictor(load_saved_model(model_file))


def run_predict(
    model_file: Path, lines: Iterable[str], write: Callable[[str], None], chunk: int = 1024
) -> int:
    """Answer each JSON line with one JSON line, in input order (an unusable one gets
    `{"error": ...}`); returns how many were errors."""
    predictor = load_predictor(model_file)
    errors = 0
    for block in utils.chunked((line for line in lines if line.strip()), chunk):  # blank: no record
        parsed = [parse_prediction_line(line) for line in block]
        good = [doc for doc, error in parsed if error is None]
        predictions = iter(predictor.predict(good) if good else [])
        for doc, error in parsed:
            if error is not None:
                errors += 1
                write(json.dumps({"error": error}))
                continue
            answer: dict[str, Any] = {"predictions": [
                {"track": t, "probability": round(p, 6)} for t, p in next(predictions)
            ]}  # fmt: skip
            if doc["station_id"] not in predictor.stations:
                answer["warning"] = (
                    f"unknown station_id {doc['station_id']!r}: every track considered"
                )
            write(json.dumps(answer))
    return errors


def parse_prediction_line(line: str) -> tuple[Any, str | None]:
    """(the assignment, None), or (None, why it cannot be answered)."""
    try:
        doc = json.loads(line)
    except ValueError as exc:
        return None, f"invalid JSON: {exc}"
    try:
        features_from_assignment(doc)
    except ValueError as exc:
        return None, str(exc)
    return doc, None


# -- Serving: a TensorFlow SavedModel for any TF runtime (no imt_ml needed) -------


def serving_dir_for(model_file: Path) -> Path:
    """`{model_path}_serving/` beside `{model_path}_best.keras` (or any `.keras` file)."""
    stem = vocab_file_for(model_file).name.removesuffix("_vocab.json")
    return model_file.with_name(f"{stem}_serving")


def export_serving_model(model: Any, path: Path) -> Path:
    """Write `model` as a SavedModel whose `serve` signature takes batches of MODEL_INPUTS by
    name and returns `tracks` (most likely first) and their `probabilities`."""
    labels = tf.constant(model_labels(model))

    @tf.function(input_signature=[serving_input_specs()])
    def serve(inputs: dict[str, Any]) -> dict[str, Any]:
        probabilities = model(inputs, training=False)
        order = tf.argsort(probabilities, axis=-1, direction="DESCENDING", stable=True)
        return {
            "tracks": tf.gather(labels, order),
            "probabilities": tf.gather(probabilities, order, batch_dims=1),
        }

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serve", serve)
    with contextlib.redirect_stdout(io.StringIO()):  # Keras prints every captured tensor
        archive.write_out(str(path))
    return path


@click.group(
    invoke_without_command=True,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
)
@click.argument("data_dir", type=click.Path(path_type=Path))
@click.pass_context
def cli(ctx: click.Context, data_dir: Path) -> None:
    """Train and use track-prediction models on the export in DATA_DIR.

    DATA_DIR is an export directory or an export root (its newest complete export
    is used). Without a MODE, `train` runs with its defaults.
    """
    ctx.obj = {"data_dir": data_dir}
    if ctx.invoked_subcommand is None:
        ctx.invoke(train)


#: The environment a training mode reads, for its --help.
TRAINING_EPILOG = utils.environment_epilog(
    utils.ENV_OUTPUT, utils.ENV_PROGRESS, utils.ENV_TF_LOG, utils.ENV_DETERMINISTIC
)


@cli.command(epilog=TRAINING_EPILOG)
@training_options
@click.pass_context
def train(ctx: click.Context, **options: Any) -> None:
    """Train one model; writes models, vocab and training_report.md under output/train_<time>/."""
    click.echo(str(run_train(ctx.obj["data_dir"], TrainOptions(**options)).run_dir))


@cli.command(epilog=TRAINING_EPILOG)
@model_option()
@click.pass_context
def evaluate(ctx: click.Context, model_file: Path) -> None:
    """Score a saved model on every record of the export in DATA_DIR."""
    click.echo(str(run_evaluate(ctx.obj["data_dir"], model_file)[0]))


@cli.command()
@model_option()
@click.option("--input", "input_file", type=click.File("r"), default="-", show_default=True,
              help="JSON lines of tracker assignments (- for stdin).")  # fmt: skip
def predict(model_file: Path, input_file: Any) -> None:
    """Predict tracks for JSON lines; one JSON line out per line in (DATA_DIR is not read)."""
    run_predict(model_file, input_file, click.echo)


@cli.command(epilog=TRAINING_EPILOG)
@utils.dataclass_options(TrainOptions, model_path=DEFAULT_ENSEMBLE_MODEL_PATH)
@click.option("--num-models", type=click.IntRange(min=1), default=5, show_default=True,
              help="Ensemble members (each of a different architecture and seed).")  # fmt: skip
@click.pass_context
def ensemble(ctx: click.Context, num_models: int, **options: Any) -> None:
    """Train several different models and average them; writes output/ensemble_<time>/."""
    click.echo(str(run_ensemble(ctx.obj["data_dir"], TrainOptions(**options), num_models).run_dir))


@cli.command(epilog=TRAINING_EPILOG)
@click.option("--k-folds", type=click.IntRange(min=2), default=5, show_default=True)
@click.option(
    "--shuffle-folds", is_flag=True, help="Random folds instead of contiguous periods of time."
)
@utils.dataclass_options(TrainOptions, model_path=DEFAULT_CV_MODEL_PATH)
@click.pass_context
def cv(ctx: click.Context, k_folds: int, shuffle_folds: bool, **options: Any) -> None:
    """k-fold cross-validation (accuracy per fold, mean, 95% interval), then the model to
    deploy by `train`'s recipe (--split applies to it only); writes output/cv_<time>/."""
    click.echo(str(run_cv(ctx.obj["data_dir"], TrainOptions(**options), k_folds, shuffle_folds)))


@cli.command(
    epilog=utils.environment_epilog(
        utils.ENV_OUTPUT, utils.ENV_PROGRESS, utils.ENV_TF_LOG,
        "RAY_ADDRESS (read by Ray: the cluster to join when --ray-address is not given)",
    )
)  # fmt: skip
@utils.dataclass_options(TuneOptions)
@click.pass_context
def tune(ctx: click.Context, **options: Any) -> None:
    """Search hyperparameters with Ray Tune and ASHA, then train the best; writes output/tune_<time>/."""
    click.echo(str(run_tune(ctx.obj["data_dir"], TuneOptions(**options)).run_dir))


if __name__ == "__main__":
    cli()
