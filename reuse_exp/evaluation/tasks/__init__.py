"""lm-eval tasks shipped with the package: `lm_eval.tasks.TaskManager(include_path=TASKS_DIR)`."""
from pathlib import Path

TASKS_DIR = Path(__file__).parent
TASK_NAMES = ("tiny_gsm", "tiny_mc")
