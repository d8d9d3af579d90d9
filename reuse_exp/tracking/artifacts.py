"""The artifacts of a finished run: lm-eval's results and samples, the compact per-sample
records and per-batch timings, the generations, the reuse trace, the installed packages and
the study's summary.json."""
from __future__ import annotations

import json

from .schema import config_name, param_str, pip_freeze


def log_artifacts(tracker, s, results, samples, lm, stats, metrics, params, primary, kind) -> None:
    """`stats`: the HarnessStats of every rank's shard together (the model's own in one process)."""
    from lm_eval.utils import handle_non_serializable

    from ..evaluation.stats import repeats_of, sample_records
    tags = tracker.client.get_run(tracker.run_id).data.tags
    tracker.artifact_text("lm_eval_results.json",
                          json.dumps(results, indent=2, default=handle_non_serializable) + "\n")
    for task, rows in samples.items():
        tracker.artifact_text(f"samples_{task}.jsonl", "".join(
            json.dumps(r, default=handle_non_serializable) + "\n" for r in rows))
    # in document order: the same file whatever order decoding (or a resume's cache) gave them
    tracker.artifact_jsonl("generations.jsonl", sorted(stats.generations, key=_document))
    # what `compare` pairs by document and bootstraps over, without parsing lm-eval's samples
    tracker.artifact_jsonl("per_sample.jsonl", sample_records(samples, primary[0] if primary else None,
                                                              repeats_of(results)))
    tracker.artifact_json("timings.json", stats.timings())
    policy = {"policy": lm.policy.name, **lm.policy.describe()}
    tracker.artifact_json("reuse_trace.json", {"policy": policy, **stats.trace()})
    tracker.artifact_text("pip_freeze.txt", pip_freeze())
    tracker.artifact_json("summary.json", {
        "config": config_name(s),
        "task": s.task, "task_kind": kind, "k": s.k, "subset": policy.get("subset"), "policy": s.policy,
        "layers": list(lm.policy.layers), "mode": lm.policy.mode,
        "accuracy": metrics.get("accuracy"), "accuracy_metric": primary[0] if primary else None,
        "tokens_per_second": metrics.get("tokens_per_second"), "generated_tokens": metrics.get("generated_tokens"),
        "total_time_seconds": metrics.get("seconds"), "wall_seconds": metrics.get("wall_seconds"),
        "skipped_fraction": metrics.get("skipped_fraction"), "tokens_per_forward": metrics.get("tokens_per_forward"),
        "commit": tags.get("git_commit"), "dirty": tags.get("git_dirty") == "true",
        "config_key": tags.get("config_key"), "mlflow_run_id": tracker.run_id,
        "params": {k: param_str(v) for k, v in params.items()}, "metrics": metrics})


def _document(generation: dict) -> tuple:
    doc = generation.get("doc_id")
    return str(generation.get("task")), doc if isinstance(doc, int) else -1, str(doc)
