"""lm-eval glue around the model: which tasks exist, gated data sets, the evaluation call
and the task's primary metric."""
from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError

GATED_TASKS = {"gpqa": "Idavidrein/gpqa"}


def bundled_tasks_dir() -> Path:
    return Path(__file__).parent / "tasks"


def task_manager_for(task: str, include_path: list[str] | tuple[str, ...] = ()):
    """A TaskManager that knows `task`; bundled and included tasks are found without
    indexing lm-eval's thousands of built-in ones (half a minute)."""
    from lm_eval.tasks import TaskManager
    paths = [str(p) for p in (bundled_tasks_dir(), *map(Path, include_path)) if Path(p).is_dir()]
    if paths:
        tm = TaskManager(include_path=paths, include_defaults=False)
        if task in tm.all_tasks:
            return tm
    tm = TaskManager(include_path=paths or None)
    if task not in tm.all_tasks:
        raise ConfigError(f"unknown task {task!r}: not bundled and not an lm-eval task "
                          "(list them with `lm-eval ls tasks`; add yours with --include-path DIR)")
    return tm


def check_gated(task: str) -> None:
    """Fail before loading anything when a gated data set has no token to open it."""
    repo = next((r for prefix, r in GATED_TASKS.items() if task.startswith(prefix)), None)
    if repo is None:
        return
    from huggingface_hub import get_token
    if not get_token():
        raise ConfigError(f"{task} reads the gated data set {repo}: accept its terms on the hub, "
                          "then set HF_TOKEN (or run `hf auth login`)")


def evaluate(lm, task: str, task_manager, limit: int | float | None = None,
             num_fewshot: int = 0, apply_chat_template: bool = True, fewshot_as_multiturn: bool = True,
             seed: int = 1234, cache: Path | None = None) -> dict:
    """lm-eval's simple_evaluate on one task with per-sample logging; returns its results dict
    (None on a rank other than 0). `cache`: a folder for the per-request cache, which
    answers the requests it holds and keeps each new result, with its statistics, as soon as
    it is computed (request_cache.py; the model consults it, so a resumed run's counts cover
    every request)."""
    import lm_eval

    from .request_cache import RequestCache
    lm.request_cache = RequestCache(cache, lm.rank) if cache is not None else None
    return lm_eval.simple_evaluate(
        model=lm, tasks=[task], num_fewshot=num_fewshot, limit=limit, log_samples=True,
        apply_chat_template=apply_chat_template, fewshot_as_multiturn=fewshot_as_multiturn,
        task_manager=task_manager, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
        fewshot_random_seed=seed)


def primary_metric(task_results: dict) -> tuple[str, float] | None:
    """The task's accuracy: exact_match after strict-match, else acc, else its first metric."""
    numeric = {k: v for k, v in task_results.items()
               if "," in k and "_stderr" not in k and isinstance(v, (int, float)) and not isinstance(v, bool)}
    for want in ("exact_match,strict-match", "acc,none", "exact_match,none"):
        if want in numeric:
            return want, float(numeric[want])
    return next(iter(numeric.items()), None)


def primary_stderr(task_results: dict, key: str) -> float | None:
    """lm-eval's standard error of the primary metric (`acc,none` -> `acc_stderr,none`), when a number."""
    metric, _, filt = key.partition(",")
    value = task_results.get(f"{metric}_stderr,{filt}")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
