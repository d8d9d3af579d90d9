"""What the MLflow UI shows of a study without anyone configuring it, and its addresses.

MLflow 3's UI keeps a user's columns and the GenAI/model-training switch in the browser (local
storage, which no address or server sets), and opens an experiment on its GenAI overview. What a
project can set is an experiment's *saved views* (tags `mlflow.sharedViewState.<id>`, listed
under "Views" on the runs page, opened by `?viewStateShareKey=<id>`: columns, sort, filter) and the
address's `workflowType`. So every experiment a run or a comparison writes to gets the study's
saved view: the configuration (k, subset, mode, policy, task, limit), the code's commit, the
result (accuracy ± stderr, n, tokens/s, skipped fraction), best first; the addresses the runs
print, and `reuse-exp ui`, open it. Run names carry the configuration and a dirty mark
(tracking/schema.py's run_name). "Override saved view" on the page makes it the browser's own.
"""
from __future__ import annotations

import json
import time
from urllib.parse import quote

VIEW_TAG_PREFIX = "mlflow.sharedViewState."
VIEW_ID = "reuse_exp_study"
VIEW_NAME = "reuse_exp study"
METRICS = ("accuracy", "accuracy_stderr", "tokens_per_second", "skipped_fraction", "n_samples")
PARAMS = ("k", "subset", "mode", "policy", "limit", "task")


def column(kind: str, name: str) -> str:
    """A runs-table column as the UI names it: params.`k`, metrics.`accuracy`, attributes.`Version`."""
    return f"{kind}.`{name}`"


def view_state() -> dict:
    """The saved view's state, in the UI's own fields: the columns (the result, then the commit,
    then the configuration), best accuracy first."""
    columns = [*(column("metrics", m) for m in METRICS), column("attributes", "Version"),
               *(column("params", p) for p in PARAMS)]
    return {"selectedColumns": columns, "columnOrder": columns, "orderByKey": column("metrics", "accuracy"),
            "orderByAsc": False}


def ensure_view(client, experiment_id: str) -> bool:
    """Give the experiment the study's saved view unless it holds it already; True if written."""
    key = VIEW_TAG_PREFIX + VIEW_ID
    state = json.dumps(view_state(), sort_keys=True)
    if _held_state(client.get_experiment(experiment_id).tags.get(key)) == state:
        return False
    envelope = {"name": VIEW_NAME, "createdAt": int(time.time() * 1000), "state": state}
    client.set_experiment_tag(experiment_id, key, json.dumps(envelope))
    return True


def _held_state(value: str | None) -> str | None:
    """The state of a saved view's envelope as the tag holds it (None: no view, or not the UI's)."""
    try:
        return json.loads(value).get("state") if value else None
    except (ValueError, AttributeError):   # not the UI's envelope: ours replaces it
        return None


# `mlflow ui`'s own address (and `reuse-exp ui`'s). The workflow switch opens model training.
UI_ADDRESS = "http://127.0.0.1:5000"
RUNS_VIEW = "workflowType=machine_learning"


def study_address(base: str, experiment_id: str) -> str:
    """The experiment's runs table in the study's saved view."""
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?{RUNS_VIEW}&viewStateShareKey={quote(VIEW_ID)}"


def run_address(base: str, experiment_id: str, run_id: str) -> str:
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}?{RUNS_VIEW}"


def ui_addresses(store: str, experiment_id: str, run_id: str) -> tuple[str | None, str, str]:
    """The command that serves the store's UI (None: a server already does), the run's page,
    and its experiment's runs table in the study's view."""
    serve, base = None, store
    if not store.startswith(("http://", "https://")):
        serve, base = f"reuse-exp ui --store {store}", UI_ADDRESS
    return serve, run_address(base, experiment_id, run_id), study_address(base, experiment_id)
