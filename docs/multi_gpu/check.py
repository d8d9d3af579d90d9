"""Checks behind docs/multi-gpu.md, read from the MLflow store the device run wrote.

    python docs/multi_gpu/check.py same EXPERIMENT   # the 1-rank and the 2-rank run: outputs, tokens/s
    python docs/multi_gpu/check.py gpus EXPERIMENT   # a grid's runs: which GPU each had, and when
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import mlflow


def runs(experiment: str):
    cl = mlflow.MlflowClient()
    exp = cl.get_experiment_by_name(experiment)
    return cl, cl.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])


def outputs(cl, run) -> tuple[dict, dict]:
    """Per document: lm-eval's filtered responses, and the raw generated text."""
    by_doc, raw = {}, {}
    for art in cl.list_artifacts(run.info.run_id):
        if art.path.startswith("samples_"):
            for line in Path(cl.download_artifacts(run.info.run_id, art.path)).read_text().splitlines():
                row = json.loads(line)
                by_doc.setdefault(row["doc_id"], {})[row["filter"]] = row["filtered_resps"]
    for line in Path(cl.download_artifacts(run.info.run_id, "generations.jsonl")).read_text().splitlines():
        g = json.loads(line)
        raw[g["doc_id"]] = g["raw"]
    return by_doc, raw


def same(experiment: str) -> int:
    cl, found = runs(experiment)
    by_world = {r.data.params.get("world_size"): r for r in found if r.info.status == "FINISHED"}
    one, two = by_world["1"], by_world["2"]
    for r in (one, two):
        m, p, t = r.data.metrics, r.data.params, r.data.tags
        print(f"world_size={p['world_size']} run {r.info.run_id} devices: {t.get('rank_devices')}")
        print(f"  generated_tokens={m['generated_tokens']:.0f} seconds={m['seconds']:.2f} "
              f"tokens_per_second={m['tokens_per_second']:.2f} accuracy={m.get('accuracy')}")
        for rank in range(int(p["world_size"])):
            if f"rank{rank}/tokens_per_second" in m:
                print(f"  rank {rank}: generated_tokens={m[f'rank{rank}/generated_tokens']:.0f} "
                      f"seconds={m[f'rank{rank}/seconds']:.2f} tokens_per_second={m[f'rank{rank}/tokens_per_second']:.2f}")
        gpu = {k: round(v, 1) for k, v in m.items() if k.startswith(("gpu_", "torch_peak")) or "/gpu_" in k}
        print(f"  gpu: {gpu}")
    speedup = two.data.metrics["tokens_per_second"] / one.data.metrics["tokens_per_second"]
    print(f"2-GPU over 1-GPU tokens/s: {speedup:.3f}x")
    a, b = outputs(cl, one), outputs(cl, two)
    docs = sorted(a[0])
    equal = a == b
    print(f"per-sample outputs of {len(docs)} documents (filtered responses and raw text) equal byte for byte: {equal}")
    for d in docs:
        if a[1].get(d) != b[1].get(d):
            print(f"  doc {d} differs")
    return 0 if equal else 1


def gpus(experiment: str) -> int:
    _, found = runs(experiment)
    spans = []
    for r in found:
        gpu = r.data.tags.get("cuda_visible_devices")
        spans.append((r.info.start_time, r.info.end_time or 0, gpu, r.data.tags.get("mlflow.runName"),
                      r.data.params.get("resolved_device"), r.info.status))
        print(f"{r.data.tags.get('mlflow.runName')}: {r.info.status} CUDA_VISIBLE_DEVICES={gpu} "
              f"device={r.data.params.get('resolved_device')} {r.data.tags.get('device_name')} "
              f"start={r.info.start_time} end={r.info.end_time}")
    ok = all(s[5] == "FINISHED" and s[4].startswith("cuda") for s in spans)
    peak, clash = 0, False
    for s in spans:
        during = [o for o in spans if o[0] < s[1] and s[0] < o[1]]   # overlapping s, itself included
        peak = max(peak, len(during))
        clash |= len({o[2] for o in during}) < len(during)
    print(f"{len(spans)} runs, all FINISHED on a GPU: {ok}; at most {peak} at once; "
          f"two at once on one GPU: {clash}")
    return 0 if ok and not clash else 1


if __name__ == "__main__":
    sys.exit({"same": same, "gpus": gpus}[sys.argv[1]](sys.argv[2]))
