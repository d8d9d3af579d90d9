"""Which data a run read: per task, lm-eval's task version, a hash of its configuration and a
digest of the documents actually evaluated, logged as tags and as MLflow datasets (the UI's
Datasets column shows them).

A changed task YAML, another revision of the data set in the hub cache or an lm-eval upgrade
that rewrites a prompt leave the run's settings (and config key) as they were; these change.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

PREFIX = "data."              # tags data.<task>.version / .config_hash / .digest
DATA_DIGEST_TAG = "data_digest"   # every task's fingerprint in one value: what the grid compares
# Where the task's YAML was read from: a snapshot of the same commit elsewhere reads the same task.
UNHASHED = ("config_source",)
# How PostgreSQL, MySQL and SQLite say an insert hit an existing key.
UNIQUE_VIOLATION = re.compile(r"UniqueViolation|duplicate key|Duplicate entry|UNIQUE constraint failed")


@dataclass(frozen=True)
class TaskData:
    task: str
    version: str
    config_hash: str     # lm-eval's task configuration as it ran (prompt templates, filters, splits)
    digest: str          # the evaluated documents: ids, document, prompt and target, as lm-eval hashed them
    documents: int
    config: dict

    def tags(self) -> dict[str, str]:
        p = f"{PREFIX}{self.task}."
        return {p + "version": self.version, p + "config_hash": self.config_hash, p + "digest": self.digest}


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def config_hash(config: dict) -> str:
    cfg = {**config, "metadata": {k: v for k, v in (config.get("metadata") or {}).items() if k not in UNHASHED}}
    return _sha(json.dumps(cfg, sort_keys=True, default=str))


def documents_digest(rows: list[dict]) -> tuple[str, int]:
    """One digest of the documents lm-eval built its requests from (one row per document and
    filter in its samples): each document's id and lm-eval's hashes of its text, first prompt
    and target."""
    docs = sorted({(int(r["doc_id"]), r.get("doc_hash", ""), r.get("prompt_hash", ""), r.get("target_hash", ""))
                   for r in rows})
    return _sha(json.dumps(docs)), len(docs)


def fingerprint(results: dict, samples: dict) -> list[TaskData]:
    """Every task lm-eval evaluated (a group's subtasks each), from its results and samples."""
    out = []
    for task, rows in sorted(samples.items()):
        config = results.get("configs", {}).get(task, {})
        digest, n = documents_digest(rows)
        out.append(TaskData(task, str(results.get("versions", {}).get(task, "none")), config_hash(config),
                            digest, n, config))
    return out


def tags(tasks: list[TaskData]) -> dict[str, str]:
    combined = _sha(json.dumps([(t.task, t.version, t.config_hash, t.digest) for t in tasks]))
    return {k: v for t in tasks for k, v in t.tags().items()} | {DATA_DIGEST_TAG: combined}


def describe(task_tags: dict, other: dict | None = None) -> str:
    """A run's data, for a line that says how two runs' data differ: `tiny_gsm documents 3c4d5e`
    (against `other`'s tags, only what differs from it; else version, config and documents)."""
    fields = (("version", "v{}"), ("config_hash", "config {:.6}"), ("digest", "documents {:.6}"))
    tasks = sorted({k[len(PREFIX):].rsplit(".", 1)[0] for k in task_tags if k.startswith(PREFIX)})
    parts = []
    for t in tasks:
        mine = {f: task_tags.get(f"{PREFIX}{t}.{f}", "?") for f, _ in fields}
        theirs = {f: (other or {}).get(f"{PREFIX}{t}.{f}") for f, _ in fields}
        shown = [fmt.format(mine[f]) for f, fmt in fields if other is None or mine[f] != theirs[f]]
        parts.append(" ".join([t, *(shown or [fmt.format(mine[f]) for f, fmt in fields])]))
    return "; ".join(parts) or "no data record"


def log_datasets(client, run_id: str, tasks: list[TaskData]) -> None:
    """Each task as an MLflow dataset whose digest is its documents' digest."""
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag
    inputs = []
    for t in tasks:
        source = CodeDatasetSource({k: str(v) for k, v in {
            "lm_eval_task": t.task, "version": t.version, "config_hash": t.config_hash, "documents": t.documents,
            "dataset_path": t.config.get("dataset_path") or str(t.config.get("custom_dataset", ""))[:200],
            "dataset_name": t.config.get("dataset_name"), "split": t.config.get("test_split"),
            "revision": (t.config.get("dataset_kwargs") or {}).get("revision")}.items() if v is not None})
        dataset = MetaDataset(source, name=t.task, digest=t.digest)
        inputs.append(DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", "eval")]))
    for attempt in range(3):
        try:
            client.log_inputs(run_id, datasets=inputs)
            return
        except Exception as e:
            # MLflow's SQL store looks for the dataset, then inserts it: two runs logging the same
            # new dataset at once both insert, and one fails on the key. Its transaction rolled
            # back whole; on a retry it finds the other's row and links to it.
            if attempt == 2 or not UNIQUE_VIOLATION.search(str(e)):
                raise
