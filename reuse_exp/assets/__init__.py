"""Files shipped with the package: the bundled tiny model (see tiny/README.md)."""
from pathlib import Path

ASSETS_DIR = Path(__file__).parent
TINY_MODEL_DIR = ASSETS_DIR / "tiny"
