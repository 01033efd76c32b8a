"""The custom Keras layers of imt-ml's models, and the training callbacks.

Each layer registers as "imt_ml>ClassName" when this module is imported, as the package does
with Keras (`imt_ml/__init__.py`): after `import imt_ml`, `keras.saving.load_model` needs
nothing else. Preprocessing lives in the model: raw strings and the scheduled instant become
features, the lookup tables are fixed weights, and the output labels each class's track.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from imt_ml.evaluation import ConfidenceMap
from imt_ml.utils import HISTORY_FOLDS, boston_offsets

register = keras.saving.register_keras_serializable(package="imt_ml")


# --- Inputs: raw values to features. ---
@register
class TrainNumber(keras.layers.Layer):
    """Trip id -> train number, the text after the last '-'."""

    def call(self, trip_id):
        return tf.strings.regex_replace(trip_id, r"^.*-", "")


@register
class JoinStrings(keras.layers.Layer):
    """Join string tensors element-wise, e.g. station and train number."""

    def __init__(self, separator: str = ":", **kwargs):
        super().__init__(**kwargs)
        self.separator = separator

    def call(self, parts):
        return tf.strings.join(list(parts), separator=self.separator)

    def get_config(self):
        return {**super().get_config(), "separator": self.separator}


@register
class BostonClock(keras.layers.Layer):
    """Unix seconds -> [hour, minute, day of week (0 = Monday), day number] on Boston's wall
    clock, from America/New_York's offset changes kept in the layer (`utils.boston_offsets`):
    no tz database needed. In float64: a float32 timestamp is only good to two minutes."""

    def __init__(self, instants: Sequence[float] | None = None,
                 offsets: Sequence[int] | None = None, **kwargs):  # fmt: skip
        kwargs.setdefault("dtype", "float64")  # keep the input's precision
        super().__init__(**kwargs)
        if instants is None or offsets is None:
            instants, offsets = boston_offsets()
        self.instants, self.offsets = list(instants), list(offsets)

    def call(self, timestamp):
        t = tf.reshape(tf.cast(timestamp, tf.float64), [-1])
        change = tf.searchsorted(tf.constant(self.instants, tf.float64), t, side="right")
        local = t + tf.gather(tf.constant(self.offsets, tf.float64), change)
        minutes = tf.floor(local / 60.0)
        day = tf.floor(minutes / 1440.0)
        minute_of_day = minutes - day * 1440.0
        hour = tf.floor(minute_of_day / 60.0)
        weekday = tf.math.floormod(day + 3.0, 7.0)  # 1970-01-01 was a Thursday
        clock = tf.stack([hour, minute_of_day - hour * 60.0, weekday, day], axis=-1)
        return tf.cast(clock, tf.float32)

    def get_config(self):
        return {**super().get_config(), "instants": self.instants, "offsets": self.offsets}


@register
class CyclicalEncoding(keras.layers.Layer):
    """x -> [sin(2 pi x / period), cos(2 pi x / period)]: 23:59 sits next to 00:00.
    With `column`, x is that column of a 2-D input (e.g. BostonClock's hour)."""

    def __init__(self, period: float, column: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.period, self.column = float(period), column

    def call(self, x):
        if self.column is not None:
            x = x[:, self.column]
        angle = keras.ops.cast(x, "float32") * (2.0 * math.pi / self.period)
        return keras.ops.stack([keras.ops.sin(angle), keras.ops.cos(angle)], axis=-1)

    def get_config(self):
        return {**super().get_config(), "period": self.period, "column": self.column}


# --- History: the lookup tables' counts as features and as evidence. ---
def other_days(inputs: Any, training: Any) -> Any:
    """[counts, fold counts, clock] -> the counts; in training less the record's own group of
    days' (Boston day number, clock column 3, modulo HISTORY_FOLDS), scaled up to the whole."""
    counts, fold_counts, clock = inputs
    if not training:
        return counts
    fold = keras.ops.cast(keras.ops.mod(clock[:, 3], float(HISTORY_FOLDS)), "int32")
    blocks = keras.ops.reshape(fold_counts, (-1, HISTORY_FOLDS, counts.shape[-1]))
    own = keras.ops.sum(blocks * keras.ops.one_hot(fold, HISTORY_FOLDS)[:, :, None], axis=1)
    return (counts - own) * (HISTORY_FOLDS / (HISTORY_FOLDS - 1))


@register
class OtherDays(keras.layers.Layer):
    """[counts, the same per group of days (HISTORY_FOLDS blocks), Boston clock] -> the counts a
    record may read: `other_days` in training (its own track is never its evidence), else all."""

    def call(self, inputs, training=None):
        return other_days(inputs, training)


@register
class NewTrips(keras.layers.Layer):
    """[station + trip counts, station + train counts, the train's finer (per weekday) tables]
    -> the same; in training a share `hide` of records read their trip as a new season's would
    (its counts 0, the train's only its other trips, the finer tables scaled alike; with
    `whole_train` the train's stay whole). `always` (a copy for calibration, `as_new_trips`):
    every record, in and out of training, reads its trip as new (docs/model.md)."""

    def __init__(self, hide: float = 0.15, seed: int | None = None, always: bool = False,
                 whole_train: bool = False, **kwargs):  # fmt: skip
        kwargs.pop("thin", None)  # models saved while `thin` (young trips) existed: always 0
        super().__init__(**kwargs)
        self.hide, self.seed = float(hide), seed
        self.always, self.whole_train = bool(always), bool(whole_train)
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, inputs, training=None):
        trip, train, *finer = inputs
        if self.always:
            return [trip * 0.0, *self._without_trip(trip, train, finer, trip * 0.0)]
        if not training or self.hide <= 0:
            return list(inputs)
        draw = keras.random.uniform((keras.ops.shape(trip)[0], 1), seed=self.seed_generator)
        kept = trip * keras.ops.cast(draw >= self.hide, trip.dtype)
        if self.whole_train:
            return [kept, train, *finer]
        return [kept, *self._without_trip(trip, train, finer, kept)]

    @staticmethod
    def _without_trip(trip, train, finer, kept_trip):
        """The train's counts with only `kept_trip` of its trip's; finer tables of the
        train (per weekday) scaled by the share of the train's weight that stays."""
        kept = keras.ops.relu(train - trip) + kept_trip
        total = keras.ops.sum(train, axis=-1, keepdims=True)
        share = keras.ops.sum(kept, axis=-1, keepdims=True) / keras.ops.maximum(total, 1e-6)
        return [kept, *(t * share for t in finer)]

    def get_config(self):
        return {**super().get_config(), "hide": self.hide, "seed": self.seed,
                "always": self.always, "whole_train": self.whole_train}  # fmt: skip


@register
class DayRow(keras.layers.Layer):
    """[station + train row, Boston clock] -> the row of the station + train number +
    weekday table: row * 7 + weekday (BostonClock's column 2, 0 = Monday)."""

    def call(self, inputs):
        row, clock = inputs
        return keras.ops.cast(row, "int64") * 7 + keras.ops.cast(clock[:, 2], "int64")


@register
class TrackHistory(keras.layers.Layer):
    """Lookup-table evidence as features: from a key's track counts, each track's share and
    log(1 + count)."""

    def call(self, inputs, training=None):
        counts = inputs
        if isinstance(inputs, list | tuple):  # saved before OtherDays existed
            counts = other_days(inputs, training)
        total = keras.ops.sum(counts, axis=-1, keepdims=True)
        shares = counts / keras.ops.maximum(total, 1e-6)
        return keras.ops.concatenate([shares, keras.ops.log1p(total)], axis=-1)


@register
class EvidenceLogits(keras.layers.Layer):
    """sum over tables of a_t * log(share + 0.01), one learned weight a_t per table (from 1).
    Tables come most specific first (station + trip id, then station + train number); each
    later one has a weight for records the first knows and one for those it does not. The last
    `finer` tables (per weekday) enter as log of their shares shrunk toward the previous
    table's by `prior` records, less log of its shares: stale weekday evidence counts once."""

    def __init__(self, finer: int = 0, prior: float = 3.0, **kwargs):
        super().__init__(**kwargs)
        self.finer, self.prior = int(finer), float(prior)

    def get_config(self):
        return {**super().get_config(), "finer": self.finer, "prior": self.prior}

    def build(self, input_shape):
        shape = (2 * len(input_shape) - 1,)  # one for the first table, two for each later one
        self.scales = self.add_weight(shape=shape, initializer="ones", name="scales")

    def call(self, inputs):
        # The first table's last column is log(1 + its count): > 0 where it knows the key.
        known = keras.ops.cast(inputs[0][:, -1:] > 0.0, "float32")
        logits = 0.0
        for i, history in enumerate(inputs):
            if i == 0:
                scale = self.scales[0]
            else:
                scale = known * self.scales[2 * i - 1] + (1.0 - known) * self.scales[2 * i]
            if i >= len(inputs) - self.finer:
                coarse = inputs[i - 1][:, :-1]
                count = keras.ops.expm1(history[:, -1:])
                shrunk = (history[:, :-1] * count + self.prior * coarse) / (count + self.prior)
                term = keras.ops.log(shrunk + 0.01) - keras.ops.log(coarse + 0.01)
            else:
                term = keras.ops.log(history[:, :-1] + 0.01)
            logits = logits + scale * term
        return logits


# --- Output: masks, and labelled, calibrated probabilities. ---
@register
class TrackProbabilities(keras.layers.Layer):
    """The output: class probabilities, keeping each class's track label and the tracks each
    station used in training (`.labels` / `.station_tracks`). Inputs [probabilities, known]:
    the top probability goes through `confidence_map` (known trips) or `new_trip_map` (new
    ones), docs/model.md#calibration; without a map (or `known`), the model's own."""

    def __init__(self, labels: list[str], station_tracks: dict[str, list[str]] | None = None,
                 confidence_map: dict[str, list[float]] | None = None,
                 new_trip_map: dict[str, list[float]] | None = None, **kwargs):  # fmt: skip
        super().__init__(**kwargs)
        self.labels, self.station_tracks = list(labels), dict(station_tracks or {})
        self.confidence_map = ConfidenceMap(**confidence_map) if confidence_map else None
        self.new_trip_map = ConfidenceMap(**new_trip_map) if new_trip_map else None

    def call(self, inputs):
        if not isinstance(inputs, list | tuple):
            return self._mapped(inputs, self.confidence_map)
        probabilities, known = inputs
        known_mapped = self._mapped(probabilities, self.confidence_map)
        new_mapped = self._mapped(probabilities, self.new_trip_map)
        return known * known_mapped + (1.0 - known) * new_mapped

    def _mapped(self, probabilities, confidence_map):
        if confidence_map is None:
            return probabilities
        x, y = (np.asarray(v, dtype=np.float32) for v in confidence_map)
        top = keras.ops.max(probabilities, axis=-1, keepdims=True)
        chosen = keras.ops.one_hot(keras.ops.argmax(probabilities, axis=-1), len(self.labels))
        # y[0] plus each segment's slope times how far into it the top probability lies.
        slopes = np.diff(y) / np.maximum(np.diff(x), 1e-9)
        into = keras.ops.clip(top - x[:-1], 0.0, np.diff(x))
        mapped = y[0] + keras.ops.sum(into * slopes, axis=-1, keepdims=True)
        not_top = probabilities * (1.0 - chosen)
        rest = keras.ops.sum(not_top, axis=-1, keepdims=True)
        second = keras.ops.max(not_top, axis=-1, keepdims=True)
        # At second / (second + rest) the top and the next track would tie; stay above.
        floor = second / keras.ops.maximum(second + rest, 1e-9) + 1e-5
        mapped = keras.ops.minimum(keras.ops.maximum(mapped, floor), 1.0)
        # When the other tracks hold (almost) nothing, the rest goes evenly to the ones
        # the station can use: the softmax gives exactly 0 to a track it never used
        # (its logit is 1e4 lower). With no such track the top keeps everything.
        usable = keras.ops.cast(not_top > 0.0, "float32")
        count = keras.ops.sum(usable, axis=-1, keepdims=True)
        mapped = keras.ops.where(count > 0.0, mapped, 1.0)
        others = keras.ops.where(
            rest > 1e-6, probabilities * (1.0 - mapped) / keras.ops.maximum(rest, 1e-6),
            usable * (1.0 - mapped) / keras.ops.maximum(count, 1.0),
        )  # fmt: skip
        return chosen * mapped + (1.0 - chosen) * others

    def get_config(self):
        cmap = self.confidence_map._asdict() if self.confidence_map else None
        new = self.new_trip_map._asdict() if self.new_trip_map else None
        return {**super().get_config(), "labels": self.labels, "station_tracks": self.station_tracks,
                "confidence_map": cmap, "new_trip_map": new}  # fmt: skip


@register
class ClosedTracks(keras.layers.Layer):
    """[the station's closing day per track (OPEN_TRACK_DAY: open), Boston clock] -> a logit
    penalty of -1e4 on tracks closed on the record's Boston day (clock column 3), else 0."""

    def call(self, inputs):
        since, clock = inputs
        return keras.ops.cast(clock[:, 3:4] >= since, "float32") * -1e4


@register
class KnownKey(keras.layers.Layer):
    """(batch, 1): 1.0 where a history table knows the record's key (log(1 + count) > 0)."""

    def call(self, history):
        return keras.ops.cast(history[:, -1:] > 0.0, "float32")


# --- Training callbacks. ---
def cosine_rate(base_lr: float, epoch: int, tmax: int) -> float:
    """The cosine schedule's rate at `epoch` (from 0): base_lr down to 1% of it at tmax."""
    progress_ = min(epoch, tmax) / max(tmax, 1)
    return base_lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress_)))


class CosineWithPlateau(keras.callbacks.Callback):
    """`cosine_rate` times a scale cut by `factor` after `patience` epochs without a better
    val_loss (the training loss when there are no validation records)."""

    def __init__(self, base_lr: float, tmax: int, patience: int, factor: float) -> None:
        super().__init__()
        self.base_lr, self.tmax, self.patience, self.factor = base_lr, tmax, patience, factor
        self.scale, self.best, self.wait = 1.0, math.inf, 0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        rate = cosine_rate(self.base_lr, epoch, self.tmax) * self.scale
        self.model.optimizer.learning_rate.assign(rate)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = logs if logs is not None else {}
        logs["learning_rate"] = float(self.model.optimizer.learning_rate.numpy())
        loss = logs.get("val_loss", logs.get("loss", math.inf))
        if loss < self.best - 1e-6:
            self.best, self.wait = loss, 0
        else:
            self.wait += 1
            if self.wait >= self.patience:
                self.scale, self.wait = self.scale * self.factor, 0


class ReportEachEpoch(keras.callbacks.Callback):
    """Reports a Ray Tune trial's epoch with a checkpoint (model, optimizer state and recipe),
    so a resumed search continues the trial where it stopped."""

    def __init__(self, recipe: Any = None) -> None:
        import ray

        super().__init__()
        self.recipe = dataclasses.asdict(recipe) if recipe is not None else None
        self.node_id = ray.get_runtime_context().get_node_id()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        from ray import tune

        logs = logs or {}
        metrics = {"val_accuracy": float(logs.get("val_accuracy", 0.0)),
                   "val_loss": float(logs.get("val_loss", math.inf)),
                   "accuracy": float(logs.get("accuracy", 0.0)), "epoch": epoch + 1,
                   "node_id": self.node_id}  # fmt: skip
        with tempfile.TemporaryDirectory() as folder:
            self.model.save(Path(folder) / "model.keras")
            state = {"epoch": epoch + 1, "recipe": self.recipe}
            (Path(folder) / "state.json").write_text(json.dumps(state))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))
