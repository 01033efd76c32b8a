"""Use several machines for one search: synchronous multi-worker trials, or parallel trials.

sync-tune: a Keras Tuner Hyperband search in which every trial trains on all
workers at once with tf.distribute.MultiWorkerMirroredStrategy. Start one process
per worker with the same --workers list and its own --index; worker 0 is the chief
and alone writes the model, vocab, config and report:

    uv run src/imt_ml/distributed_launcher.py sync-tune \\
        --workers 192.168.1.10:2222,192.168.1.11:2222 --index 0 \\
        --data-dir /shared/data --project-name track_tuning

tuner-parallel: each instance trains whole trials on its own machine; the chief
runs Keras Tuner's oracle service and every instance (the chief included) pulls
its next trial from it, so no trial runs twice:

    uv run src/imt_ml/distributed_launcher.py tuner-parallel \\
        --tuner-directory /mnt/shared/kt_runs --tuner-id chief \\
        --oracle-address 192.168.1.10:8000 --data-dir /shared/data --project-name track_tuning
    uv run src/imt_ml/distributed_launcher.py tuner-parallel \\
        --tuner-directory /mnt/shared/kt_runs --tuner-id tuner0 \\
        --oracle-address 192.168.1.10:8000 --data-dir /shared/data --project-name track_tuning

Keras 3 with TensorFlow 2.21 cannot run model.fit under MultiWorkerMirroredStrategy
(a PerReplica value reaches the trainer's symbolic build), so sync-tune trains
with its own step: strategy.run per batch, losses and counts reduced explicitly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np

if __package__ in (None, ""):  # run by path: `uv run src/imt_ml/distributed_launcher.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imt_ml.utils import UserError, log

# ---------------------------------------------------------------------------
# Options and the search space.
# ---------------------------------------------------------------------------


@dataclass
class SearchOptions:
    """What both modes share."""

    data_dir: str
    project_name: str = "track_tuning"
    max_epochs: int = 10
    factor: int = 3
    hyperband_iterations: int = 1
    executions_per_trial: int = 1
    batch_size: int = 256
    model_path: str = "track_prediction_model"
    final_epochs: int = 0  # 0: retrain the best configuration for max_epochs
    seed: int = 42


def model_config_from_hp(hp: Any, seed: int) -> Any:
    """Declare (on first use) and read this search's hyperparameters."""
    from imt_ml.tfrecord_reader import ModelConfig

    layers = hp.Int("hidden_layers", 1, 3, default=2)
    first = hp.Choice("first_units", [64, 128, 256], default=128)
    return ModelConfig(
        hidden_units=tuple(max(16, first // (2**i)) for i in range(layers)),
        dropout=hp.Float("dropout", 0.1, 0.5, step=0.1, default=0.3),
        l2=hp.Float("l2", 1e-6, 1e-3, sampling="log", default=1e-4),
        train_embedding=hp.Choice("train_embedding", [8, 16, 24], default=16),
        station_train_embedding=hp.Choice("station_train_embedding", [16, 24, 32], default=24),
        # Batch statistics would differ between workers; sync-tune gets identical
        # weights on every worker only without them.
        batch_norm=False,
        seed=seed,
    )


def learning_rate_from_hp(hp: Any) -> float:
    return hp.Float("learning_rate", 3e-4, 3e-3, sampling="log", default=1e-3)


# ---------------------------------------------------------------------------
# Synchronous multi-worker training: TF_CONFIG, the strategy, a custom step.
# ---------------------------------------------------------------------------


def parse_workers(workers: str, index: int) -> list[str]:
    """The host:port list, checked, with `index` inside it."""
    hosts = [w.strip() for w in workers.split(",") if w.strip()]
    if not hosts:
        raise UserError("--workers needs at least one host:port")
    for host in hosts:
        name, _, port = host.rpartition(":")
        if not name or not port.isdigit():
            raise UserError(f"--workers entry {host!r} is not host:port")
    if len(set(hosts)) != len(hosts):
        raise UserError("--workers lists the same host:port twice")
    if not 0 <= index < len(hosts):
        raise UserError(
            f"--index {index} is outside the {len(hosts)} workers of --workers (0..{len(hosts) - 1})"
        )
    return hosts


def tf_config(hosts: list[str], index: int) -> str:
    return json.dumps({"cluster": {"worker": hosts}, "task": {"type": "worker", "index": index}})


READY_FD_ENV = "IMT_ML_SYNC_READY_FD"


def create_strategy(hosts: list[str], index: int) -> Any:
    """MultiWorkerMirroredStrategy with every worker joined; tells the supervising
    process (see `supervise_until_joined`) as soon as it is."""
    os.environ["TF_CONFIG"] = tf_config(hosts, index)
    import tensorflow as tf

    strategy = tf.distribute.MultiWorkerMirroredStrategy(
        communication_options=tf.distribute.experimental.CommunicationOptions(
            implementation=tf.distribute.experimental.CommunicationImplementation.RING
        )
    )
    # A first collective: it returns only when every worker has joined.
    strategy.reduce("SUM", strategy.run(lambda: tf.constant(1.0)), axis=None)
    ready_fd = os.environ.get(READY_FD_ENV)
    if ready_fd:
        os.write(int(ready_fd), b"1")
        os.close(int(ready_fd))
    return strategy


def supervise_until_joined(hosts: list[str], index: int, timeout_s: float) -> int:
    """Run this sync-tune command in a child process and wait for it to join the other
    workers. TensorFlow waits for missing workers for an hour, in C++ code that ignores
    signals; so the wait is bounded from outside: after `timeout_s` without every
    worker joined, one clear line, the child is killed, exit code 1."""
    import select
    import subprocess

    read_fd, write_fd = os.pipe()
    env = {**os.environ, READY_FD_ENV: str(write_fd)}
    args = sys.argv[1:] if "sync-tune" in sys.argv[1:] else ["sync-tune", *sys.argv[1:]]
    child = subprocess.Popen([sys.executable, "-m", "imt_ml.distributed_launcher", *args],
                             env=env, pass_fds=(write_fd,))  # fmt: skip
    os.close(write_fd)
    deadline = time.monotonic() + timeout_s
    joined = False
    while not joined and child.poll() is None and time.monotonic() < deadline:
        ready, _, _ = select.select([read_fd], [], [], 0.5)
        joined = bool(ready) and os.read(read_fd, 1) == b"1"
    os.close(read_fd)
    if not joined and child.poll() is None:
        child.kill()
        child.wait()
        others = [h for i, h in enumerate(hosts) if i != index]
        click.echo(
            f"Error: worker {index} ({hosts[index]}) could not join the other workers "
            f"({', '.join(others) or 'none'}) within {timeout_s:g} s; start every worker "
            "with the same --workers and check that they can reach each other",
            err=True,
        )
        return 1
    return child.wait()


def equal_shard(n: int, workers: int, index: int, seed: int) -> np.ndarray:
    """This worker's share of `n` training positions: all shares the same size, so
    every worker runs the same number of synchronous steps."""
    order = np.random.default_rng(seed).permutation(n)
    per_worker = n // workers
    return np.sort(order[index * per_worker : (index + 1) * per_worker])


class SyncTrainer:
    """Trains a model built under the strategy with an explicit distributed step."""

    def __init__(
        self, strategy: Any, data: Any, index: int, workers: int, batch_size: int, seed: int
    ):
        import tensorflow as tf

        from imt_ml.tfrecord_reader import class_weights, make_dataset, model_features

        self.tf = tf
        self.strategy = strategy
        self.workers = workers
        self.per_worker_batch = batch_size
        self.global_batch = batch_size * workers
        positions = equal_shard(len(data.train_idx), workers, index, seed)
        shard, labels = data.train_idx[positions], data.train_labels[positions]
        weights = class_weights(data.train_labels, data.vocab_info["num_classes"], "sqrt")
        sample_weights = (
            np.array([weights[int(y)] for y in labels], dtype=np.float32)
            if weights
            else np.ones(len(labels), np.float32)
        )
        self.steps = len(shard) // batch_size
        if self.steps == 0:
            raise UserError(
                f"{len(shard)} training records per worker are fewer than --batch-size {batch_size}"
            )
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
        features = model_features(data.columns, shard)
        ds = tf.data.Dataset.from_tensor_slices(({k: tf.constant(v) for k, v in features.items()},
                                                 tf.constant(labels), tf.constant(sample_weights)))  # fmt: skip
        self.train_ds = (
            ds.shuffle(len(labels), seed=seed)
            .batch(batch_size, drop_remainder=True)
            .repeat()
            .with_options(options)
        )
        known = data.val_known
        val_part = data.val_idx[known][index::workers]
        self.val_ds = make_dataset(
            model_features(data.columns, val_part), data.val_labels[known][index::workers], 1024
        )

    def fit(self, model: Any, learning_rate: float, epochs: int, initial_epoch: int = 0,
            callbacks: list | None = None) -> dict[str, list[float]]:  # fmt: skip
        import keras

        tf, strategy = self.tf, self.strategy
        with strategy.scope():
            optimizer = keras.optimizers.Adam(learning_rate=learning_rate)
        loss_fn = keras.losses.SparseCategoricalCrossentropy(reduction="none")
        global_batch = self.global_batch

        @tf.function
        def train_step(iterator: Any) -> Any:
            def step(features: Any, labels: Any, weights: Any) -> Any:
                with tf.GradientTape() as tape:
                    probabilities = model(features, training=True)
                    per_example = loss_fn(labels, probabilities) * weights
                    loss = tf.nn.compute_average_loss(per_example, global_batch_size=global_batch)
                    if model.losses:
                        loss += tf.nn.scale_regularization_loss(tf.add_n(model.losses))
                grads = tape.gradient(loss, model.trainable_variables)
                optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
                hits = tf.reduce_sum(
                    tf.cast(tf.equal(tf.argmax(probabilities, axis=-1), labels), tf.float32)
                )
                return loss, hits

            loss, hits = strategy.run(step, args=next(iterator))
            return strategy.reduce("SUM", loss, axis=None), strategy.reduce("SUM", hits, axis=None)

        def evaluate() -> tuple[float, float]:
            hits = total = loss_sum = 0.0
            for features, labels in self.val_ds:
                probabilities = model(features, training=False)
                hits += float(
                    tf.reduce_sum(
                        tf.cast(tf.equal(tf.argmax(probabilities, -1), labels), tf.float32)
                    )
                )
                loss_sum += float(tf.reduce_sum(loss_fn(labels, probabilities)))
                total += float(tf.shape(labels)[0])
            # Sum every worker's share: all of them then hold the same figures.
            local = tf.constant([hits, loss_sum, total], tf.float64)
            summed = strategy.reduce(
                "SUM", strategy.run(lambda: tf.identity(local)), axis=None
            ).numpy()
            return summed[0] / max(summed[2], 1.0), summed[1] / max(summed[2], 1.0)

        history: dict[str, list[float]] = {
            "loss": [],
            "accuracy": [],
            "val_loss": [],
            "val_accuracy": [],
        }
        iterator = iter(strategy.experimental_distribute_dataset(self.train_ds))
        callbacks = callbacks or []
        for cb in callbacks:
            cb.set_model(model)
            cb.on_train_begin()
        for epoch in range(initial_epoch, epochs):
            total_loss = total_hits = 0.0
            for _ in range(self.steps):
                loss, hits = train_step(iterator)
                total_loss += float(loss)
                total_hits += float(hits)
            val_accuracy, val_loss = evaluate()
            logs = {
                "loss": total_loss / self.steps,
                "accuracy": total_hits / (self.steps * global_batch),
                "val_loss": val_loss,
                "val_accuracy": val_accuracy,
            }
            for key, value in logs.items():
                history[key].append(float(value))
            log(f"  epoch {epoch + 1}/{epochs}: loss {logs['loss']:.4f}, accuracy {logs['accuracy']:.4f}, "
                f"val_accuracy {val_accuracy:.4f}")  # fmt: skip
            for cb in callbacks:
                if type(cb).__name__ == "SaveBestEpoch":
                    save_best_epoch(cb, model, logs)
                else:
                    cb.on_epoch_end(epoch, logs)
        for cb in callbacks:
            cb.on_train_end()
        log(f"  weights sha256 {weights_digest(model)}")  # the same on every worker
        return history


def weights_digest(model: Any) -> str:
    import hashlib

    digest = hashlib.sha256()
    for weight in model.get_weights():
        digest.update(np.ascontiguousarray(weight).tobytes())
    return digest.hexdigest()[:16]


def save_best_epoch(callback: Any, model: Any, logs: dict[str, float]) -> None:
    """Keras Tuner's SaveBestEpoch, but every worker keeps its own checkpoint: Hyperband
    loads it on every worker when a later round continues the trial (Keras Tuner's
    own version deletes the copies of non-chief workers)."""
    value = callback.objective.get_value(logs)
    if callback.objective.better_than(value, callback.best_value):
        callback.best_value = value
        Path(callback.filepath).parent.mkdir(parents=True, exist_ok=True)
        model.save_weights(callback.filepath)


# ---------------------------------------------------------------------------
# Keras Tuner pieces.
# ---------------------------------------------------------------------------


def make_hypermodel(
    vocab_info: dict[str, Any], seed: int, strategy: Any = None, trainer: SyncTrainer | None = None
) -> Any:
    import keras
    import keras_tuner as kt

    from imt_ml.tfrecord_reader import compile_model, create_simple_model

    class TrackHyperModel(kt.HyperModel):
        def build(self, hp: Any) -> Any:
            cfg = model_config_from_hp(hp, seed)
            lr = learning_rate_from_hp(hp)
            keras.utils.set_random_seed(seed)
            scope = strategy.scope() if strategy is not None else contextlib.nullcontext()
            with scope:
                model = create_simple_model(vocab_info, cfg)
            if trainer is None:
                compile_model(model, lr)
            return model

        def fit(self, hp: Any, model: Any, *args: Any, **kwargs: Any) -> Any:
            if trainer is None:  # one machine per trial: plain Keras
                kwargs.setdefault("verbose", 0)
                return model.fit(*args, **kwargs)
            history = trainer.fit(
                model, learning_rate_from_hp(hp), kwargs.get("epochs", 1),
                kwargs.get("initial_epoch", 0), kwargs.get("callbacks"),
            )  # fmt: skip
            return {
                "val_accuracy": max(history["val_accuracy"]),
                "val_loss": min(history["val_loss"]),
            }

    return TrackHyperModel()


def make_tuner(hypermodel: Any, opts: SearchOptions, directory: str, overwrite: bool) -> Any:
    import keras_tuner as kt

    class RecordingHyperband(kt.Hyperband):
        """Hyperband that remembers which trials this instance ran."""

        ran: list[str]

        def on_trial_begin(self, trial: Any) -> None:
            self.ran = [*getattr(self, "ran", []), trial.trial_id]
            log(f"[{self.tuner_id}] trial {trial.trial_id}: "
                + ", ".join(f"{k}={v}" for k, v in trial.hyperparameters.values.items()))  # fmt: skip
            super().on_trial_begin(trial)

    return RecordingHyperband(
        hypermodel,
        objective=kt.Objective("val_accuracy", direction="max"),
        max_epochs=opts.max_epochs,
        factor=opts.factor,
        hyperband_iterations=opts.hyperband_iterations,
        executions_per_trial=opts.executions_per_trial,
        seed=opts.seed,
        directory=directory,
        project_name=opts.project_name,
        overwrite=overwrite,
    )


def best_trial_summary(oracle: Any, n: int = 10) -> list[dict[str, Any]]:
    rows = []
    for trial in oracle.get_best_trials(n):
        values = {
            k: v for k, v in trial.hyperparameters.values.items() if not k.startswith("tuner/")
        }
        rows.append({"trial_id": trial.trial_id, "score": trial.score, "hyperparameters": values})
    return rows


def train_and_save_best(
    data: Any, hp_values: dict[str, Any], opts: SearchOptions, mode_lines: list[str]
) -> Path:
    """Retrain the best hyperparameters like `train` and write its usual outputs."""
    import keras_tuner as kt

    from imt_ml.tfrecord_reader import TrainOptions, run_train

    hp = kt.HyperParameters()
    hp.values.update(hp_values)
    cfg = model_config_from_hp(hp, opts.seed)
    train_opts = TrainOptions(
        epochs=opts.final_epochs or opts.max_epochs, batch_size=opts.batch_size,
        learning_rate=learning_rate_from_hp(hp), model_path=opts.model_path, seed=opts.seed,
    )  # fmt: skip

    def sections(run_dir: Path) -> list[str]:
        from imt_ml.utils import write_json

        write_json(run_dir / f"{opts.model_path}_config.json", {
            "hyperparameters": hp_values, "model_config": dataclasses.asdict(cfg),
            "training": dataclasses.asdict(train_opts), "search": dataclasses.asdict(opts),
        })  # fmt: skip
        return mode_lines

    result = run_train(
        data.export_dir, train_opts, cfg, mode="tune", mode_sections=sections, data=data
    )
    return result.run_dir


def search_section(title: str, lines: list[str], best: list[dict[str, Any]]) -> list[str]:
    from imt_ml.tfrecord_reader import markdown_table

    rows = [[i + 1, t["trial_id"], f"{t['score']:.4f}" if t["score"] is not None else "n/a",
             ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in t["hyperparameters"].items())]
            for i, t in enumerate(best)]  # fmt: skip
    return [f"## {title}", "", *lines, "", "Top trials:", "",
            markdown_table(["Rank", "Trial", "Best val accuracy", "Hyperparameters"], rows), ""]  # fmt: skip


# ---------------------------------------------------------------------------
# The two modes.
# ---------------------------------------------------------------------------


def run_sync_tune(opts: SearchOptions, workers: str, index: int) -> Path | None:
    """Hyperband in lock step on every worker; each trial trains on all of them."""
    hosts = parse_workers(workers, index)
    from imt_ml.tfrecord_reader import find_export_dir, prepare_data

    find_export_dir(opts.data_dir)  # a bad --data-dir is reported before waiting for peers
    started = time.perf_counter()
    # Collectives must be configured before TensorFlow runs anything else.
    strategy = create_strategy(hosts, index)
    # Every worker reads the same export and makes the same split.
    data = prepare_data(opts.data_dir, opts.batch_size, "time", opts.seed)
    chief = index == 0
    log(f"Worker {index} of {len(hosts)} joined ({'chief' if chief else 'worker'}); "
        f"{strategy.num_replicas_in_sync} replicas in sync")  # fmt: skip
    trainer = SyncTrainer(strategy, data, index, len(hosts), opts.batch_size, opts.seed)
    hypermodel = make_hypermodel(data.vocab_info, opts.seed, strategy, trainer)
    # Every worker runs the same seeded oracle on the same reduced metrics, so all
    # of them walk through the same trials; only the chief keeps its tuner state.
    scratch = None if chief else tempfile.TemporaryDirectory(prefix="imt-sync-worker-")
    if scratch is None:
        directory = str(Path(os.environ.get("TUNER_DIRECTORY") or "kt_runs").resolve())
    else:
        directory = scratch.name
    tuner = make_tuner(hypermodel, opts, directory, overwrite=True)
    tuner.search(verbose=0)
    search_seconds = time.perf_counter() - started
    best = best_trial_summary(tuner.oracle)
    if not chief:
        log(f"Worker {index}: search finished after {len(getattr(tuner, 'ran', []))} trials; "
            "the chief writes the outputs")  # fmt: skip
        if scratch:
            scratch.cleanup()
        return None

    lines = [
        f"- Keras Tuner Hyperband, max {opts.max_epochs} epochs, factor {opts.factor}, "
        f"{opts.hyperband_iterations} iteration(s), {opts.executions_per_trial} execution(s) per trial, seed {opts.seed}",
        f"- Every trial trained synchronously on {len(hosts)} workers ({', '.join(hosts)}) with "
        "MultiWorkerMirroredStrategy; each worker had an equal shard of the training records",
        f"- Global batch: {opts.batch_size} per worker x {len(hosts)} = {opts.batch_size * len(hosts)}",
        f"- Trials run: {len(getattr(tuner, 'ran', []))}; search wall time: {search_seconds:.1f} s",
        f"- Keras Tuner state: `{directory}/{opts.project_name}`",
    ]
    return train_and_save_best(data, best[0]["hyperparameters"], opts,
                               search_section("Synchronous Multi-Worker Search", lines, best))  # fmt: skip


def oracle_target(address: str | None) -> tuple[str, str]:
    address = address or (
        f"{os.environ['KERASTUNER_ORACLE_IP']}:{os.environ['KERASTUNER_ORACLE_PORT']}"
        if "KERASTUNER_ORACLE_IP" in os.environ and "KERASTUNER_ORACLE_PORT" in os.environ
        else None
    )
    if not address:
        raise UserError(
            "--oracle-address (or KERASTUNER_ORACLE_IP and KERASTUNER_ORACLE_PORT) is required"
        )
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--oracle-address {address!r} is not host:port")
    return host, port


def wait_for_oracle(host: str, port: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=2):
                return
        except OSError as exc:
            if time.monotonic() > deadline:
                raise UserError(f"no Keras Tuner oracle answers at {host}:{port} after {timeout_s:g} s ({exc}); "
                                "start the chief first") from None  # fmt: skip
            time.sleep(0.5)


def run_tuner_parallel(opts: SearchOptions, tuner_directory: str, tuner_id: str, oracle_address: str | None,
                       train_best: bool | None, wait_s: float) -> Path | None:  # fmt: skip
    """Trials spread over instances by the chief's oracle; the chief trains trials too."""
    host, port = oracle_target(oracle_address)
    chief = tuner_id == "chief"
    if not chief and "chief" in tuner_id:
        raise UserError("--tuner-id must be 'chief' or a name without 'chief' in it (e.g. tuner0)")
    from imt_ml.tfrecord_reader import prepare_data

    data = prepare_data(opts.data_dir, opts.batch_size, "time", opts.seed)
    hypermodel = make_hypermodel(data.vocab_info, opts.seed)
    os.environ["KERASTUNER_ORACLE_IP"], os.environ["KERASTUNER_ORACLE_PORT"] = host, port
    started = time.perf_counter()
    server_tuner = None
    if chief:
        # The oracle service, on a thread of this process ...
        from keras_tuner.src.distribute import oracle_chief

        os.environ["KERASTUNER_TUNER_ID"] = "chief"
        server_tuner = make_tuner(hypermodel, opts, tuner_directory, overwrite=True)
        server_tuner.save()
        threading.Thread(target=oracle_chief.start_server, args=(server_tuner.oracle,), daemon=True,
                         name="kt-oracle").start()  # fmt: skip
        log(f"Oracle service for {opts.project_name} listening on {host}:{port}")
        # ... and a trial runner like any other instance (an id without "chief").
        os.environ["KERASTUNER_TUNER_ID"] = "lead"
    else:
        os.environ["KERASTUNER_TUNER_ID"] = tuner_id
    wait_for_oracle(host, port, wait_s)
    runner = make_tuner(hypermodel, opts, tuner_directory, overwrite=False)
    from imt_ml.tfrecord_reader import class_weights

    weights = class_weights(data.train_labels, data.vocab_info["num_classes"], "sqrt")
    with contextlib.redirect_stdout(sys.stderr):
        runner.search(data.train_ds, validation_data=data.val_ds, class_weight=weights, verbose=0)
    ran = list(getattr(runner, "ran", []))
    record = Path(tuner_directory) / opts.project_name / "instances" / f"{tuner_id}.json"
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"tuner_id": tuner_id, "trials": ran}))
    log(f"[{tuner_id}] ran {len(ran)} trial(s): {', '.join(ran) or 'none'}")

    if chief:
        assert server_tuner is not None
        oracle = server_tuner.oracle
        deadline = time.monotonic() + 3600
        while oracle.ongoing_trials and time.monotonic() < deadline:  # other instances' last trials
            time.sleep(0.5)
        best = best_trial_summary(oracle)
    else:
        best = best_trial_summary(runner.oracle) if train_best else []
    if not (train_best if train_best is not None else chief):
        return None
    if not best:
        raise UserError("the search finished without a completed trial")
    search_seconds = time.perf_counter() - started
    lines = [
        f"- Keras Tuner Hyperband, max {opts.max_epochs} epochs, factor {opts.factor}, "
        f"{opts.hyperband_iterations} iteration(s), seed {opts.seed}; trials handed out by the chief's oracle at {host}:{port}",
        f"- This instance ({tuner_id}) ran {len(ran)} trial(s); search wall time here: {search_seconds:.1f} s",
        f"- Shared tuner directory: `{Path(tuner_directory) / opts.project_name}`",
    ]
    return train_and_save_best(data, best[0]["hyperparameters"], opts,
                               search_section("Parallel Tuner Search", lines, best))  # fmt: skip


# ---------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------


def search_options(func: Any) -> Any:
    options = [
        click.option("--data-dir", envvar="DATA_DIR", required=True, help="Export directory or root [env: DATA_DIR]."),
        click.option("--project-name", envvar="PROJECT_NAME", default="track_tuning", show_default=True,
                     help="Search name [env: PROJECT_NAME]."),
        click.option("--max-epochs", envvar="MAX_EPOCHS", type=click.IntRange(min=1), default=10, show_default=True,
                     help="Hyperband's most epochs for one model."),
        click.option("--factor", envvar="FACTOR", type=click.IntRange(min=2), default=3, show_default=True,
                     help="Hyperband's reduction factor."),
        click.option("--hyperband-iterations", envvar="HYPERBAND_ITERATIONS", type=click.IntRange(min=1), default=1,
                     show_default=True),
        click.option("--executions-per-trial", envvar="EXECUTIONS_PER_TRIAL", type=click.IntRange(min=1), default=1,
                     show_default=True),
        click.option("--batch-size", envvar="BATCH_SIZE", type=click.IntRange(min=1), default=256, show_default=True,
                     help="Batch size (per worker in sync-tune)."),
        click.option("--model-path", envvar="MODEL_PATH", default="track_prediction_model", show_default=True),
        click.option("--final-epochs", type=click.IntRange(min=0), default=0, show_default=True,
                     help="Epochs to retrain the best configuration (0: --max-epochs)."),
        click.option("--seed", type=int, default=42, show_default=True),
    ]  # fmt: skip
    for option in reversed(options):
        func = option(func)
    return func


def _options(kwargs: dict[str, Any]) -> SearchOptions:
    names = {f.name for f in dataclasses.fields(SearchOptions)}
    return SearchOptions(**{k: v for k, v in kwargs.items() if k in names})


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
def cli() -> None:
    """Distributed hyperparameter search for imt-ml track models."""


@cli.command("sync-tune")
@click.option(
    "--workers",
    envvar="WORKERS",
    required=True,
    help="host:port of every worker, comma-separated [env: WORKERS].",
)
@click.option(
    "--index",
    envvar="INDEX",
    type=int,
    required=True,
    help="This worker's position in --workers [env: INDEX].",
)
@click.option(
    "--peer-timeout",
    type=click.FloatRange(min=1),
    default=300,
    show_default=True,
    help="Seconds to wait for every worker to join.",
)
@search_options
def sync_tune(workers: str, index: int, peer_timeout: float, **kwargs: Any) -> None:
    """Hyperband search whose trials each train on all workers (MultiWorkerMirroredStrategy)."""
    if READY_FD_ENV not in os.environ:  # the supervising parent: bounded wait for the peers
        hosts = parse_workers(workers, index)
        from imt_ml.tfrecord_reader import find_export_dir

        find_export_dir(kwargs["data_dir"])
        sys.exit(supervise_until_joined(hosts, index, peer_timeout))
    run_dir = run_sync_tune(_options(kwargs), workers, index)
    if run_dir:
        click.echo(str(run_dir))


@cli.command("tuner-parallel")
@click.option(
    "--tuner-directory",
    envvar="TUNER_DIRECTORY",
    required=True,
    help="Keras Tuner directory every instance shares [env: TUNER_DIRECTORY].",
)
@click.option(
    "--tuner-id",
    envvar="TUNER_ID",
    required=True,
    help="'chief' or tuner0, tuner1, ... [env: TUNER_ID].",
)
@click.option(
    "--oracle-address",
    default=None,
    help="host:port of the chief's oracle [default: KERASTUNER_ORACLE_IP:KERASTUNER_ORACLE_PORT].",
)
@click.option(
    "--train-best/--no-train-best",
    default=None,
    help="Retrain and save the best model here [default: only on the chief].",
)
@click.option(
    "--oracle-wait",
    type=click.FloatRange(min=1),
    default=120,
    show_default=True,
    help="Seconds a worker waits for the chief's oracle.",
)
@search_options
def tuner_parallel(tuner_directory: str, tuner_id: str, oracle_address: str | None, train_best: bool | None,
                   oracle_wait: float, **kwargs: Any) -> None:  # fmt: skip
    """Trials spread over instances by the chief's Keras Tuner oracle."""
    run_dir = run_tuner_parallel(
        _options(kwargs), tuner_directory, tuner_id, oracle_address, train_best, oracle_wait
    )
    if run_dir:
        click.echo(str(run_dir))


def sync_tune_main() -> None:
    sync_tune()


def tuner_parallel_main() -> None:
    tuner_parallel()


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
