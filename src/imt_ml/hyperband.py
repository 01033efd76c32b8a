"""Keras Tuner's side of distributed_launcher: the hypermodel and the Hyperband tuner.

Only the launcher's modes import this module, so that `distributed_launcher.py --help`
does not pay for keras_tuner's import (about ten seconds on two cores).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from typing import Any

import keras_tuner as kt

from imt_ml.tfrecord_reader import compile_model, create_simple_model, fit_model
from imt_ml.utils import keras, log


class TrackHyperModel(kt.HyperModel):
    """Each trial's model built and trained with its recipe. `setup(hp)` gives the
    trial's (model config, TrainOptions, prepared data, sync trainer or None)."""

    def __init__(self, setup: Callable[[Any], tuple], seed: int, strategy: Any = None):
        super().__init__()
        self.setup, self.seed, self.strategy = setup, seed, strategy

    def build(self, hp: Any) -> Any:
        cfg, recipe, trial_data, trainer = self.setup(hp)
        keras.utils.set_random_seed(self.seed)
        scope = self.strategy.scope() if self.strategy is not None else contextlib.nullcontext()
        with scope:
            model = create_simple_model(trial_data.vocab_info, cfg)
        if trainer is None:
            compile_model(model, recipe.learning_rate)
        return model

    def fit(self, hp: Any, model: Any, *args: Any, **kwargs: Any) -> Any:
        cfg, recipe, trial_data, trainer = self.setup(hp)
        epochs, initial = kwargs.get("epochs", 1), kwargs.get("initial_epoch", 0)
        if trainer is None:  # one machine per trial: the recipe's own fit
            history, _ = fit_model(model, trial_data, dataclasses.replace(recipe, epochs=epochs),
                                   None, None, extra_callbacks=kwargs.get("callbacks"),
                                   initial_epoch=initial)  # fmt: skip
        else:
            history = trainer.fit(model, recipe, epochs, initial, kwargs.get("callbacks"))
        return {"val_accuracy": max(history["val_accuracy"]), "val_loss": min(history["val_loss"])}


class RecordingHyperband(kt.Hyperband):
    """Hyperband that remembers which trials this instance ran."""

    ran: list[str]

    def on_trial_begin(self, trial: Any) -> None:
        self.ran = [*getattr(self, "ran", []), trial.trial_id]
        log(f"[{self.tuner_id}] trial {trial.trial_id}: "
            + ", ".join(f"{k}={v}" for k, v in trial.hyperparameters.values.items()))  # fmt: skip
        super().on_trial_begin(trial)


def objective() -> Any:
    return kt.Objective("val_accuracy", direction="max")


def hyperparameters(values: dict[str, Any]) -> Any:
    hp = kt.HyperParameters()
    hp.values.update(values)
    return hp
