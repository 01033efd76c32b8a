"""Use several machines for one search: synchronous multi-worker trials, or parallel trials
(usage and examples: docs/distributed.md).

sync-tune: Hyperband in which every trial trains on all workers at once
(tf.distribute.MultiWorkerMirroredStrategy). Start one process per worker with the same
--workers and its own --index; worker 0, the chief, alone writes model, vocab and report.
tuner-parallel: every instance (the chief included) trains whole trials, each pulled from
the chief's Keras Tuner oracle service, so none runs twice; the others (--tuner-id tuner0,
tuner1, ...) find the oracle's address in the shared tuner directory.

Keras 3 with TensorFlow 2.21 cannot run model.fit under MultiWorkerMirroredStrategy
(a PerReplica value reaches the trainer's symbolic build), so sync-tune trains
with its own step: strategy.run per batch, losses and counts reduced explicitly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np

if __package__ in (None, ""):  # run by path: `uv run src/imt_ml/distributed_launcher.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imt_ml import utils
from imt_ml.utils import UserError, from_options, keras, log, option_field, tf


# --- Options and the search space. ---
@dataclass
class SearchOptions:
    """What both modes share, each field a command-line option; no generic environment
    variables (a stray BATCH_SIZE must not change a run): the Taskfile maps its own to flags."""

    # fmt: off
    data_dir: str = option_field(help="Export directory or export root.")
    project_name: str = option_field("track_tuning", "Name of the search in the tuner directory.")
    max_epochs: int = option_field(10, "Hyperband's most epochs for one model.", click.IntRange(min=1))
    factor: int = option_field(3, "Hyperband's reduction factor.", click.IntRange(min=2))
    hyperband_iterations: int = option_field(1, None, click.IntRange(min=1))
    executions_per_trial: int = option_field(1, None, click.IntRange(min=1))
    batch_size: int = option_field(256, "Batch size (per worker in sync-tune).", click.IntRange(min=1))
    model_path: str = option_field("track_prediction_model", "File name prefix of the saved files.")
    final_epochs: int = option_field(0, "Epochs to retrain the best configuration (0: --max-epochs).",
                                     click.IntRange(min=0))
    seed: int = option_field(42, None)
    test_days: float = option_field(7.0, "Hold out the newest DAYS from the search and the retraining; "
                                    "the headline figures come from them.",
                                    click.FloatRange(min=0), metavar="DAYS")
    # fmt: on


def trial_recipe(hp: Any, opts: SearchOptions) -> tuple[Any, Any]:
    """(model configuration, `tune`'s `search_recipe`) of a trial, from `tune`'s SEARCH_SPACE
    declared in Keras Tuner's terms; the batch size is --batch-size (per worker in sync-tune)."""
    from imt_ml.tfrecord_reader import SEARCH_SPACE, model_config_from_trial, search_recipe

    values = {}
    for name, (kind, *args) in SEARCH_SPACE.items():
        if name == "batch_size":
            values[name] = hp.Fixed(name, opts.batch_size)
        elif kind == "choice":
            values[name] = hp.Choice(name, list(args[0]))
        else:
            sampling = "log" if kind == "loguniform" else "linear"
            values[name] = hp.Float(name, args[0], args[1], sampling=sampling)
    # Batch statistics would differ between workers; sync-tune gets identical weights
    # on every worker only without them (tuner-parallel keeps the same architecture).
    cfg = dataclasses.replace(model_config_from_trial(values, opts.seed), batch_norm=False)
    return cfg, search_recipe(values, opts.max_epochs, opts.seed)


# --- Synchronous multi-worker training: TF_CONFIG, the strategy, a custom step. ---
def parse_workers(workers: str, index: int) -> list[str]:
    """The host:port list, checked, with `index` inside it."""
    hosts = [w.strip() for w in workers.split(",") if w.strip()]
    if not hosts:
        raise UserError("--workers needs at least one host:port")
    for host in hosts:
        if utils.split_host_port(host) is None:
            raise UserError(f"--workers entry {host!r} is not host:port")
    if len(set(hosts)) != len(hosts):
        raise UserError("--workers lists the same host:port twice")
    if not 0 <= index < len(hosts):
        raise UserError(
            f"--index {index} is outside the {len(hosts)} workers of --workers (0..{len(hosts) - 1})"
        )
    return hosts


READY_FD_ENV = "IMT_ML_SYNC_READY_FD"


def create_strategy(hosts: list[str], index: int) -> Any:
    """MultiWorkerMirroredStrategy with every worker joined; tells the supervising
    process (see `supervise_until_joined`) as soon as it is."""
    task = {"type": "worker", "index": index}
    os.environ["TF_CONFIG"] = json.dumps({"cluster": {"worker": hosts}, "task": task})
    ring = tf.distribute.experimental.CommunicationImplementation.RING
    options = tf.distribute.experimental.CommunicationOptions(implementation=ring)
    strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    # A first collective: it returns only when every worker has joined.
    strategy.reduce("SUM", strategy.run(lambda: tf.constant(1.0)), axis=None)
    ready_fd = os.environ.get(READY_FD_ENV)
    if ready_fd:
        os.write(int(ready_fd), b"1")
        os.close(int(ready_fd))
    return strategy


def supervise_until_joined(hosts: list[str], index: int, timeout_s: float) -> int:
    """Run this command in a child process and wait for it to join the other workers: TensorFlow
    waits for them for an hour, in C++ code that ignores signals. After `timeout_s`: one
    clear line, the child killed, exit code 1."""
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
        log(
            f"Error: worker {index} ({hosts[index]}) could not join the other workers "
            f"({', '.join(others) or 'none'}) within {timeout_s:g} s; start every worker "
            "with the same --workers and check that they can reach each other"
        )
        return 1
    return child.wait()


class SyncTrainer:
    """Trains with an explicit distributed step and `train`'s recipe: recency weights and
    identity hiding in the data built here; schedule and early stopping in `fit`."""

    def __init__(self, strategy: Any, data: Any, index: int, workers: int, recipe: Any):
        from imt_ml import tfrecord_reader as tr

        batch_size, seed = recipe.batch_size, recipe.seed
        self.strategy, self.global_batch = strategy, batch_size * workers
        # Equal shares of the training records: every worker runs as many synchronous steps.
        share = len(data.train_idx) // workers
        order = np.random.default_rng(seed).permutation(len(data.train_idx))
        positions = np.sort(order[index * share : (index + 1) * share])
        shard, labels = data.train_idx[positions], data.train_labels[positions]
        timestamps = data.columns["scheduled_timestamp"][data.train_idx]
        weights = tr.recency_weights(timestamps, recipe.recency_half_life)[positions]
        self.steps = len(shard) // batch_size
        if self.steps == 0:
            raise UserError(
                f"{len(shard)} training records per worker are fewer than --batch-size {batch_size}"
            )
        features = {k: tf.constant(v) for k, v in tr.model_features(data.columns, shard).items()}
        labelled = (features, tf.constant(labels), tf.constant(weights.astype(np.float32)))
        ds = tf.data.Dataset.from_tensor_slices(labelled)
        batches = ds.shuffle(len(labels), seed=seed).batch(batch_size, drop_remainder=True)
        if data.augmented:
            batches = tr.with_hidden_identities(batches, seed)
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
        self.train_ds = batches.repeat().with_options(options)
        val_part = data.val_idx[data.val_known][index::workers]
        val_labels = data.val_labels[data.val_known][index::workers]
        self.val_ds = tr.make_dataset(tr.model_features(data.columns, val_part), val_labels, 1024)

    def fit(self, model: Any, recipe: Any, epochs: int, initial_epoch: int = 0,
            callbacks: list | None = None) -> dict[str, list[float]]:  # fmt: skip
        """Train with `recipe`'s rate, schedule and early stopping (its batch size and
        half-life are the ones this trainer's data was built with)."""
        from imt_ml.layers import cosine_rate

        with self.strategy.scope():
            optimizer = keras.optimizers.Adam(learning_rate=recipe.learning_rate)
        loss_fn = keras.losses.SparseCategoricalCrossentropy(reduction="none")
        train_step = self._train_step(model, optimizer, loss_fn)
        history: dict[str, list[float]] = {}
        iterator = iter(self.strategy.experimental_distribute_dataset(self.train_ds))
        callbacks = callbacks or []
        for cb in callbacks:
            cb.set_model(model)
            cb.on_train_begin()
        scale, best_loss, since_best, plateau = 1.0, float("inf"), 0, 0
        for epoch in range(initial_epoch, epochs):
            if not recipe.no_scheduler:  # `train`'s CosineWithPlateau, by hand
                tmax = recipe.scheduler_tmax or recipe.epochs
                rate = cosine_rate(recipe.learning_rate, epoch, tmax) * scale
                optimizer.learning_rate.assign(rate)
            steps = [train_step(iterator) for _ in range(self.steps)]
            total_loss = sum(float(loss) for loss, _ in steps)
            total_hits = sum(float(hits) for _, hits in steps)
            val_accuracy, val_loss = self._evaluate(model, loss_fn)
            logs = {"loss": total_loss / self.steps, "accuracy": total_hits / (self.steps * self.global_batch),
                    "val_loss": val_loss, "val_accuracy": val_accuracy}  # fmt: skip
            for key, value in logs.items():
                history.setdefault(key, []).append(float(value))
            log(f"  epoch {epoch + 1}/{epochs}: loss {logs['loss']:.4f}, accuracy {logs['accuracy']:.4f}, "
                f"val_accuracy {val_accuracy:.4f}")  # fmt: skip
            for cb in callbacks:
                if type(cb).__name__ == "SaveBestEpoch":
                    save_best_epoch(cb, model, logs)
                else:
                    cb.on_epoch_end(epoch, logs)
            # Every worker sees the same all-reduced val_loss, so all stop together.
            if val_loss < best_loss - recipe.early_stop_min_delta:
                best_loss, since_best, plateau = val_loss, 0, 0
            else:
                since_best, plateau = since_best + 1, plateau + 1
                if plateau >= recipe.reduce_lr_patience:
                    scale, plateau = scale * recipe.reduce_lr_factor, 0
                if not recipe.no_early_stop and since_best >= recipe.early_stop_patience:
                    log(f"  early stop after epoch {epoch + 1}: no better val_loss for "
                        f"{since_best} epochs")  # fmt: skip
                    break
        for cb in callbacks:
            cb.on_train_end()
        log(f"  weights sha256 {weights_digest(model)}")  # the same on every worker
        return history

    def _train_step(self, model: Any, optimizer: Any, loss_fn: Any) -> Any:
        """One synchronous step on every worker: (summed loss, summed hits)."""
        strategy, global_batch = self.strategy, self.global_batch

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
                correct = tf.equal(tf.argmax(probabilities, axis=-1), labels)
                hits = tf.reduce_sum(tf.cast(correct, tf.float32))
                return loss, hits

            loss, hits = strategy.run(step, args=next(iterator))
            return strategy.reduce("SUM", loss, axis=None), strategy.reduce("SUM", hits, axis=None)

        return train_step

    def _evaluate(self, model: Any, loss_fn: Any) -> tuple[float, float]:
        """(accuracy, loss) over every worker's share of the validation records, all-reduced."""
        hits = total = loss_sum = 0.0
        for features, labels in self.val_ds:
            probabilities = model(features, training=False)
            predicted = tf.argmax(probabilities, -1)
            hits += float(tf.reduce_sum(tf.cast(tf.equal(predicted, labels), tf.float32)))
            loss_sum += float(tf.reduce_sum(loss_fn(labels, probabilities)))
            total += float(tf.shape(labels)[0])
        local = tf.constant([hits, loss_sum, total], tf.float64)
        summed = self.strategy.reduce("SUM", self.strategy.run(lambda: tf.identity(local)), None)
        hits, loss_sum, total = summed.numpy()
        return hits / max(total, 1.0), loss_sum / max(total, 1.0)


def weights_digest(model: Any) -> str:
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


# --- Keras Tuner pieces. ---
def make_hypermodel(data: Any, opts: SearchOptions, strategy: Any = None,
                    sync: tuple[int, int] | None = None) -> Any:  # fmt: skip
    """Each trial's model built and trained with its `trial_recipe`, on data with that recipe's
    history tables (once per half-life); `sync` = (index, workers): on all workers."""
    from imt_ml.hyperband import TrackHyperModel
    from imt_ml.tfrecord_reader import data_for_recipe

    prepared: dict[tuple, Any] = {}  # (batch size, half-life) -> data, sync trainer

    def setup(hp: Any) -> tuple[Any, Any, Any, SyncTrainer | None]:
        cfg, recipe = trial_recipe(hp, opts)
        key = (recipe.batch_size, recipe.recency_half_life)
        if key not in prepared:
            trial_data = data_for_recipe(data, recipe)
            trainer = SyncTrainer(strategy, trial_data, *sync, recipe) if sync else None
            prepared[key] = (trial_data, trainer)
        return (cfg, recipe, *prepared[key])

    return TrackHyperModel(setup, opts.seed, strategy)


def make_tuner(hypermodel: Any, opts: SearchOptions, directory: str, overwrite: bool) -> Any:
    from imt_ml.hyperband import RecordingHyperband, objective

    return RecordingHyperband(
        hypermodel, objective=objective(),
        max_epochs=opts.max_epochs, factor=opts.factor, hyperband_iterations=opts.hyperband_iterations,
        executions_per_trial=opts.executions_per_trial, seed=opts.seed, directory=directory,
        project_name=opts.project_name, overwrite=overwrite,
    )  # fmt: skip


def train_and_save_best(
    data: Any, oracle: Any, opts: SearchOptions, mode: str, title: str, lines: list[str]
) -> Path:
    """Retrain the oracle's best trial like `train`, writing its outputs under
    `output/{mode}_<time>/`; the report gets a section `title`: `lines` and the top trials."""
    from imt_ml.hyperband import hyperparameters
    from imt_ml.tfrecord_reader import data_for_recipe, retrain_best

    trials = oracle.get_best_trials(10)
    if not trials:
        raise UserError("the search finished without a completed trial")
    chosen = [  # without Keras Tuner's own tuner/* values
        {k: v for k, v in t.hyperparameters.values.items() if not k.startswith("tuner/")}
        for t in trials
    ]
    cfg, recipe = trial_recipe(hyperparameters(chosen[0]), opts)
    # The trials' recipe; only the epoch cap may differ.
    train_opts = dataclasses.replace(recipe, epochs=opts.final_epochs or opts.max_epochs,
                                     model_path=opts.model_path, test_days=opts.test_days)  # fmt: skip
    rows = [[i + 1, t.trial_id, f"{t.score:.4f}" if t.score is not None else "n/a",
             ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())]
            for i, (t, values) in enumerate(zip(trials, chosen, strict=True))]  # fmt: skip
    section = [f"## {title}", "", *lines, "", "Top trials:", "",
               utils.markdown_table(["Rank", "Trial", "Best val accuracy", "Hyperparameters"], rows), ""]  # fmt: skip
    result = retrain_best(data_for_recipe(data, train_opts), train_opts, cfg, mode, chosen[0],
                          dataclasses.asdict(opts), section)  # fmt: skip
    return result.run_dir


# --- The two modes. ---
def run_sync_tune(opts: SearchOptions, workers: str, index: int, tuner_dir: str) -> Path | None:
    """Hyperband in lock step on every worker; each trial trains on all of them."""
    hosts = parse_workers(workers, index)
    from imt_ml.tfrecord_reader import find_export_dir, prepare_data

    find_export_dir(opts.data_dir)  # a bad --data-dir is reported before waiting for peers
    started = time.perf_counter()
    # Collectives must be configured before TensorFlow runs anything else.
    strategy = create_strategy(hosts, index)
    # Every worker reads the same export and makes the same split.
    data = prepare_data(opts.data_dir, opts.batch_size, "time", opts.seed, test_days=opts.test_days)
    chief = index == 0
    log(f"Worker {index} of {len(hosts)} joined ({'chief' if chief else 'worker'}); "
        f"{strategy.num_replicas_in_sync} replicas in sync")  # fmt: skip
    hypermodel = make_hypermodel(data, opts, strategy, sync=(index, len(hosts)))
    # Every worker runs the same seeded oracle on the same reduced metrics, so all
    # of them walk through the same trials; only the chief keeps its tuner state.
    scratch = None if chief else tempfile.TemporaryDirectory(prefix="imt-sync-worker-")
    directory = scratch.name if scratch else str(Path(tuner_dir).resolve())
    tuner = make_tuner(hypermodel, opts, directory, overwrite=True)
    tuner.search(verbose=0)
    search_seconds = time.perf_counter() - started
    ran = len(getattr(tuner, "ran", []))
    if scratch:
        log(f"Worker {index}: search finished after {ran} trials; the chief writes the outputs")
        scratch.cleanup()
        return None
    lines = [
        f"- Keras Tuner Hyperband, max {opts.max_epochs} epochs, factor {opts.factor}, "
        f"{opts.hyperband_iterations} iteration(s), {opts.executions_per_trial} execution(s) per trial, seed {opts.seed}",
        f"- Every trial trained synchronously on {len(hosts)} workers ({', '.join(hosts)}) with "
        "MultiWorkerMirroredStrategy; each worker had an equal shard of the training records",
        f"- Global batch: {opts.batch_size} per worker x {len(hosts)} = {opts.batch_size * len(hosts)}",
        f"- Trials run: {ran}; search wall time: {search_seconds:.1f} s",
        f"- Keras Tuner state: `{directory}/{opts.project_name}`",
    ]
    return train_and_save_best(data, tuner.oracle, opts, "sync-tune",
                               "Synchronous Multi-Worker Search", lines)  # fmt: skip


# --- Parallel trials: the chief's oracle, found through the shared tuner directory. ---
#: Beside the search's state: where the chief's oracle listens, with a heartbeat.
ORACLE_FILE = "oracle.json"
HEARTBEAT_S = 1.0


def given_oracle_address(address: str | None) -> tuple[str, int] | None:
    """(host, port) of --oracle-address, else of KERASTUNER_ORACLE_IP and
    KERASTUNER_ORACLE_PORT, else None (port 0: any free port); one clear error if bad."""
    flag = "--oracle-address"
    if not address:
        ip, port = os.environ.get("KERASTUNER_ORACLE_IP"), os.environ.get("KERASTUNER_ORACLE_PORT")
        if not (ip and port):
            return None
        address, flag = f"{ip}:{port}", "KERASTUNER_ORACLE_IP:KERASTUNER_ORACLE_PORT"
    parsed = utils.split_host_port(address)
    if parsed is None:
        raise UserError(f"{flag} {address!r} is not host:port")
    return parsed


def this_machines_address() -> str:
    """Where other machines most likely reach this one: its host name's first non-loopback IPv4
    address that a socket can bind to, else the host name itself, for them to resolve."""
    name = socket.gethostname()
    with contextlib.suppress(OSError):
        for *_, sockaddr in socket.getaddrinfo(name, None, socket.AF_INET):
            address = str(sockaddr[0])
            if address.startswith("127."):
                continue
            with contextlib.suppress(OSError), socket.socket() as probe:
                probe.bind((address, 0))
                return address
    return name


class OracleAddressFile:
    """`{tuner_directory}/{project}/oracle.json`: where the chief's oracle listens. The chief
    rewrites it every HEARTBEAT_S seconds with a growing `beat` (atomic renames) and marks it
    finished at the end. An instance trusts an address only after seeing its beat grow, so an
    earlier search's file is never used, whatever the clocks of the machines say."""

    def __init__(self, tuner_directory: str, project_name: str) -> None:
        self.path = Path(tuner_directory) / project_name / ORACLE_FILE
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def publish(self, host: str, port: int, bind: str) -> None:
        """The chief: write the address and keep its heartbeat going until finish()."""
        record: dict[str, Any] = {
            "host": host, "port": port, "bind": bind, "chief_host": socket.gethostname(),
            "pid": os.getpid(), "search_id": uuid.uuid4().hex, "beat": 0, "finished": False,
        }  # fmt: skip
        self.path.parent.mkdir(parents=True, exist_ok=True)
        utils.write_json(self.path, record)

        def beat() -> None:
            while not self._stop.wait(HEARTBEAT_S):
                record["beat"] += 1
                with contextlib.suppress(OSError):
                    utils.write_json(self.path, record)

        self._record = record
        self._thread = threading.Thread(target=beat, daemon=True, name="oracle-heartbeat")
        self._thread.start()

    def finish(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            with contextlib.suppress(OSError):
                utils.write_json(self.path, {**self._record, "finished": True})

    def wait_for_live_address(self, timeout_s: float) -> tuple[str, int]:
        """The other instances: the address of a chief whose heartbeat is seen to advance."""
        deadline = time.monotonic() + timeout_s
        first_seen: dict[str, int] = {}  # search id -> first beat seen
        while time.monotonic() < deadline:
            try:
                data = json.loads(self.path.read_text())
            except (OSError, ValueError):
                data = None
            if isinstance(data, dict) and not data.get("finished") and "search_id" in data:
                search, beat = str(data["search_id"]), int(data.get("beat", 0))
                if search in first_seen and beat > first_seen[search]:
                    return connect_host(data), int(data["port"])
                first_seen.setdefault(search, beat)
            time.sleep(min(0.25, HEARTBEAT_S / 2))
        raise UserError(
            f"no chief published a live oracle address in {self.path} within {timeout_s:g} s; "
            "start the chief (--tuner-id chief) with the same --tuner-directory and --project-name"
        )


def connect_host(record: dict[str, Any]) -> str:
    """Over loopback when the oracle listens on every interface of this machine, else its host."""
    if record.get("bind") == "0.0.0.0" and record.get("chief_host") == socket.gethostname():
        return "127.0.0.1"
    return str(record["host"])


def wait_for_oracle(host: str, port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=2):
                return
        except OSError as exc:
            if time.monotonic() > deadline:
                raise UserError(f"no Keras Tuner oracle answers at {host}:{port} after {timeout_s:g} s ({exc}); "
                                "start the chief first") from None  # fmt: skip
            time.sleep(0.5)


def start_oracle_service(oracle: Any, address: tuple[str, int] | None) -> tuple[str, str, int]:
    """Serve the oracle on a thread: bound to `address` exactly (port 0: a free one), else to
    every interface on a free port. Returns (host to publish, host bound, port)."""
    from keras_tuner.src.distribute import oracle_chief

    bind_host, port = address or ("0.0.0.0", 0)
    publish_host = bind_host if address else this_machines_address()
    if not port:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((bind_host, 0))
            port = sock.getsockname()[1]
    # start_server reads these two variables; the service is up before they change.
    os.environ["KERASTUNER_ORACLE_IP"], os.environ["KERASTUNER_ORACLE_PORT"] = bind_host, str(port)
    threading.Thread(target=oracle_chief.start_server, args=(oracle,), daemon=True,
                     name="kt-oracle").start()  # fmt: skip
    wait_for_oracle("127.0.0.1" if bind_host == "0.0.0.0" else bind_host, port, 30)
    return publish_host, bind_host, port


def run_tuner_parallel(opts: SearchOptions, tuner_directory: str, tuner_id: str, oracle_address: str | None,
                       train_best: bool | None, wait_s: float) -> Path | None:  # fmt: skip
    """Trials spread over instances by the chief's oracle, whose address the others find in
    the shared tuner directory unless one is given; the chief trains trials too."""
    chief = tuner_id == "chief"
    if not chief and "chief" in tuner_id:
        raise UserError("--tuner-id must be 'chief' or a name without 'chief' in it (e.g. tuner0)")
    given = given_oracle_address(oracle_address)
    from imt_ml.tfrecord_reader import prepare_data

    data = prepare_data(opts.data_dir, opts.batch_size, "time", opts.seed, test_days=opts.test_days)
    hypermodel = make_hypermodel(data, opts)
    address_file = OracleAddressFile(tuner_directory, opts.project_name)
    started = time.perf_counter()
    server_tuner = None
    if chief:
        # The oracle service, on a thread of this process ...
        os.environ["KERASTUNER_TUNER_ID"] = "chief"
        server_tuner = make_tuner(hypermodel, opts, tuner_directory, overwrite=True)
        server_tuner.save()
        published, bound, port = start_oracle_service(server_tuner.oracle, given)
        address_file.publish(published, port, bound)
        log(f"Oracle service for {opts.project_name} listening on {bound}:{port}, published as "
            f"{published}:{port} in {address_file.path}")  # fmt: skip
        host = "127.0.0.1" if bound == "0.0.0.0" else bound
        # ... and a trial runner like any other instance (an id without "chief").
        os.environ["KERASTUNER_TUNER_ID"] = "lead"
    else:
        os.environ["KERASTUNER_TUNER_ID"] = tuner_id
        if given:
            host, port = given
        else:
            log(f"[{tuner_id}] waiting for the chief's address in {address_file.path}")
            host, port = address_file.wait_for_live_address(wait_s)
        wait_for_oracle(host, port, wait_s)
    os.environ["KERASTUNER_ORACLE_IP"], os.environ["KERASTUNER_ORACLE_PORT"] = host, str(port)
    try:
        return _search_and_train_best(opts, data, hypermodel, tuner_directory, tuner_id,
                                      server_tuner, train_best, f"{host}:{port}", started)  # fmt: skip
    finally:
        if chief:
            address_file.finish()


def _search_and_train_best(opts: SearchOptions, data: Any, hypermodel: Any, tuner_directory: str,
                           tuner_id: str, server_tuner: Any, train_best: bool | None,
                           oracle_at: str, started: float) -> Path | None:  # fmt: skip
    """This instance's trials, then (on the chief, or with --train-best) the best model."""
    runner = make_tuner(hypermodel, opts, tuner_directory, overwrite=False)
    with contextlib.redirect_stdout(sys.stderr):  # the hypermodel brings each trial's data
        runner.search(verbose=0)
    ran = list(getattr(runner, "ran", []))
    record = Path(tuner_directory) / opts.project_name / "instances" / f"{tuner_id}.json"
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"tuner_id": tuner_id, "trials": ran}))
    log(f"[{tuner_id}] ran {len(ran)} trial(s): {', '.join(ran) or 'none'}")

    oracle = runner.oracle
    if server_tuner is not None:  # the chief: the other instances' last trials
        oracle = server_tuner.oracle
        deadline = time.monotonic() + 3600
        while oracle.ongoing_trials and time.monotonic() < deadline:
            time.sleep(0.5)
    if not (train_best if train_best is not None else server_tuner is not None):
        return None
    search_seconds = time.perf_counter() - started
    lines = [
        f"- Keras Tuner Hyperband, max {opts.max_epochs} epochs, factor {opts.factor}, "
        f"{opts.hyperband_iterations} iteration(s), seed {opts.seed}; trials handed out by the chief's oracle at {oracle_at}",
        f"- This instance ({tuner_id}) ran {len(ran)} trial(s); search wall time here: {search_seconds:.1f} s",
        f"- Shared tuner directory: `{Path(tuner_directory) / opts.project_name}`",
    ]
    return train_and_save_best(data, oracle, opts, "tuner-parallel", "Parallel Tuner Search", lines)


# --- Command line. ---
@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
def cli() -> None:
    """Distributed hyperparameter search for imt-ml track models."""


@cli.command(
    "sync-tune",
    epilog=utils.environment_epilog(
        utils.ENV_OUTPUT, utils.ENV_PROGRESS, utils.ENV_TF_LOG,
        f"{READY_FD_ENV} (internal: set by sync-tune for the process it supervises)",
    ),
)  # fmt: skip
@click.option("--workers", required=True, help="host:port of every worker, comma-separated.")
@click.option("--index", type=int, required=True, help="This worker's position in --workers.")
@click.option("--tuner-directory", default="kt_runs", show_default=True,
              help="Where the chief keeps the Keras Tuner state (the other workers keep none).")  # fmt: skip
@click.option("--peer-timeout", type=click.FloatRange(min=1), default=300, show_default=True,
              help="Seconds to wait for every worker to join.")  # fmt: skip
@utils.dataclass_options(SearchOptions)
def sync_tune(
    workers: str, index: int, tuner_directory: str, peer_timeout: float, **kwargs: Any
) -> None:
    """Hyperband search whose trials each train on all workers (MultiWorkerMirroredStrategy)."""
    if READY_FD_ENV not in os.environ:  # the supervising parent: bounded wait for the peers
        hosts = parse_workers(workers, index)
        from imt_ml.tfrecord_reader import find_export_dir

        find_export_dir(kwargs["data_dir"])
        sys.exit(supervise_until_joined(hosts, index, peer_timeout))
    run_dir = run_sync_tune(from_options(SearchOptions, kwargs), workers, index, tuner_directory)
    if run_dir:
        click.echo(str(run_dir))


@cli.command(
    "tuner-parallel",
    epilog=utils.environment_epilog(
        utils.ENV_OUTPUT, utils.ENV_PROGRESS, utils.ENV_TF_LOG,
        "KERASTUNER_ORACLE_IP and KERASTUNER_ORACLE_PORT (the oracle's address when "
        "--oracle-address is not given)",
    ),
)  # fmt: skip
@click.option("--tuner-directory", required=True,
              help="Keras Tuner directory every instance shares (e.g. on NFS); the chief "
              "publishes its oracle's address there and the other instances find it.")  # fmt: skip
@click.option("--tuner-id", required=True, help="'chief' or tuner0, tuner1, ...")
@click.option("--oracle-address", default=None,
              help="host:port of the oracle. The chief binds it exactly (port 0: any free port) "
              "and publishes it; others connect to it instead of reading the tuner directory. "
              "[default: KERASTUNER_ORACLE_IP:KERASTUNER_ORACLE_PORT, else the chief listens on "
              "every interface on a free port and publishes its first non-loopback IPv4 address]")  # fmt: skip
@click.option("--train-best/--no-train-best", default=None,
              help="Retrain and save the best model here [default: only on the chief].")  # fmt: skip
@click.option("--oracle-wait", type=click.FloatRange(min=1), default=120, show_default=True,
              help="Seconds an instance waits for the chief to publish its address and answer.")  # fmt: skip
@utils.dataclass_options(SearchOptions)
def tuner_parallel(tuner_directory: str, tuner_id: str, oracle_address: str | None, train_best: bool | None,
                   oracle_wait: float, **kwargs: Any) -> None:  # fmt: skip
    """Trials spread over instances by the chief's Keras Tuner oracle."""
    opts = from_options(SearchOptions, kwargs)
    run_dir = run_tuner_parallel(
        opts, tuner_directory, tuner_id, oracle_address, train_best, oracle_wait
    )
    if run_dir:
        click.echo(str(run_dir))


if __name__ == "__main__":
    cli()
