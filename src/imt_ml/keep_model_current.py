"""Keep the served model current: backtest `train`'s recipe (`tr.fit_track_model`) over time,
retrain a challenger against the registry's current model (the champion), promote, and roll
back; usage and examples in docs/keeping-current.md."""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
import json
import math
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np

if __package__ in (None, ""):  # run by path: `uv run src/imt_ml/keep_model_current.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imt_ml import evaluation as ev
from imt_ml import tfrecord_reader as tr
from imt_ml import utils
from imt_ml.utils import ModelRegistry, Run, UserError, markdown_table, option_field, pct, section


# --- Backtest: rolling origins. ---
@dataclass
class BacktestOptions:
    """Where the origins are and how each window's model is made."""

    # fmt: off
    start: str = option_field(help="First origin (YYYY-MM-DD, Boston midnight).", metavar="YYYY-MM-DD")
    every: float = option_field(7.0, "Days between origins.", click.FloatRange(min=0.5))
    horizon: float = option_field(7.0, "Days each origin's model is scored on.", click.FloatRange(min=0.5))
    warm_start: bool = option_field(False, "Start each origin's model from the previous one's weights.")
    keep_models: bool = option_field(False, "Keep every origin's model files (default: only the last).")
    # fmt: on


def backtest_origins(timestamps: np.ndarray, start: str, every: float) -> list[float]:
    """Unix times of the origins: Boston midnight of `start`, then every `every` days."""
    try:
        first = utils.parse_instant(dt.date.fromisoformat(start).isoformat())  # Boston midnight
    except ValueError:
        raise UserError(f"--start {start!r} is not a date (YYYY-MM-DD)") from None
    if len(timestamps) == 0 or first <= timestamps.min():
        raise UserError(f"--start {start} leaves no record before the first origin to train on")
    if first > timestamps.max():
        raise UserError(f"--start {start} is after the export's newest record")
    origins = itertools.count(first, every * utils.SECONDS_PER_DAY)  # float steps added one by one
    return list(itertools.takewhile(lambda origin: origin <= timestamps.max(), origins))


def run_backtest(data_dir: Path | str, opts: tr.TrainOptions, bt: BacktestOptions) -> Path:
    """`backtest`: train and score at each origin; writes the run's report, plot and results."""
    export = tr.load_export(data_dir)
    origins = backtest_origins(export.columns["scheduled_timestamp"], bt.start, bt.every)
    run = Run.start("backtest")
    windows: list[dict[str, Any]] = []
    pooled: list[list[np.ndarray]] = []  # [correct, top probability] per window
    answers: list[dict[str, np.ndarray]] = []  # each window's records, for backtest_records.npz
    warm: tuple[Any, tr.Vocabulary] | None = None
    previous_dir: Path | None = None
    bar = utils.progress(origins, desc="backtest origins", unit="origin")
    for origin in bar:
        scored = backtest_origin(run, export, opts, bt, origin, warm)
        if scored is None:
            continue
        figures, fitted, model, records, *outcome = scored
        windows.append(figures)
        pooled.append(outcome)
        answers.append(records)
        bar.set_postfix(top1=f"{figures['model_top1']:.3f}", secs=f"{fitted.seconds:.0f}")
        warm = (model, fitted.vocab) if bt.warm_start else None
        if previous_dir is not None and not bt.keep_models:
            shutil.rmtree(previous_dir, ignore_errors=True)
        previous_dir = fitted.files.best.parent
    if not windows:
        raise UserError("no origin had records both before it and in its horizon")
    total = backtest_total(windows, pooled)
    results = {"options": {**dataclasses.asdict(bt), "recency_half_life": opts.recency_half_life,
                           "epochs": opts.epochs, "no_refit": opts.no_refit},
               "export": str(export.export_dir), "windows": windows, "total": total}  # fmt: skip
    utils.write_json(run.path(utils.BACKTEST_RESULTS_FILE), results)
    np.savez_compressed(run.path(utils.BACKTEST_RECORDS_FILE),
                        **{k: np.concatenate([a[k] for a in answers]) for k in answers[0]})  # fmt: skip
    plot = plot_backtest(windows, run.path(utils.BACKTEST_PLOT_FILE))
    utils.write_report(run, "Backtest Report", backtest_sections(run, export, bt, windows, total, plot),
                       f"model top-1 {pct(total['model_top1'])} over {total['records']:,} records in "
                       f"{len(windows)} windows (strongest table {total['strongest_table']} "
                       f"{pct(total[total['strongest_table']])})", name=utils.BACKTEST_REPORT_FILE)  # fmt: skip
    return run.run_dir


def backtest_origin(
    run: Run, export: tr.Export, opts: tr.TrainOptions, bt: BacktestOptions, origin: float,
    warm: tuple[Any, tr.Vocabulary] | None,
) -> tuple[dict[str, Any], tr.FittedModel, Any, dict, np.ndarray, np.ndarray] | None:  # fmt: skip
    """One origin: the recipe on the records before it (validated on their newest `horizon`
    days, the horizon it is then used for), scored on the `horizon` days after; None when
    either side has no records."""
    columns = export.columns
    ts = columns["scheduled_timestamp"]
    end = origin + bt.horizon * utils.SECONDS_PER_DAY
    before = np.flatnonzero(ts < origin)
    window = np.flatnonzero((ts >= origin) & (ts < end))
    if len(window) == 0 or len(before) < 10:
        return None
    past = tr.Export(export.export_dir, export.metadata, tr.take_records(columns, before))
    origin_opts = dataclasses.replace(opts, test_days=0, validation_days=bt.horizon)
    origin_dir = run.path(f"origin_{dt.datetime.fromtimestamp(origin, dt.UTC):%Y-%m-%d}")
    origin_dir.mkdir()
    files = tr.ModelFiles.under(origin_dir, opts.model_path)
    data = tr.prepare_training_data(past, origin_opts)
    fitted = tr.fit_track_model(data, origin_opts, files, warm=warm)
    model = fitted.load()
    tables = ev.baseline_tables(columns, before, opts.recency_half_life)
    truth = ev.load_sample_truth(export.export_dir)
    scores = tr.evaluate_model(model, columns, window, tables, truth)
    truth_tracks = columns["track_number"][window]
    correct = scores.metrics["predicted_tracks"] == truth_tracks
    strongest = ev.strongest_baseline(scores.baselines)
    margin: tuple[float | None, float | None] = (None, None)
    table_correct = np.zeros(len(window), dtype=bool)
    if strongest:
        table = ev.baseline_predictions(tables, columns, window)[strongest[0]]
        table_correct = table == truth_tracks
        if len(window) >= 2:
            margin = ev.paired_margin(correct, table_correct)
    confidence = scores.probabilities.max(axis=1)
    records = {"window": np.full(len(window), origin), "correct": correct, "confidence": confidence,
               "strongest_table_correct": table_correct,
               "scheduled_timestamp": ts[window],
               **{k: columns[k][window].astype(str) for k in ("station_id", "trip_id")}}  # fmt: skip
    figures = {"start": float(origin), "end": float(end), **ev.window_figures(scores, columns, window),
               "strongest_table": strongest[0] if strongest else None,
               "margin": margin[0], "margin_interval": margin[1],
               "train_records": int(len(before)), "train_seconds": round(fitted.seconds, 1),
               "epochs": fitted.epochs,
               "closed_tracks": {station: sorted(tracks, key=ev.track_sort_key)
                                 for station, tracks in fitted.vocab.closed_tracks.items()}}  # fmt: skip
    return figures, fitted, model, records, correct, confidence


def backtest_total(windows: list[dict[str, Any]], pooled: list[list[np.ndarray]]) -> dict[str, Any]:
    """The figures of the whole period: what a deployment with this cadence would have had."""
    n = np.array([w["records"] for w in windows], dtype=float)
    correct, confidence = (np.concatenate(arrays) for arrays in zip(*pooled, strict=True))
    total: dict[str, Any] = {
        "records": int(n.sum()), "windows": len(windows), "model_top1": float(correct.mean()),
        "model_ece": ev.expected_calibration_error(confidence, correct),
        "model_coverage_80": ev.coverage_at_precision(confidence, correct, 0.8),
    }  # fmt: skip
    tables = [name for name in ev.BASELINE_NAMES if name in windows[0]]
    for name in tables:
        total[name] = float(np.dot(n, [w[name] for w in windows]) / n.sum())
    total["strongest_table"] = max(tables, key=lambda t: total[t]) if tables else None
    if all(w["best_possible"] is not None for w in windows):
        total["best_possible"] = float(np.dot(n, [w["best_possible"] for w in windows]) / n.sum())
    total["stations"] = {}
    for station in sorted({s for w in windows for s in w["stations"]}):
        rows = [(w["stations"][station], w["records"]) for w in windows if station in w["stations"]]
        total["stations"][station] = float(sum(a * r for a, r in rows) / sum(r for _, r in rows))
    return total


def plot_backtest(windows: list[dict[str, Any]], path: Path) -> Path:
    starts = [dt.datetime.fromtimestamp(w["start"], dt.UTC) for w in windows]
    with utils.figure(path, figsize=(10, 4.5)) as (_, ax):
        ax.plot(starts, [w["model_top1"] for w in windows], "o-", label="model", linewidth=2)
        strongest = [max(w[t] for t in ev.BASELINE_NAMES if t in w) for w in windows]
        ax.plot(starts, strongest, "s--", label="strongest lookup table")
        if all(w["best_possible"] is not None for w in windows):
            ax.plot(starts, [w["best_possible"] for w in windows], ":", label="best possible")
        ax.set_ylabel("top-1 accuracy in the window")
        ax.set_xlabel("origin")
        ax.grid(alpha=0.3)
        ax.legend()
    return path


def closed_windows_lines(windows: list[dict[str, Any]]) -> list[str]:
    """Which origins' models read platforms as closed (`closed_tracks`), if any did."""
    lines = [
        f"- {dt.datetime.fromtimestamp(w['start'], dt.UTC):%Y-%m-%d}: "
        + "; ".join(f"{s} {', '.join(t)}" for s, t in w["closed_tracks"].items())
        for w in windows if w.get("closed_tracks")
    ]  # fmt: skip
    return ["Platforms the origin's model read as closed (no departure where at least "
            f"{ev.CLOSED_TRACK_EXPECTED:.0f} were expected; no probability from their "
            "closing day):", "", *lines, ""] if lines else []  # fmt: skip


def backtest_sections(run: Run, export: tr.Export, bt: BacktestOptions, windows: list[dict],
                      total: dict[str, Any], plot: Path) -> list[list[str]]:  # fmt: skip
    tables = [t for t in ev.BASELINE_NAMES if t in total]
    header = ["Origin", "Records", "Model", "ECE", "@80%", "Margin", *tables, "Best possible",
              "Train s"]  # fmt: skip

    def row(label: str, w: dict[str, Any]) -> list[Any]:
        margin = (f"{100 * w['margin']:+.2f} ±{100 * w['margin_interval']:.2f}"
                  if w.get("margin") is not None else "")  # fmt: skip
        return [label, f"{w['records']:,}", pct(w["model_top1"]), f"{w['model_ece']:.3f}",
                pct(w["model_coverage_80"]), margin, *(pct(w[t]) for t in tables),
                pct(w["best_possible"]) if w.get("best_possible") is not None else "n/a",
                w.get("train_seconds", "")]  # fmt: skip

    rows = [row(f"{dt.datetime.fromtimestamp(w['start'], dt.UTC):%Y-%m-%d}", w) for w in windows]
    rows.append(row("**total**", total))
    beaten = sum(w["model_top1"] > max(w[t] for t in tables) for w in windows)
    stations = [[s, pct(v)] for s, v in total["stations"].items()]
    how = "warm-started from the previous origin" if bt.warm_start else "each trained from scratch"
    origins = f"- Origins: from {bt.start} every {bt.every:g} days; each scored on the next "
    origins += f"{bt.horizon:g} days; {how}"
    return [
        utils.overview_section(run, export.export_dir, origins),
        section(
            "Windows",
            "Each origin's model was trained with `train`'s recipe on the records before the origin "
            f"only (its newest {bt.horizon:g} days validating: the horizon it is then scored on), and "
            "every lookup table was built from the same records. The totals are what a "
            "deployment retraining on this cadence would have scored.",
            "",
            markdown_table(header, rows),
            "",
            f"The model beat every lookup table in {beaten} of {len(windows)} windows. Margin: "
            "the model's top-1 minus the window's strongest table's, in points, with the 95% "
            "interval of that difference over the same records; where it holds 0 the two "
            "cannot be told apart on that window.",
            "",
            *closed_windows_lines(windows),
            f"![Top-1 over time]({plot.name})",
        ),
        section("Per station (whole period)", markdown_table(["Station", "Model top-1"], stations)),
        section(
            "Files",
            "- `backtest_results.json`: every window's figures and the totals",
            "- `backtest.png`: top-1 per window",
            "- `origin_<date>/`: the last origin's model"
            + (" (every origin's: --keep-models)" if bt.keep_models else ""),
        ),
    ]


# --- Retrain: champion and challenger; promote and roll back. ---
@dataclass
class RetrainOptions:
    """The champion/challenger rule and the registry."""

    # fmt: off
    registry: Path = option_field(help="The model registry (created on the first run).",
                                  type=click.Path(file_okay=False, path_type=Path))
    holdout_days: float = option_field(7.0, "The newest days both models are scored on.", click.FloatRange(min=0.5))
    tolerance: float = option_field(0.2, "Top-1 points the challenger may fall short of the champion.",
                                    click.FloatRange(min=0))
    max_ece: float = option_field(0.03, "The challenger's ECE may be at most max(this, the champion's).",
                                  click.FloatRange(min=0))
    warm_start: bool = option_field(False, "Start the challenger from the champion's weights.")
    dry_run: bool = option_field(False, "Decide and report, but install nothing.")
    keep: int = option_field(5, "Versions kept in the registry (the current one always).", click.IntRange(min=1))
    # fmt: on


def decide_promotion(champion: dict[str, Any] | None, challenger: dict[str, Any],
                     opts: RetrainOptions) -> tuple[bool, str]:  # fmt: skip
    """(promote?, why) by the champion/challenger rule."""
    if champion is None:
        return True, "no current version: the first model is installed"
    floor = champion["model_top1"] - opts.tolerance / 100
    ece_cap = max(opts.max_ece, champion["model_ece"])
    reasons = []
    if challenger["model_top1"] < floor:
        reasons.append(f"top-1 {pct(challenger['model_top1'])} is below the champion's "
                       f"{pct(champion['model_top1'])} minus {opts.tolerance:g} points")  # fmt: skip
    if challenger["model_ece"] > ece_cap:  # (comparisons on the same records)
        reasons.append(f"ECE {challenger['model_ece']:.3f} is above {ece_cap:.3f} "
                       f"(the larger of {opts.max_ece:g} and the champion's {champion['model_ece']:.3f})")  # fmt: skip
    if reasons:
        return False, "the challenger's " + "; and its ".join(reasons)
    return True, (f"the challenger's top-1 {pct(challenger['model_top1'])} (champion "
                  f"{pct(champion['model_top1'])}, tolerance {opts.tolerance:g} points) and ECE "
                  f"{challenger['model_ece']:.3f} (cap {ece_cap:.3f}) pass")  # fmt: skip


def run_retrain(data_dir: Path | str, opts: tr.TrainOptions, rt: RetrainOptions) -> Path:
    """`retrain`: the champion/challenger run (docs/keeping-current.md); returns its directory."""
    registry = ModelRegistry(rt.registry)
    export = tr.load_export(data_dir)
    data = tr.prepare_training_data(export, opts, test_days=rt.holdout_days)
    run = Run.start("retrain")
    champion = Champion.of(registry, export, data)
    if champion is not None and len(champion.holdout) == 0:
        why = (f"no record is newer than what version {champion.version} was trained on "
               f"(until {ev.period(np.array([champion.seen_until]))[0]}): nothing to judge a "
               "challenger on")  # fmt: skip
        utils.log("Keep: " + why)
        utils.write_report(run, "Retrain Report", [utils.overview_section(run, export.export_dir,
                           f"- Registry: {rt.registry}"), section("Decision", f"- Keep the champion: {why}.")],
                           f"kept the champion: {why}", name=utils.RETRAIN_REPORT_FILE)  # fmt: skip
        return run.run_dir
    holdout = champion.holdout if champion is not None else data.test_idx
    figures = champion.figures if champion else None
    verdict: dict[str, Any] = {}

    def judge(fitted: tr.FittedModel) -> bool:
        """Score the challenger as it would have answered from the first holdout day; decide."""
        seen = tr.take_records(export.columns, np.concatenate([data.train_idx, data.val_idx]))
        before = tr.Export(export.export_dir, export.metadata, seen)
        start = (fitted.validated, data.vocab_info)
        deployed, _, _ = tr.fit_on_every_record(before, opts, fitted.config, 0, warm=start)
        cal = fitted.calibration
        deployed = tr.with_calibration(deployed, cal.confidence_map, cal.new_trip_map)
        tables, truth = data_tables(data), ev.load_sample_truth(export.export_dir)
        verdict["evaluation"] = tr.evaluate_model(deployed, export.columns, holdout, tables, truth)
        verdict["challenger"] = ev.window_figures(verdict["evaluation"], export.columns, holdout)
        verdict["promote"], verdict["why"] = decide_promotion(figures, verdict["challenger"], rt)
        utils.log(("Promote: " if verdict["promote"] else "Keep: ") + verdict["why"])
        return verdict["promote"] and not rt.dry_run

    files = tr.ModelFiles.under(run.run_dir, opts.model_path)
    warm = champion.warm if champion is not None and rt.warm_start else None
    fitted = tr.fit_track_model(data, opts, files, warm=warm, before_refit=judge)
    installed = None
    if verdict["promote"] and not rt.dry_run:  # refit on every record unless --no-refit
        summary = {**tr.model_summary(data, None, verdict["evaluation"], fitted),
                   "champion": figures, "decision": verdict["why"]}  # fmt: skip
        installed = registry.install(files.best, files.vocab, summary)
        pruned = registry.prune(rt.keep)
        utils.log(f"Installed version {installed} in {registry.root} (now current)"
                  + (f"; removed versions {', '.join(map(str, pruned))}" if pruned else ""))  # fmt: skip
    promote, why = verdict["promote"], verdict["why"]
    report = retrain_sections(run, export, rt, champion, verdict, installed)
    utils.write_report(run, "Retrain Report", report,
                       ("promoted" if promote and installed else "dry run: would promote" if promote
                        else "kept the champion") + f": {why}", name=utils.RETRAIN_REPORT_FILE)  # fmt: skip
    return run.run_dir


def data_tables(data: tr.PreparedData) -> dict[str, Any]:
    """The lookup tables of the records before the test window (training and validation)."""
    return ev.baseline_tables(data.columns, np.concatenate([data.train_idx, data.val_idx]),
                              data.vocab_info.recency_half_life)  # fmt: skip


@dataclass
class Champion:
    """The registry's current version, scored on the holdout days it never saw."""

    version: int
    seen_until: float
    holdout: np.ndarray
    figures: dict[str, Any]
    warm: tuple[Any, tr.Vocabulary] | None

    @classmethod
    def of(
        cls, registry: ModelRegistry, export: tr.Export, data: tr.PreparedData
    ) -> Champion | None:
        """None with an empty registry. A champion trained yesterday has seen most of the
        holdout days: only the records after its newest one are fair to both."""
        version = registry.current_version()
        if version is None:
            return None
        ts = export.columns["scheduled_timestamp"]
        recorded = registry.metadata(version).get("trained_until")
        seen_until = float(recorded) if recorded is not None else -math.inf
        holdout = data.test_idx[ts[data.test_idx] > seen_until]
        if len(holdout) == 0:
            return cls(version, seen_until, holdout, {}, None)
        model = tr.load_saved_model(registry.model_file(version))
        vocab_path = registry.version_dir(version) / utils.REGISTRY_VOCAB_FILE
        vocab = (tr.Vocabulary.from_json(json.loads(vocab_path.read_text()))
                 if vocab_path.is_file() else None)  # fmt: skip
        tables, truth = data_tables(data), ev.load_sample_truth(export.export_dir)
        scores = tr.evaluate_model(model, export.columns, holdout, tables, truth)
        return cls(version, seen_until, holdout, ev.window_figures(scores, export.columns, holdout),
                   (model, vocab) if vocab is not None else None)  # fmt: skip


def retrain_sections(run: Run, export: tr.Export, rt: RetrainOptions,
                     champion: Champion | None, verdict: dict[str, Any],
                     installed: int | None) -> list[list[str]]:  # fmt: skip
    challenger, promote, why = verdict["challenger"], verdict["promote"], verdict["why"]
    tables = [t for t in ev.BASELINE_NAMES if t in challenger]

    def row(label: str, w: dict[str, Any]) -> list[str]:
        best = pct(w["best_possible"]) if w["best_possible"] is not None else "n/a"
        ece = f"{w['model_ece']:.3f}"
        return [label, pct(w["model_top1"]), ece, pct(w["model_coverage_80"]), best]

    rows = [row(f"champion (version {champion.version})", champion.figures)] if champion else []
    rows.append(row("challenger", challenger))
    header = ["Model", "Top-1", "ECE", "@80% precision", "Best possible"]
    decision = ("installed as version " + str(installed) if installed else
                "not installed (--dry-run)" if promote else "not installed")  # fmt: skip
    return [
        utils.overview_section(run, export.export_dir, f"- Registry: {rt.registry}"),
        section(
            "Decision",
            f"- {'Promote' if promote else 'Keep the champion'}: {why}.",
            f"- The challenger was {decision}.",
        ),
        section(
            "Both models on the newest days",
            f"The newest {rt.holdout_days:g} days ({challenger['records']:,} records), which the "
            "challenger never saw; lookup tables from the records before them.",
            "",
            markdown_table(header, rows),
            "",
            markdown_table(["Lookup table", "Top-1"], [[t, pct(challenger[t])] for t in tables]),
        ),
    ]


# --- Command line. ---
@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.argument("data_dir", type=click.Path(path_type=Path))
@click.pass_context
def cli(ctx: click.Context, data_dir: Path) -> None:
    """Backtest, retrain, promote and roll back models of the export in DATA_DIR (an
    export directory or an export root; `-` for promote and rollback, which read none)."""
    ctx.obj = {"data_dir": data_dir}


@cli.command(epilog=tr.TRAINING_EPILOG)
@utils.dataclass_options(BacktestOptions)
@tr.training_options
@click.pass_context
def backtest(ctx: click.Context, **options: Any) -> None:
    """Rolling-origin evaluation: at each origin train on everything before it, score the
    next --horizon days; writes output/backtest_<time>/ with backtest_results.json."""
    bt = utils.from_options(BacktestOptions, options)
    train = tr.TrainOptions(**{k: v for k, v in options.items() if k not in vars(bt)})
    click.echo(str(run_backtest(ctx.obj["data_dir"], train, bt)))


@cli.command(epilog=tr.TRAINING_EPILOG)
@utils.dataclass_options(RetrainOptions)
@tr.training_options
@click.pass_context
def retrain(ctx: click.Context, **options: Any) -> None:
    """Champion and challenger: train on all but the newest --holdout-days, score both there,
    promote the challenger into --registry only if it is as good; exit 0 either way."""
    rt = utils.from_options(RetrainOptions, options)
    train = tr.TrainOptions(**{k: v for k, v in options.items() if k not in vars(rt)})
    click.echo(str(run_retrain(ctx.obj["data_dir"], train, rt)))


@cli.command()
@click.option("--registry", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="The model registry.")  # fmt: skip
def rollback(registry: Path) -> None:
    """Make the registry's previous version current again (DATA_DIR is not read)."""
    models = ModelRegistry(registry)
    current = models.current_version()
    earlier = [v for v in models.versions() if current is None or v < current]
    if not earlier:
        raise UserError(f"{registry} has no version before {current} to roll back to")
    models.make_current(earlier[-1])
    utils.log(f"{registry}: version {earlier[-1]} is current again (was {current})")
    click.echo(str(models.version_dir(earlier[-1])))


@cli.command()
@click.option("--registry", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="The model registry directory (created if missing).")  # fmt: skip
@tr.model_option(
    "The saved .keras model to install (its _vocab.json and _summary.json go with it)."
)
def promote(registry: Path, model_file: Path) -> None:
    """Install a model as the registry's next version and make it current; a running
    `serve-predictions --model REGISTRY` swaps to it within seconds (DATA_DIR is not read)."""
    tr.load_saved_model(model_file)  # a broken file never becomes current
    vocab = tr.vocab_file_for(model_file)
    summary = vocab.with_name(vocab.name.replace("_vocab.json", "_summary.json"))
    metadata: dict[str, Any] = json.loads(summary.read_text()) if summary.is_file() else {}
    if not metadata and vocab.is_file():
        metadata = {"periods": json.loads(vocab.read_text()).get("split", {})}
    version = ModelRegistry(registry).install(model_file, vocab, metadata)
    utils.log(f"Installed {model_file} as version {version} of {registry} (now current)")
    click.echo(str(ModelRegistry(registry).version_dir(version)))


if __name__ == "__main__":
    cli()
