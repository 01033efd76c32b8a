"""imt-ml: track prediction for the Inky MBTA Tracker.

Importing the package is all a consumer needs to load the models it saves:

    import imt_ml
    import keras

    model = keras.saving.load_model("track_prediction_model_best.keras", compile=False)
    model({"station_id": ["place-sstat"], "route_id": ["CR-Worcester"], ...})

The models use a few custom layers (train number from trip id, cyclical time,
labelled output). Keras only finds custom classes that are registered, so the
package registers them the moment Keras is imported, or at once if it already
is. Importing the package does not import TensorFlow itself, which keeps the
exporter light.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from typing import Any


def _register_layers() -> None:
    importlib.import_module("imt_ml.layers")  # its classes register as they are defined


class _RegisterLayersWithKeras:
    """A meta path finder that runs `_register_layers` right after `import keras`.

    It answers every look-up of "keras" until Keras is really imported: TensorFlow
    asks `importlib.util.find_spec("keras")` only to see whether Keras is installed,
    and the import that follows needs the same treatment."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != "keras":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name)  # the real finder, not us again
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module: Any) -> None:
            exec_module(module)
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            _register_layers()

        spec.loader.exec_module = exec_then_register  # type: ignore[method-assign]
        return spec


if "keras" in sys.modules:
    _register_layers()
else:
    sys.meta_path.insert(0, _RegisterLayersWithKeras())
