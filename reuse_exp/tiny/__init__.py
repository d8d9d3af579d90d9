"""The bundled default: a tiny Fast-dLLM v2 (`model/`), its data generator (data.py) and
training script (train.py). It uses the engine and is never imported by the evaluation,
which finds the model through `engine.loading.BUNDLED_MODEL_DIR`."""
from ..engine.loading import BUNDLED_MODEL_DIR as MODEL_DIR  # noqa: F401
