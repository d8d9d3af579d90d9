"""A policy no package file knows: defined here, registered through the public registry, and
run end to end (`reuse-exp run` into MLflow, a grid cell, `compare`) by subprocesses that
import this module through REUSE_EXP_POLICY_MODULES."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch

from reuse_exp.engine.model import ForwardKind
from reuse_exp.engine.policies import Memory, ReusePolicy, register
from reuse_exp.knobs import POLICY_MODULES

HERE = Path(__file__).resolve().parent


@register
@dataclass(frozen=True)
class Toy(ReusePolicy):
    """Skip the top layer (delta mode) on every small-block step but each k-th."""
    name: ClassVar[str] = "toy"
    reads: ClassVar[tuple[str, ...]] = ("k",)
    k: int
    groups: tuple[tuple[int, ...], ...]
    mode: str = "delta"

    @classmethod
    def create(cls, num_layers: int, *, k: int) -> "Toy":
        return cls(k=k, groups=((num_layers - 1,),))

    @classmethod
    def run_name(cls, k, **_) -> str:
        return f"toy{k}"

    @property
    def reuses(self) -> bool:
        return self.k > 1

    def memory(self, state) -> "ToyMemory":
        return ToyMemory(self, state)

    def describe(self) -> dict:
        return {"k": self.k, "layers": list(self.layers)}

    def note(self) -> str:
        return f"toy: the top layer reuses but every {self.k}-th small-block step"


class ToyMemory(Memory):
    def decide(self, kind, group, active, clock, drift):
        if kind is not ForwardKind.SMALL_BLOCK:
            return torch.zeros_like(active)
        return active & (clock.step % self.policy.k != 0)


def test_the_toy_decodes_and_skips_in_process():
    from reuse_exp.engine.decoding import generate
    from reuse_exp.engine.fast import FastRunner
    from reuse_exp.engine.loading import random_model
    from reuse_exp.engine.policies import get
    from test_reuse import CFG, DEC, PROMPTS
    model = random_model(CFG, "float32", seed=0, std=0.2)
    policy = get("toy").create(8, k=2)
    eager = generate(model, PROMPTS, DEC, policy)
    assert eager.report.skipped_fraction > 0
    assert generate(model, PROMPTS, DEC, policy, runner=FastRunner(model)).tokens == eager.tokens


@pytest.mark.slow
def test_a_plug_in_policy_runs_end_to_end(tmp_path):
    import mlflow

    from conftest import REPO, run_cli, subprocess_env
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = subprocess_env(store) | {
        POLICY_MODULES.name: "test_policy_plugin", "OMP_NUM_THREADS": "1", "MLFLOW_EXPERIMENT_NAME": "toy",
        "PYTHONPATH": os.pathsep.join([str(REPO), str(HERE), os.environ.get("PYTHONPATH", "")])}
    small = ["--limit", "2", "--max-new-tokens", "32"]

    one = run_cli(["run", "--policy", "toy", "--k", "3", "--allow-dirty", "true", *small], env, REPO)
    assert one.returncode == 0, one.stdout + one.stderr
    grid = run_cli(["grid", "run", "--task", "tiny_gsm", "--k", "1,2", "--subset", "first", "--limit", "2",
                    "-P", "max_new_tokens=32", "-P", "policy=toy", "--allow-dirty"], env, REPO)
    assert grid.returncode == 0, grid.stdout + grid.stderr
    table = run_cli(["compare", "--task", "tiny_gsm", "--k", "1,2", "--subset", "first", "--limit", "2",
                     "-P", "max_new_tokens=32", "-P", "policy=toy", "--include-dirty", "--no-log"], env, REPO)
    assert table.returncode == 0, table.stdout + table.stderr
    assert "k2_first" in table.stdout or "k=2" in table.stdout, table.stdout

    client = mlflow.MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("toy").experiment_id])
    by_name = {r.data.tags["mlflow.runName"]: r for r in runs}
    assert set(by_name) == {"toy3_tiny_gsm", "toy2_tiny_gsm", "toy1_tiny_gsm"}
    for name, run in by_name.items():
        k = int(name[3])
        assert run.info.status == "FINISHED" and run.data.params["policy"] == "toy"
        trace = json.loads(Path(client.download_artifacts(run.info.run_id, "reuse_trace.json")).read_text())
        assert trace["policy"] == {"policy": "toy", **Toy.create(8, k=k).describe()}
        assert run.data.tags["reuse_note"] == Toy.create(8, k=k).note()
        assert (run.data.metrics["skipped_fraction"] > 0) == (k > 1), (name, run.data.metrics)
