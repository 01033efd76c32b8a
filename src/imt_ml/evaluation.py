"""Judging track predictions with numpy only (no TensorFlow, so the figures of a saved model,
a backtest or a benchmark can be recomputed from its arrays): metrics, the lookup tables a
skeptic would try, confidence maps, paired margins with their intervals, report sections.

    tables = baseline_tables(columns, train_idx)
    table = baseline_predictions(tables, columns, test_idx)["station_train_weighted"]
    margin, half_width = paired_margin(model_hits, table == columns["track_number"][test_idx])
"""

from __future__ import annotations

import datetime as dt
import itertools
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from imt_ml import utils
from imt_ml.utils import SECONDS_PER_DAY, Run, UserError, markdown_table, pct, section

#: A schedule season lasts about 90 days; 60 lets the current one outweigh the last.
RECENCY_HALF_LIFE_DAYS = 60.0
COVERAGE_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)
#: Precisions at which reports give the share of records a predictor can answer.
PRECISION_TARGETS = (0.8, 0.9)


def boston_days(timestamps: np.ndarray) -> np.ndarray:
    """Day number (days since 1970-01-01) of each instant on Boston's calendar."""
    instants, offsets = utils.boston_offsets()
    at = np.searchsorted(np.asarray(instants), timestamps, side="right")
    local = timestamps + np.asarray(offsets, dtype=np.float64)[at]
    return np.floor(local / SECONDS_PER_DAY).astype(np.int64)


def boston_weekdays(days: np.ndarray) -> np.ndarray:
    """Weekday (0 = Monday) of Boston day numbers (a Thursday was day 0), as BostonClock."""
    return (days + 3) % 7


def train_numbers(trip_ids: Iterable[str]) -> np.ndarray:
    """The train number of each trip id: its last '-' part ('CR-733772-520' -> '520')."""
    return np.array([t.rsplit("-", 1)[-1] for t in trip_ids], dtype=object)


def track_sort_key(track: str) -> tuple[int, str]:
    """Numeric order for track labels: '2' before '10'."""
    return (int(track), track) if track.isdigit() else (10**9, track)


def iso_utc(ts: float) -> str:
    return dt.datetime.fromtimestamp(float(ts), dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def period(timestamps: np.ndarray) -> list[str]:
    """[first, last] scheduled time of some records, for reports."""
    return [iso_utc(timestamps.min()), iso_utc(timestamps.max())] if len(timestamps) else []


def label_indices(tracks: np.ndarray, labels: list[str]) -> np.ndarray:
    """Class index of each track, -1 for a track outside the model's labels."""
    index = {label: i for i, label in enumerate(labels)}
    return np.array([index.get(t, -1) for t in tracks], dtype=np.int64)


def recency_weights(timestamps: np.ndarray, half_life_days: float) -> np.ndarray:
    """0.5 ** (age / half-life), age counted back from the newest record, scaled to mean 1
    so the loss and the learning rate keep their meaning (all 1 for a half-life of 0)."""
    if half_life_days <= 0:
        return np.ones(len(timestamps))
    age_days = (timestamps.max() - timestamps.astype(np.float64)) / SECONDS_PER_DAY
    weights = 0.5 ** (age_days / half_life_days)
    return weights / weights.mean()


#: A train's newest records start a new regime (it moved home, its platform closed or
#: reopened) when splitting its time-ordered tracks there explains them better than one
#: distribution by at least this many nats (a log-likelihood ratio). Chosen on sample worlds
#: 3 and 4 (bench-backtest scores worlds 1 and 2): 4 to 8 nats did equally well there, 14
#: and more left trains on their old home for a week longer.
CHANGE_THRESHOLD_NATS = 6.0
#: A regime needs at least this many records: two alike in a row happen by chance.
CHANGE_MIN_RECORDS = 3


def multinomial_log_likelihood(counts: np.ndarray) -> np.ndarray:
    """Log-likelihood of each row of counts under its own maximum-likelihood shares."""
    totals = np.maximum(counts.sum(axis=-1, keepdims=True), 1)
    shares = np.where(counts > 0, counts / totals, 1.0)
    return (counts * np.log(shares)).sum(axis=-1)


def regime_start(tracks: np.ndarray, n_tracks: int, threshold: float) -> int:
    """Where the newest regime of one key's time-ordered track indices starts (0: one regime).
    Binary segmentation down the tail: the best split of what is left, while it clears
    `threshold`, each side keeping CHANGE_MIN_RECORDS."""
    start, least = 0, CHANGE_MIN_RECORDS
    while len(tracks) - start >= 2 * least:
        prefix = np.cumsum(np.eye(n_tracks)[tracks[start:]], axis=0)
        before = prefix[least - 1 : len(prefix) - least]  # counts of tail[:s], s = least..
        after = prefix[-1] - before
        gain = (multinomial_log_likelihood(before) + multinomial_log_likelihood(after)
                - multinomial_log_likelihood(prefix[-1]))  # fmt: skip
        best = int(np.argmax(gain))
        if gain[best] < threshold:
            break
        start += best + least
    return start


def regime_weights(keys: np.ndarray, timestamps: np.ndarray, tracks: np.ndarray,
                   n_tracks: int, threshold: float = CHANGE_THRESHOLD_NATS) -> np.ndarray:  # fmt: skip
    """1 for each record in its key's newest regime, 0 before it (all 1 for a threshold of 0).
    A record with no known track (index < 0) never splits a key but follows its time."""
    weights = np.ones(len(keys), dtype=np.float32)
    if threshold <= 0 or not len(keys):
        return weights
    order = np.lexsort((timestamps, keys))
    ordered = keys[order]
    edges = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1], True])
    for lo, hi in zip(edges[:-1], edges[1:], strict=False):
        idx = order[lo:hi]
        known = idx[tracks[idx] >= 0]
        start = regime_start(tracks[known], n_tracks, threshold)
        if start:
            weights[idx[timestamps[idx] < timestamps[known[start]]]] = 0.0
    return weights


#: A station's track reads as closed (track works; see `closed_tracks`) when the departures the
#: station had after the track's last one would have given it at least this many, at its share
#: of the station's departures of the same kind of day (weekday, Saturday, Sunday) in the
#: CLOSED_TRACK_LOOKBACK_DAYS up to that last one. At 20, a merely quiet track shows no departure
#: with a chance of about e^-20.
CLOSED_TRACK_EXPECTED = 20.0

#: The lookup tables a skeptic would try, in the order reports list them: each counted
#: plainly, with the model's recency weighting (`_weighted`) and from the newest records
#: (`_recent`: the last RECENT_DAYS where the key has any, else all of them).
TABLE_KEYS = {
    "station_route": "the station + route",
    "station_train": "the station + train number",
    "station_trip": "the station + trip id, else station + train number",
    "station_train_day": "the station + train number + weekday, else station + train number",
}
BASELINE_NAMES = {
    **{name: f"most frequent track for {key}" for name, key in TABLE_KEYS.items()},
    **{f"{name}_weighted": f"most frequent track for {key}, recency-weighted"
       for name, key in TABLE_KEYS.items()},
    **{f"{name}_recent": f"most frequent track for {key} in its last two weeks"
       for name, key in TABLE_KEYS.items()},
}  # fmt: skip
#: What "recent" means to the `_recent` tables: the skeptic's answer to a train that moved.
RECENT_DAYS = 14
TABLE_SUFFIXES = ("", "_weighted", "_recent")


def table_keys(columns: dict[str, np.ndarray], idx: np.ndarray) -> dict[str, np.ndarray]:
    """Each lookup table's key per record ("station|route", ...)."""
    stations = columns["station_id"][idx].astype(str)
    trips = columns["trip_id"][idx].astype(str)
    joined = np.char.add(stations, "|")
    by_train = np.char.add(joined, train_numbers(trips).astype(str))
    weekdays = boston_weekdays(boston_days(columns["scheduled_timestamp"][idx].astype(np.float64)))
    return {
        "station_route": np.char.add(joined, columns["route_id"][idx].astype(str)),
        "station_train": by_train,
        "station_trip": np.char.add(joined, trips),
        "station_train_day": np.char.add(np.char.add(by_train, "|"), weekdays.astype(str)),
        "station": stations,
        "overall": np.full(len(idx), "*"),
    }


def most_frequent_tracks(keys: np.ndarray, tracks: np.ndarray, weights: np.ndarray) -> dict:
    """key -> [its most frequent track (by weight), that track's share of the key's weight].
    Ties go to the lower track number, so a table is deterministic."""
    if len(keys) == 0:
        return {}
    labels = sorted(set(tracks.tolist()), key=track_sort_key)
    column = label_indices(tracks, labels)
    unique, row = np.unique(keys, return_inverse=True)
    counts = np.zeros((len(unique), len(labels)))
    np.add.at(counts, (row, column), weights)
    best = counts.argmax(axis=1)  # the first maximum: the lowest track number
    share = counts[np.arange(len(unique)), best] / np.maximum(counts.sum(axis=1), 1e-12)
    return {k: [labels[b], round(float(v), 4)] for k, b, v in zip(unique.tolist(), best, share,
                                                                   strict=True)}  # fmt: skip


def baseline_tables(
    columns: dict[str, np.ndarray], idx: np.ndarray, half_life_days: float = RECENCY_HALF_LIFE_DAYS
) -> dict[str, Any]:
    """The lookup tables (TABLE_KEYS, station and overall) of the records `idx`: counted
    plainly, and (`_weighted`) with the recency weights the model's history tables use."""
    keys = table_keys(columns, idx)
    tracks = columns["track_number"][idx]
    plain = np.ones(len(idx))
    ts = columns["scheduled_timestamp"][idx].astype(np.float64)
    weighted = recency_weights(ts, half_life_days) if half_life_days > 0 and len(idx) else plain
    # Older records count a millionth: they decide only where the key has no recent one.
    recent = np.where(ts >= ts.max(initial=0) - RECENT_DAYS * SECONDS_PER_DAY, 1.0, 1e-6)
    tables: dict[str, Any] = {}
    for name, key in keys.items():
        tables[name] = most_frequent_tracks(key, tracks, plain)
        if name in TABLE_KEYS:
            tables[f"{name}_weighted"] = most_frequent_tracks(key, tracks, weighted)
            tables[f"{name}_recent"] = most_frequent_tracks(key, tracks, recent)
    tables["overall"] = tables["overall"].get("*", ["", 0.0])
    tables["recency_half_life"] = half_life_days
    # How many training records each answer rests on (the server's historical_matches).
    tables["record_counts"] = {name: {str(k): int(n) for k, n in zip(*np.unique(keys[name],
                                      return_counts=True), strict=True)}
                               for name in ("station_train", "station_route")}  # fmt: skip
    return tables


def baseline_answers(
    tables: dict[str, Any], columns: dict[str, np.ndarray], idx: np.ndarray
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each lookup table's (predicted track, confidence: the track's share of the training
    records under the key used) per record. A key the table lacks falls back to the station
    (station + trip id and + weekday first to station + train number of the same weighting),
    then to the overall most frequent track."""
    keys = table_keys(columns, idx)

    def entry(value: Any) -> tuple[str, float]:  # tables written before shares: bare tracks
        return (value[0], float(value[1])) if isinstance(value, list) else (value, math.nan)

    def lookup(name: str, fallback: list) -> list:
        table = tables[name]
        keyed = zip(keys[name.removesuffix("_weighted").removesuffix("_recent")], fallback,
                    strict=True)  # fmt: skip
        return [entry(table[k]) if k in table else back for k, back in keyed]

    station_answers = lookup("station", [entry(tables["overall"])] * len(idx))
    answers = {}
    for suffix in TABLE_SUFFIXES:
        if f"station_route{suffix}" not in tables:  # tables saved before this kind
            continue
        by_train = lookup(f"station_train{suffix}", station_answers)
        answers[f"station_route{suffix}"] = lookup(f"station_route{suffix}", station_answers)
        answers[f"station_train{suffix}"] = by_train
        for name in ("station_trip", "station_train_day"):
            if f"{name}{suffix}" in tables:  # (tables saved before it lack the weekday one)
                answers[f"{name}{suffix}"] = lookup(f"{name}{suffix}", by_train)
    return {
        name: (np.array([a[0] for a in rows], dtype=object), np.array([a[1] for a in rows]))
        for name, rows in answers.items()
    }


def baseline_predictions(
    tables: dict[str, Any], columns: dict[str, np.ndarray], idx: np.ndarray
) -> dict[str, np.ndarray]:
    """Each lookup table's predicted track per record (see `baseline_answers`)."""
    return {name: pred for name, (pred, _) in baseline_answers(tables, columns, idx).items()}


def paired_margin(model_hits: np.ndarray, table_hits: np.ndarray) -> tuple[float, float]:
    """(the model's top-1 minus a table's, the 95% half-width of that difference): both answer
    the same records, so it is the paired normal interval of the per-record difference, far
    narrower than two separate accuracies' would be. One that holds 0 is a tie."""
    if len(model_hits) < 2:
        return float("nan"), float("nan")
    diff = model_hits.astype(np.float64) - table_hits.astype(np.float64)
    return float(diff.mean()), float(1.96 * diff.std(ddof=1) / np.sqrt(len(diff)))


def strongest_baseline(baselines: dict[str, float]) -> tuple[str, float] | None:
    """(name, accuracy) of the most accurate lookup table, if any were measured."""
    return max(baselines.items(), key=lambda kv: kv[1]) if baselines else None


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray) -> float:
    """Mean |accuracy - confidence| over equal-width confidence bins, weighted by bin size."""
    if len(confidence) == 0:
        return float("nan")
    per_bin = reliability_bins(confidence, correct)
    total = sum(b["records"] * abs(b["accuracy"] - b["confidence"]) for b in per_bin)
    return float(total / len(confidence))


class ConfidenceMap(NamedTuple):
    """A monotone map of the top probability: knots `x` (increasing) and the accuracy
    `y` at each; linear between knots, flat beyond them."""

    x: list[float]
    y: list[float]

    def at(self, confidence: np.ndarray) -> np.ndarray:
        return np.interp(confidence, self.x, self.y)

    @classmethod
    def mean(cls, maps: list[ConfidenceMap]) -> ConfidenceMap:
        """The pointwise mean of several maps (still monotone), on all their knots."""
        x = np.unique(np.concatenate([m.x for m in maps]))
        return cls(x.tolist(), np.mean([m.at(x) for m in maps], axis=0).tolist())


def fit_confidence_map(confidence: np.ndarray, correct: np.ndarray) -> ConfidenceMap:
    """Isotonic regression of correctness on the top probability (pool adjacent violators):
    each block of records becomes one knot at its mean confidence, with its accuracy shrunk
    by half a record towards 1/2 so no knot promises certainty. Not temperature scaling (Guo
    et al. 2017): on drifting track history the model is under-confident in the middle and
    over-confident near 1, which one temperature cannot mend (it made held-out ECE worse than
    no calibration in the drift benchmark), and a monotone map can."""
    order = np.argsort(confidence, kind="stable")
    blocks: list[list[float]] = []  # [sum of confidence, correct, records]
    for c, k in zip(confidence[order], correct[order].astype(float), strict=True):
        blocks.append([float(c), k, 1.0])
        while len(blocks) > 1 and blocks[-2][1] * blocks[-1][2] >= blocks[-1][1] * blocks[-2][2]:
            last = blocks.pop()
            blocks[-1] = [a + b for a, b in zip(blocks[-1], last, strict=True)]
    sums = np.array(blocks)
    x = sums[:, 0] / sums[:, 2]
    y = np.maximum.accumulate((sums[:, 1] + 0.5) / (sums[:, 2] + 1.0))
    return ConfidenceMap([round(float(v), 6) for v in x], [round(float(v), 6) for v in y])


@dataclass
class Calibration:
    """A confidence map fitted on validation records, and what it changed there. Trips the
    model does not know get `new_trip_map`, fitted on the records `new_trip_source` names
    (for reports); `new_trip_ece` is those records' ECE (before, after) that map."""

    confidence_map: ConfidenceMap | None
    ece_before: float
    ece_after: float
    records: int
    reliability_before: list[dict[str, float]]
    reliability_after: list[dict[str, float]]
    new_trip_map: ConfidenceMap | None = None
    new_trip_ece: tuple[float, float] | None = None
    new_trip_source: str = ""

    def describe(self) -> str:
        text = describe_map(self.confidence_map)
        if self.new_trip_map is not None:
            text += f"; new trips: {describe_map(self.new_trip_map)}"
        return text


def describe_map(cmap: ConfidenceMap | None) -> str:
    """A few points of the map, for reports."""
    if cmap is None:
        return "none: too few validation records to fit one"
    points = np.array([0.5, 0.7, 0.9, 0.99])
    return ", ".join(f"{p:g} -> {m:.3f}" for p, m in zip(points, cmap.at(points), strict=True))


def reliability_bins(confidence: np.ndarray, correct: np.ndarray) -> list[dict[str, float]]:
    """Per equal-width confidence bin (ten): records, mean confidence, accuracy."""
    bins = 10
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    out = []
    for b in range(bins):
        sel = which == b
        if sel.any():
            out.append({"low": float(edges[b]), "high": float(edges[b + 1]), "records": int(sel.sum()),
                        "confidence": float(confidence[sel].mean()), "accuracy": float(correct[sel].mean())})  # fmt: skip
    return out


def log_loss(ev: Evaluation, true_tracks: np.ndarray) -> float:
    """Cross-entropy of the true tracks (probability 1e-7 for tracks outside the labels)."""
    y = label_indices(true_tracks, ev.labels)
    p = np.where(y >= 0, ev.probabilities[np.arange(len(y)), np.maximum(y, 0)], 0.0)
    return mean_or_nan(-np.log(np.maximum(p, 1e-7)))


def coverage_at_precision(confidence: np.ndarray, correct: np.ndarray, precision: float) -> float:
    """The largest share of records answerable, most confident first, with accuracy on
    the answered records at least `precision`."""
    if len(confidence) == 0:
        return float("nan")
    order = np.argsort(-confidence, kind="stable")
    hits = np.cumsum(correct[order])
    accuracy = hits / np.arange(1, len(order) + 1)
    ok = np.flatnonzero(accuracy >= precision)
    return float((ok[-1] + 1) / len(order)) if len(ok) else 0.0


def mean_or_nan(values: np.ndarray) -> float:
    return float(values.mean()) if len(values) else float("nan")


def evaluate_predictions(
    probs: np.ndarray, true_tracks: np.ndarray, labels: list[str], stations: np.ndarray
) -> dict[str, Any]:
    """Top-1/top-3, per station, accuracy at coverage, ECE and confusion counts. Records whose
    true track is not among `labels` count as wrong."""
    y = label_indices(true_tracks, labels)
    n = len(y)
    order = np.argsort(-probs, axis=1)
    top1 = order[:, 0]
    correct = top1 == y
    confidence = probs[np.arange(n), top1] if n else np.zeros(0)
    per_station = {}
    for station in sorted(set(stations)):
        sel = stations == station
        per_station[station] = {"records": int(sel.sum()), "accuracy": float(correct[sel].mean())}
    coverage = [
        {"threshold": t, "coverage": mean_or_nan(sel), "accuracy": mean_or_nan(correct[sel])}
        for t, sel in ((t, confidence >= t) for t in COVERAGE_THRESHOLDS)
    ]
    known = y >= 0
    confusion = np.zeros((len(labels), len(labels)), dtype=np.int64)
    np.add.at(confusion, (y[known], top1[known]), 1)
    return {
        "records": int(n),
        "unknown_track_records": int((~known).sum()),
        "top1_accuracy": mean_or_nan(correct),
        "top3_accuracy": mean_or_nan((order[:, :3] == y[:, None]).any(axis=1)),
        "mean_confidence": mean_or_nan(confidence),
        "expected_calibration_error": expected_calibration_error(confidence, correct),
        "per_station": per_station,
        "coverage": coverage,
        "confusion": confusion,
        "predicted_tracks": np.array(labels, dtype=object)[top1],
    }


def load_sample_truth(export_dir: Path) -> dict[tuple[str, str, float], float] | None:
    """Generating probabilities of sample data, from the export or its root (else None)."""
    for folder in (export_dir, export_dir.parent):
        if (path := folder / utils.SAMPLE_TRUTH_FILE).is_file():
            data = np.load(path)
            stamps = data["scheduled_timestamp"].tolist()
            keys = zip(data["station_id"], data["trip_id"], stamps, strict=True)
            return dict(zip(keys, data["best_probability"].tolist(), strict=True))
    return None


def best_possible_accuracy(
    truth: dict | None, columns: dict[str, np.ndarray], idx: np.ndarray
) -> dict[str, Any] | None:
    """Mean generating probability of the likeliest track over the records (sample data)."""
    if truth is None:
        return None
    stamps = columns["scheduled_timestamp"][idx].astype(np.float32).tolist()
    keys = zip(columns["station_id"][idx], columns["trip_id"][idx], stamps, strict=True)
    found = [truth[k] for k in keys if k in truth]
    if not found:
        return None
    return {"accuracy": float(np.mean(found)), "matched": len(found), "records": int(len(idx))}


@dataclass
class Evaluation:
    """A model scored on a set of records, with its comparisons."""

    metrics: dict[str, Any]
    baselines: dict[str, float]
    best_possible: dict[str, Any] | None
    labels: list[str]
    probabilities: np.ndarray
    #: predictor ("model" or a baseline) -> precision -> share of records answerable
    answerable: dict[str, dict[float, float]] = field(default_factory=dict)
    calibration: Calibration | None = None


def plot_learning_curves(history: dict[str, list[float]], path: Path) -> Path:
    with utils.figure(path, ncols=2, figsize=(11, 4)) as (_, axes):
        epochs = range(1, len(history.get("loss", [])) + 1)
        for key, ax in zip(("loss", "accuracy"), axes, strict=True):
            for name, label in ((key, "train"), (f"val_{key}", "validation")):
                if name in history:
                    ax.plot(epochs, history[name], label=f"{label} {key}")
            ax.set(xlabel="epoch", title=key)
            ax.grid(alpha=0.3)
            ax.legend()
    return path


def plot_confusion_matrix(confusion: np.ndarray, labels: list[str], path: Path) -> Path:
    rows = confusion.sum(axis=1, keepdims=True)
    share = np.divide(confusion, rows, out=np.zeros_like(confusion, dtype=float), where=rows > 0)
    size = max(5.0, 0.45 * len(labels) + 2)
    with utils.figure(path, figsize=(size, size * 0.85)) as (fig, ax):
        image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        ax.set_xticks(range(len(labels)), labels)
        ax.set_yticks(range(len(labels)), labels)
        ax.set(xlabel="predicted track", ylabel="actual track",
               title="Validation confusion matrix (row-normalised)")  # fmt: skip
        fig.colorbar(image, ax=ax, fraction=0.046)
    return path


def plot_reliability_diagram(calibration: Calibration, path: Path) -> Path:
    """Accuracy against confidence per bin, before and after the confidence map."""
    c = calibration
    with utils.figure(path, figsize=(5.5, 5)) as (_, ax):
        ax.plot([0, 1], [0, 1], "--", color="grey", linewidth=1, label="perfect calibration")
        for bins, label, style in ((c.reliability_before, f"model (ECE {c.ece_before:.3f})", "o-"),
                                   (c.reliability_after, f"calibrated (ECE {c.ece_after:.3f})", "s-")):  # fmt: skip
            x, y = [b["confidence"] for b in bins], [b["accuracy"] for b in bins]
            ax.plot(x, y, style, label=label)
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (top probability), mean per bin",
               ylabel="accuracy in the bin", title=f"Reliability on {c.records:,} validation records")  # fmt: skip
        ax.legend(loc="upper left")
    return path


def evaluation_section(ev: Evaluation, title: str = "Evaluation on the validation records") -> str:
    m = ev.metrics
    unknown = m["unknown_track_records"]
    parts = section(
        title,
        f"{m['records']:,} records"
        + (f", of which {unknown:,} have a track never seen in training (counted as wrong)"
           if unknown else "")
        + ". All figures below are measured on these same records.",
        "",
        markdown_table(["", "Accuracy"], accuracy_rows(ev)),
        "",
        *margin_lines(ev),
        "### Accuracy at coverage",
        "",
        "Answer only when the top probability reaches a threshold: the share of records "
        "answered and the accuracy on them.",
        "",
        markdown_table(["Threshold", "Coverage", "Accuracy"],
                       [[f"{c['threshold']:.2f}", pct(c["coverage"]), pct(c["accuracy"])]
                        for c in m["coverage"]]),
        "",
        f"Expected calibration error (10 bins): {m['expected_calibration_error']:.4f} "
        f"(mean top-1 confidence {pct(m['mean_confidence'])} vs accuracy {pct(m['top1_accuracy'])}).",
        "",
        *calibration_lines(ev.calibration),
        *answerable_lines(ev),
        "### Accuracy per station",
        "",
        markdown_table(["Station", "Records", "Accuracy"],
                       [[s, f"{v['records']:,}", pct(v["accuracy"])]
                        for s, v in m["per_station"].items()]),
    )  # fmt: skip
    return "\n".join(parts)


def accuracy_rows(ev: Evaluation) -> list[list[str]]:
    """The model, every lookup table and (on sample data) the best possible."""
    m = ev.metrics
    rows = [["Model (top-1)", pct(m["top1_accuracy"])], ["Model (top-3)", pct(m["top3_accuracy"])]]
    rows += [[f"Baseline: {BASELINE_NAMES[key]}", pct(acc)] for key, acc in ev.baselines.items()]
    if bp := ev.best_possible:
        rows.append([f"Best possible (sample data's generating probabilities, {bp['matched']:,} records)",
                     pct(bp["accuracy"])])  # fmt: skip
    return rows


def margin_lines(ev: Evaluation) -> list[str]:
    """The model's margin over the strongest lookup table, and its share of the best possible."""
    top1, lines = ev.metrics["top1_accuracy"], []
    strongest = strongest_baseline(ev.baselines)
    if strongest:
        name, accuracy = strongest
        delta = top1 - accuracy
        lines += [f"The strongest lookup table is the {BASELINE_NAMES[name]} ({pct(accuracy)}); "
                  f"the model {'beats it by' if delta > 0 else 'trails it by'} {100 * abs(delta):.2f} points.",
                  ""]  # fmt: skip
    if ev.best_possible:
        ratio = top1 / ev.best_possible["accuracy"]
        lines += [f"Model accuracy is {100 * ratio:.1f}% of the best possible.", ""]
    return lines


def calibration_lines(calibration: Calibration | None) -> list[str]:
    if calibration is None:
        return []
    c, new_trips = calibration, []
    if c.new_trip_ece is not None:
        new_trips = [
            "",
            "Records whose trip the model does not know (a new schedule season's) get a map of "
            f"their own, fitted on {c.new_trip_source}: ECE {c.new_trip_ece[0]:.4f} before, "
            f"{c.new_trip_ece[1]:.4f} after (in-sample).",
        ]
    return [
        "### Calibration",
        "",
        "The saved model's output layer maps its top probability to the accuracy that validation "
        "records with that confidence had (isotonic regression on the records whose trip the model "
        f"knew; {c.describe()}); the other tracks share the rest in proportion and the "
        "answer never changes. So `predict`, `load_predictor`, `serve` and the `.keras` file itself "
        "all answer with calibrated probabilities.",
        f"Expected calibration error on those records: {c.ece_before:.4f} before, "
        f"{c.ece_after:.4f} after (the map was fitted on these records' known trips, "
        "so the figure after is in-sample).",
        *new_trips,
        "",
        "![Reliability diagram](reliability_diagram.png)",
        "",
    ]


def answerable_lines(ev: Evaluation) -> list[str]:
    """The share of records each predictor can answer at a given precision."""
    if not ev.answerable:
        return []
    names = {"model": "Model", **{k: f"Lookup: {v}" for k, v in BASELINE_NAMES.items()}}
    header = ["Predictor", *[f"at {100 * p:.0f}% precision" for p in PRECISION_TARGETS]]
    rows = [[names[name], *[pct(cov[p]) for p in PRECISION_TARGETS]]
            for name, cov in ev.answerable.items()]  # fmt: skip
    lines = [
        "### Answerable at a precision",
        "",
        "Answering the most confident records first (the model by its probability, a lookup "
        "table by the share of its key's training records with that track): the largest share "
        "of records answerable with that accuracy on the answered ones.",
        "",
        markdown_table(header, rows),
        "",
    ]
    strongest = strongest_baseline(ev.baselines)
    if strongest and strongest[0] in ev.answerable:
        model, lookup = ev.answerable["model"][0.8], ev.answerable[strongest[0]][0.8]
        lines += [f"At 80% precision the model answers {pct(model)} of records, the strongest lookup "
                  f"table {pct(lookup)}.", ""]  # fmt: skip
    return lines


def evaluation_figures(ev: Evaluation | None) -> dict[str, Any] | None:
    """An evaluation's headline figures as plain JSON (for registries and servers)."""
    if ev is None:
        return None
    m = ev.metrics
    return {
        "records": int(len(ev.probabilities)),
        "top1_accuracy": float(m["top1_accuracy"]), "top3_accuracy": float(m["top3_accuracy"]),
        "expected_calibration_error": float(m["expected_calibration_error"]),
        "coverage_at_precision": {f"{p:.2f}": float(v) for p, v in ev.answerable.get("model", {}).items()},
        "lookup_tables": {k: float(v) for k, v in ev.baselines.items()},
        "strongest_table": (strongest_baseline(ev.baselines) or [None])[0],
        "best_possible": float(ev.best_possible["accuracy"]) if ev.best_possible else None,
    }  # fmt: skip


def member_weights(probabilities: list[np.ndarray], labels: np.ndarray) -> list[float]:
    """Weights (summing to one) for the members' probabilities that minimise the log-loss of
    their weighted mean on labelled records (exponentiated gradient on the simplex; equal
    weights when no record has a known track): a member weaker on these records gets less say."""
    rows = np.flatnonzero(labels >= 0)
    weights = np.full(len(probabilities), 1.0 / len(probabilities))
    if len(rows) == 0 or len(probabilities) == 1:
        return weights.tolist()
    true = np.stack([p[rows, labels[rows]] for p in probabilities], axis=1).astype(np.float64)
    for _ in range(500):
        gradient = -(true / np.maximum(true @ weights, 1e-12)[:, None]).mean(axis=0)
        weights = weights * np.exp(-2.0 * (gradient - gradient.min()))
        weights /= weights.sum()
    return [round(float(w), 4) for w in weights]


def majority_vote(member_probs: list[np.ndarray]) -> np.ndarray:
    """Class chosen by most members; ties go to the higher mean probability."""
    stacked = np.stack(member_probs)  # members x records x classes
    votes = np.eye(stacked.shape[2])[stacked.argmax(axis=2)].sum(axis=0)
    return (votes + 1e-3 * stacked.mean(axis=0)).argmax(axis=1)


def member_agreement(member_probs: list[np.ndarray]) -> dict[str, float]:
    picks = np.stack([p.argmax(axis=1) for p in member_probs])
    all_agree = float((picks == picks[0]).all(axis=0).mean())
    pairs = [float((a == b).mean()) for a, b in itertools.combinations(picks, 2)]
    return {"all_agree": all_agree, "mean_pairwise": float(np.mean(pairs)) if pairs else 1.0}


def student_t_quantile(p: float, df: int) -> float:
    """Quantile of Student's t distribution (bisection on a numerically integrated CDF)."""
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    power = (df + 1) / 2

    def cdf(t: float) -> float:  # P(T <= t) for t >= 0, Simpson's rule on 2000 steps from 0 to t
        h = t / 2000
        density = [math.exp(log_norm - power * math.log1p((i * h) ** 2 / df)) for i in range(2001)]
        area = density[0] + density[-1] + 4 * sum(density[1:-1:2]) + 2 * sum(density[2:-1:2])
        return 0.5 + area * h / 3

    lo, hi = 0.0, 1000.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def mean_confidence_interval(values: list[float], confidence: float = 0.95) -> dict[str, float]:
    """Mean, sample standard deviation and the t-distribution interval of the mean."""
    x = np.asarray(values, dtype=float)
    mean = float(x.mean())
    if len(x) < 2:
        return {"mean": mean, "std": float("nan"), "low": float("nan"), "high": float("nan")}
    std = float(x.std(ddof=1))
    half = student_t_quantile(0.5 + confidence / 2, len(x) - 1) * std / math.sqrt(len(x))
    return {"mean": mean, "std": std, "low": mean - half, "high": mean + half}


def interval(ci: dict[str, float]) -> str:
    return f"{ci['mean']:.4f} (std {ci['std']:.4f}; 95% CI {ci['low']:.4f} to {ci['high']:.4f})"


def window_figures(
    ev: Evaluation, columns: dict[str, np.ndarray], idx: np.ndarray
) -> dict[str, Any]:
    """One window's (or one model's) figures, flat, as backtest_results.json holds them."""
    m = ev.metrics
    correct = m["predicted_tracks"] == columns["track_number"][idx]
    confidence = ev.probabilities.max(axis=1) if len(idx) else np.zeros(0)
    return {
        "records": int(len(idx)), "model_top1": float(m["top1_accuracy"]),
        "model_ece": float(m["expected_calibration_error"]),
        "model_coverage_80": coverage_at_precision(confidence, correct, 0.8),
        **{name: float(v) for name, v in ev.baselines.items()},
        "best_possible": float(ev.best_possible["accuracy"]) if ev.best_possible else None,
        "stations": {s: v["accuracy"] for s, v in m["per_station"].items()},
    }  # fmt: skip


# --- Report sections of the training modes. ---
def closed_track_lines(vocab: Any) -> list[str]:
    """One report line per station with tracks the model reads as closed."""
    return [
        f"- Closed platforms (no departure where at least {CLOSED_TRACK_EXPECTED:.0f} were "
        f"expected; the model gives them no probability): {station} track(s) "
        + ", ".join(f"{t} since {boston_date(day)}" for t, day in tracks.items())
        for station, tracks in vocab.closed_tracks.items()
    ]


def boston_date(day: int) -> str:
    """A Boston day number (`boston_days`) as YYYY-MM-DD."""
    return (dt.date(1970, 1, 1) + dt.timedelta(days=int(day))).isoformat()


def refit_section(refit: dict[str, Any] | None, best_path: Path, final_path: Path) -> list[str]:
    """Which model the validation figures describe, and which one was saved."""
    best, final = best_path.name, final_path.name
    if refit is None:
        return section(
            "Saved Models",
            f"- The figures above describe `{best}` itself: it was trained on the training "
            f"records only (`--no-refit`), and `{final}` holds the final weights of the same run.",
        )
    epochs = (
        f"{refit['epochs']} epochs each ({refit['seconds']:.1f} s) from a learning rate of "
        f"{refit['learning_rate']:g} (`--refit-lr-factor`), "
        if refit["epochs"]
        else "with no epoch (`--refit-epochs 0`: the validated weights reading tables of "
        "every record), "
    )
    if refit["best_epochs"] == refit["final_epochs"]:
        epochs += "one refit serving both as they were the same weights, "
    return section(
        "Saved Models",
        "- The validation figures above describe a model trained on the training records only, "
        f"checkpointed at its best validation accuracy (epoch {refit['best_epochs']}).",
        f"- The saved models were then refit on all {refit['records']:,} records, the newest "
        f"included, with vocabularies from all of them: `{best}` continued from that checkpoint "
        f"and `{final}` from the run's final weights (epoch {refit['final_epochs']}), {epochs}"
        f"with the confidence map fitted above ({refit['calibration']}).",
        "- The refit models have no held-out records left; the figures above estimate them. "
        "`--no-refit` saves the validated models instead.",
        *closed_track_lines(refit["vocab_info"]),
    )


def evaluation_sections(tuning: Evaluation, test: Evaluation | None, data: Any) -> list[str]:
    """The headline (test window) evaluation, then the tuning figures, each titled by its records."""
    info = data.split_info
    tuning_title = ("Tuning figures: the validation records (they chose the checkpoint, early "
                    "stopping and the confidence map)")  # fmt: skip
    if test is None:
        return [evaluation_section(tuning, tuning_title + "; no test window was held out "
                                   "(`--test-days 0`), so these are the only figures")]  # fmt: skip
    period_text = " to ".join(info.get("test_period", []))
    test_title = (f"Held-out test window: the newest {info.get('test_days', 0):g} days "
                  f"({period_text}), which no training choice saw")  # fmt: skip
    return [evaluation_section(test, test_title), evaluation_section(tuning, tuning_title)]


def performance_section(history: dict[str, list[float]], best_path: Path) -> list[str]:
    epochs_run = len(history.get("loss", []))
    best_epoch = int(np.argmax(history["val_accuracy"])) + 1
    return section(
        "Final Performance Metrics (tuning figures: the validation records)",
        f"- Validation Loss: {history['val_loss'][-1]:.4f} (last epoch)",
        f"- Validation Accuracy: {history['val_accuracy'][-1]:.4f} (last epoch)",
        f"- Best Validation Accuracy: {max(history['val_accuracy']):.4f} "
        f"(epoch {best_epoch} of {epochs_run}; saved as `{best_path.name}`)",
        "- Keras' validation figures leave out validation records whose track never occurred in "
        "training; the evaluation below counts them as wrong.",
    )


def epoch_lines(history: dict[str, list[float]], opts: Any, seconds: float) -> list[str]:
    epochs_run = len(history.get("loss", []))
    return [
        f"- Epochs run: {epochs_run} of {opts.epochs}"
        + (" (early stopping)" if epochs_run < opts.epochs else ""),
        f"- Fit time: {seconds:.1f} s ({seconds / max(epochs_run, 1):.2f} s per epoch)",
    ]


def schedule_section(opts: Any, mode: str) -> list[str]:
    stopping = (
        "off" if opts.no_early_stop
        else f"on val_loss, patience {opts.early_stop_patience}, min delta "
        f"{opts.early_stop_min_delta:g}, best weights restored"
    )  # fmt: skip
    rate = (
        "constant" if opts.no_scheduler
        else f"cosine from {opts.learning_rate:g} to 1% over {opts.scheduler_tmax or opts.epochs} "
        f"epochs, times {opts.reduce_lr_factor:g} after {opts.reduce_lr_patience} epochs without a "
        "better val_loss"
    )  # fmt: skip
    title = "Train Mode Details" if mode == "train" else "Final Training Details"
    return section(title, f"- Early stopping: {stopping}", f"- Learning rate: {rate}")


def figures_section(run: Run, history: dict[str, list[float]], evaluation: Evaluation) -> list[str]:
    """Learning curves and the confusion matrix, drawn into the run directory."""
    curves = plot_learning_curves(history, run.path("learning_curves.png"))
    confusion = plot_confusion_matrix(
        evaluation.metrics["confusion"], evaluation.labels, run.path("confusion_matrix.png")
    )
    curves_lines = section("Learning Curves", f"![Learning curves]({curves.name})")
    return curves_lines + section("Confusion Matrix", f"![Confusion matrix]({confusion.name})")


def train_files_section(files: Any, serving: Path) -> list[str]:
    best, final = files.best.name, files.final.name
    return section(
        "Files",
        f"- `{best}`, `{final}`: models taking raw values, answering with track probabilities "
        "(labels in the `track_probabilities` layer); `import imt_ml`, then "
        "`keras.saving.load_model(path, compile=False)`",
        f"- `{serving.name}/`: TensorFlow SavedModel of `{best}` for any TF runtime; its `serve` "
        "signature takes the raw fields by name and returns `tracks` (most likely first) and `probabilities`",
        f"- `{files.vocab.name}`: vocabularies and baseline tables",
        "- `logs/`: TensorBoard",
    )


def train_headline(evaluation: Evaluation, held_out: bool = True) -> str:
    m = evaluation.metrics
    where = "held-out test window" if held_out else "validation (tuning) records"
    headline = f"{where}: top-1 {pct(m['top1_accuracy'])}, top-3 {pct(m['top3_accuracy'])}"
    strongest = strongest_baseline(evaluation.baselines)
    if strongest:
        headline += f"; strongest lookup table ({BASELINE_NAMES[strongest[0]]}) {pct(strongest[1])}"
    if evaluation.best_possible:
        headline += f"; best possible {pct(evaluation.best_possible['accuracy'])}"
    return headline


def ensemble_members_section(members: list[Any], weights: list[float]) -> list[str]:
    header = ["Member", "Architecture", "Parameters", "Epochs", "Fit s", "Validation top-1",
              "Weight"]  # fmt: skip
    rows = [[*m.row, f"{w:.3f}"] for m, w in zip(members, weights, strict=True)]
    return section(
        "Ensemble Members",
        markdown_table(header, rows),
        "",
        "The combined model is the weighted mean of the members' probabilities, with the weights "
        "(summing to one) that minimise its log-loss on the validation records.",
    )


def ensemble_refit_section(refits: list[dict[str, Any]], calibration: Calibration) -> list[str]:
    if not refits:
        return []
    epochs = ", ".join(f"{r['best_epochs']}/{r['final_epochs']}" for r in refits)
    return section(
        "Saved Models",
        "- The validation figures above describe the members trained on the training records "
        "only, and their average.",
        f"- Every member was then refit on all {refits[0]['records']:,} records, the newest "
        f"included, for the epoch counts its validated run chose ({epochs} for best/final), with "
        "its own confidence map; the combined model averages the refit members' best checkpoints "
        f"with the weights above and applies the combined map ({calibration.describe()}).",
    )


def ensemble_files_section(mp: str, combined_path: Path, serving: Path) -> list[str]:
    return section(
        "Files",
        f"- `{mp}_{{i}}_best.keras`, `{mp}_{{i}}_final.keras`: each member",
        f"- `{combined_path.name}`: the average of the members' best checkpoints, raw values in, "
        "track probabilities out (`evaluate`, `predict` and `serve` accept it)",
        f"- `{serving.name}/`: TensorFlow SavedModel of the combined model; its `serve` signature takes the "
        "raw fields by name and returns `tracks` (most likely first) and `probabilities`",
        f"- `{mp}_vocab.json`: vocabularies and baseline tables",
        "- Every `.keras` file loads with `keras.saving.load_model(path, compile=False)` after `import imt_ml`",
    )


def fold_indices(timestamps: np.ndarray, k: int, shuffle: bool, seed: int) -> list[np.ndarray]:
    """Validation indices of each fold: contiguous periods of time (records with the same
    scheduled time stay together), or with `shuffle` a seeded shuffle."""
    n = len(timestamps)
    if k > n:
        raise UserError(f"--k-folds {k} is more than the {n} records in the export")
    if shuffle:
        order = np.random.default_rng(seed).permutation(n)
        return [np.sort(part) for part in np.array_split(order, k)]
    order = np.argsort(timestamps, kind="stable")
    ordered = timestamps[order]
    bounds = [round(i * n / k) for i in range(k + 1)]
    for j in range(1, k):  # never cut between two records of the same time
        while 0 < bounds[j] < n and ordered[bounds[j]] == ordered[bounds[j] - 1]:
            bounds[j] += 1
        bounds[j] = max(bounds[j], bounds[j - 1])
    folds = [np.sort(order[bounds[j] : bounds[j + 1]]) for j in range(k)]
    empty = [j + 1 for j, f in enumerate(folds) if len(f) == 0]
    if empty:
        raise UserError(
            f"fold(s) {', '.join(map(str, empty))} would have no validation records: "
            "too many records share a scheduled time for this many contiguous folds "
            "(use fewer --k-folds or --shuffle-folds)"
        )
    return folds


def validation_period(timestamps: np.ndarray) -> str:
    return " to ".join(iso_utc(t)[:10] for t in (timestamps.min(), timestamps.max()))


def cv_performance_section(summary: dict[str, Any]) -> list[str]:
    test = []
    if "test_accuracy" in summary:
        test = [
            f"Held-out test window ({' to '.join(summary['test_period'])}), in no fold, which no "
            "training choice saw: each fold's model scored there, beside the strongest lookup "
            "table of the same fold's training records.",
            "",
            f"- Mean test accuracy: {interval(summary['test_accuracy'])}",
            f"- Mean strongest lookup table: {interval(summary['test_baseline_accuracy'])}",
            f"- Model minus lookup table: {interval(summary['test_difference'])}",
            "",
        ]
    return section(
        "Final Performance Metrics",
        *test,
        "Tuning figures: each fold's validation records (they chose its early stopping and "
        "calibration):",
        "",
        f"- Mean validation accuracy: {interval(summary['accuracy'])}",
        "- Mean accuracy of each fold's strongest lookup table (named per fold below): "
        f"{interval(summary['baseline_accuracy'])}",
        f"- Model minus baseline: {interval(summary['difference'])}",
        "",
        "What the intervals are: Student's t with k - 1 degrees of freedom over the fold "
        "figures, as if the folds were independent samples. They are not: every two folds "
        "share most of their training records, so the fold figures are positively correlated "
        "and the true uncertainty is larger than the interval says (Bengio and Grandvalet "
        "2004: no unbiased estimator of k-fold cross-validation's variance exists). The "
        "interval describes how much the figure moves between periods of this export; it "
        "does not account for that correlation, for other exports or for the periods after "
        "the newest record.",
    )


def cv_folds_section(rows: list[list[Any]]) -> list[str]:
    header = ["Fold", "Validation period", "Records", "Accuracy", "Loss", "Baseline",
              "Model - baseline", "Strongest lookup table"]  # fmt: skip
    return section(
        "Cross-Validation Folds",
        markdown_table(header, rows),
        "",
        "Accuracy counts validation records whose track the fold's training data never saw as "
        "wrong; the loss (the calibrated model's log loss) gives them a probability of 1e-7.",
    )


def cv_deployable_section(mp: str, fitted: Any) -> list[str]:
    refit = fitted.refit
    how = (f"then refit on all {refit['records']:,} records for {refit['epochs']} epochs"
           if refit else "not refit (`--no-refit`)")  # fmt: skip
    return section(
        "Deployable Model",
        f"- `{mp}_best.keras` and `{mp}_final.keras` come from `train`'s recipe on the same export "
        f"with the options above: validated on the newest records ({fitted.epochs} epochs), "
        f"calibrated there ({fitted.calibration.describe()}), {how}. `train` with the same "
        "options saves the same model.",
        "- Its accuracy is not measured here: the fold figures above estimate it.",
    )


def cv_files_section(mp: str) -> list[str]:
    return section(
        "Files",
        f"- `{mp}_best.keras`, `{mp}_final.keras`, `{mp}_vocab.json`, "
        f"`{mp}_serving/`: the deployable model, its vocabularies and its TensorFlow SavedModel",
        f"- `{mp}_fold_{{j}}.keras`: each fold's model (`import imt_ml`, then "
        "`keras.saving.load_model(path, compile=False)`), and `_fold_{j}_serving/`, its TensorFlow SavedModel",
        "- `cv_results.json`: every number above; `fold_assignment.npy`: each record's fold, in export order",
    )


TOP_TRIALS_HEADER = ["Rank", "Layers", "Units", "Decay", "Dropout", "L2", "LR", "Batch",
                     "Emb route/train", "Half-life d", "Epochs", "Best val acc"]  # fmt: skip


def top_trial_rows(trials: list[dict[str, Any]]) -> list[list[Any]]:
    rows = []
    for rank, t in enumerate(trials, 1):
        c = t["config"]
        rows.append([rank, c["hidden_layers"], c["first_units"], c["width_decay"], f"{c['dropout']:.2f}",
                     f"{c['l2']:.1e}", f"{c['learning_rate']:.1e}", c["batch_size"],
                     f"{c['route_embedding']}/{c['train_embedding']}",
                     f"{c.get('recency_half_life', RECENCY_HALF_LIFE_DAYS):g}", t["epochs"],
                     f"{t['best_val_accuracy']:.4f}"])  # fmt: skip
    return rows
