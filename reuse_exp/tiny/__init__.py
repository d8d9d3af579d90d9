"""The bundled default: a tiny Fast-dLLM v2 (`model/`), its data generator (data.py), training
script (train.py) and reuse table (table.py). Importing this package loads nothing."""
from pathlib import Path

MODEL_DIR = Path(__file__).parent / "model"
