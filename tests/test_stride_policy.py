"""A policy no package file knows, written from docs/architecture.md's "A new reuse policy" alone:
groups of layers recompute on a stride that grows with depth (at k=3, on 8 layers: groups
(1, 2), (3, 4), (5, 6), (7,) recompute every 1, 2, 2 and 3 small-block steps).

It is this one file. Installed as a plug-in is, through the entry point group
`reuse_exp.policies` of a distribution made in a temp dir, it goes through `reuse-exp run`,
`mlflow run`, `grid run` and `compare` into MLflow; in process, through the tests every policy
has, and the fast path at batch > 1."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

import pytest
import torch

from reuse_exp.engine.model import ForwardKind
from reuse_exp.engine.policies import Memory, ReusePolicy, register
from reuse_exp.engine.policies.drift import layer_groups
from reuse_exp.errors import ConfigError


# -- the policy ------------------------------------------------------------------------------------
@register
@dataclass(frozen=True)
class Stride(ReusePolicy):
    """Layer group g of n recomputes every 1 + round(g (k - 1) / (n - 1)) small-block steps."""
    name: ClassVar[str] = "stride"
    reads: ClassVar[tuple[str, ...]] = ("k", "mode")
    axes: ClassVar[dict[str, tuple]] = {"k": (1, 2, 3)}
    baseline: ClassVar[dict[str, object]] = {"k": 1}
    k: int
    strides: tuple[int, ...]
    groups: tuple[tuple[int, ...], ...]
    mode: str = "delta"

    @classmethod
    def create(cls, num_layers: int, *, k: int, mode: str) -> "Stride":
        if mode not in ("output", "delta"):
            raise ConfigError(f"the stride policy works in mode output or delta, not {mode!r}")
        groups = layer_groups(num_layers)
        last = max(1, len(groups) - 1)
        return cls(k=k, strides=tuple(1 + round(g * (k - 1) / last) for g in range(len(groups))), groups=groups,
                   mode=mode)

    @classmethod
    def computes(cls, k, **_) -> tuple[str, ...]:
        return ("k",) if k == 1 else cls.reads   # every stride is 1: nothing reuses, in any mode

    @classmethod
    def run_name(cls, k, mode, **_) -> str:
        return "stride1" if k == 1 else f"stride{k}_{mode}"

    @property
    def reuses(self) -> bool:
        return self.k > 1

    def memory(self, state) -> "StrideMemory":
        return StrideMemory(self, state)

    def describe(self) -> dict:
        return {"k": self.k, "strides": list(self.strides), "groups": [list(g) for g in self.groups], "mode": self.mode}

    def note(self) -> str:
        return f"stride ({self.mode} mode): groups {[list(g) for g in self.groups]} recompute every {list(self.strides)}"


class StrideMemory(Memory):
    """Remembers nothing: each row's step counter decides (on the device, as the engine asks)."""

    def decide(self, kind, group, active, clock, drift) -> torch.Tensor:
        if kind is not ForwardKind.SMALL_BLOCK:
            return torch.zeros_like(active)
        return active & (clock.step % self.policy.strides[group] != 0)


# -- the tests every policy has, in process ------------------------------------------------------
@pytest.fixture(scope="module")
def model():
    from reuse_exp.engine.loading import random_model
    from test_reuse import CFG
    return random_model(CFG, "float32", seed=0, std=0.2)


def stride(k: int) -> Stride:
    from reuse_exp.settings import policy_class
    from reuse_exp.engine.policies import build
    return build(policy_class("stride"), 8, k=k, mode="delta")


def test_its_strides_grow_with_depth_and_k1_decodes_what_no_reuse_decodes(model):
    from reuse_exp.engine.decoding import generate
    from test_fast_path import FIVE
    from test_reuse import DEC
    assert stride(3).strides == (1, 2, 2, 3) and stride(3).groups == ((1, 2), (3, 4), (5, 6), (7,))
    base, never = generate(model, FIVE, DEC), generate(model, FIVE, DEC, stride(1))
    assert never.tokens == base.tokens and never.report.skipped_fraction == 0.0


def test_a_group_skips_where_its_stride_says_and_a_skipped_layer_is_not_computed(model):
    from reuse_exp.engine.decoding import generate
    from test_reuse import DEC, PROMPTS, LayerCalls
    policy, calls = stride(3), LayerCalls(model)
    try:
        res = generate(model, [PROMPTS[0]], DEC, policy, trace_sample=0)
    finally:
        calls.close()
    assert len(res.report.trace) == len(calls.per_forward)
    for rec, ran in zip(res.report.trace, calls.per_forward):
        due = [] if rec["kind"] != "small_block" else [
            i for g, s in zip(policy.groups, policy.strides) if rec["step"] % s for i in g]
        assert rec["skipped"] == due and sorted(set(range(8)) - set(ran)) == due, rec
    sizes = {len(r["skipped"]) for r in res.report.trace}
    assert {1, 4} <= sizes, f"the deep group (1 layer) and the middle ones (4) skip apart: {sizes}"


@pytest.mark.parametrize("path", ["eager", "fast"])
def test_batch_equals_solo_and_the_fast_path_decodes_eager_tokens_at_batch_5(model, path):
    """decode_path=fast on CPU is the static path the GPU captures in graphs; its groups'
    computing rows differ within a batch (rows sit at different steps)."""
    from reuse_exp.engine.decoding import generate
    from reuse_exp.evaluation.models import make_runner
    from test_fast_path import FIVE
    from test_reuse import DEC
    cfg, policy = replace(DEC, ignore_stop=True), stride(3)
    eager = generate(model, FIVE, cfg, policy)
    batch = generate(model, FIVE, cfg, policy, runner=make_runner(model, path))
    assert batch.tokens == eager.tokens
    assert [s.layer_evals_skipped for s in batch.report.samples] == [s.layer_evals_skipped for s in eager.report.samples]
    longest = max(len(p) for p in FIVE) // 32
    for i, p in enumerate(FIVE):
        solo = generate(model, [p], replace(cfg, max_new_tokens=cfg.max_new_tokens + 32 * (longest - len(p) // 32)),
                        policy, runner=make_runner(model, path))
        assert batch.tokens[i] == solo.tokens[0], f"sample {i}"
    assert batch.report.skipped_fraction > 0


# -- installed as a plug-in, end to end ------------------------------------------------------------
def installed(site: Path) -> None:
    """A distribution that declares this file's policy under the entry point group, as pip would
    install it (its .dist-info on the path)."""
    info = site / "stride_policy-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: stride-policy\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[reuse_exp.policies]\nstride = {Path(__file__).stem}:Stride\n")


@pytest.mark.slow
def test_a_plug_in_policy_runs_through_run_mlflow_run_grid_and_compare(tmp_path):
    import mlflow
    from click.testing import CliRunner

    from conftest import mlflow_run
    from reuse_exp.cli.study import compare_cmd
    from services.checkout import clean_checkout
    repo = clean_checkout(tmp_path / "repo")
    installed(tmp_path / "site")
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    path = os.pathsep.join([str(repo.root), str(tmp_path / "site"), str(repo.root / "tests")])
    env = repo.env(MLFLOW_TRACKING_URI=store, MLFLOW_EXPERIMENT_NAME="stride", PYTHONPATH=path)
    small = ["--limit", "1", "--max-new-tokens", "32", "--mode", "delta"]

    one = repo.cli(["run", "--policy", "stride", "--k", "3", *small], env)
    assert one.returncode == 0, one.stdout + one.stderr
    two = mlflow_run(repo.root, store, {"policy": "stride", "k": 2, "limit": 1, "max_new_tokens": 32, "mode": "delta"},
                     env={"MLFLOW_EXPERIMENT_NAME": "stride", "PYTHONPATH": path})
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]
    grid = ["--task", "tiny_gsm", "-P", "policy=stride", "--k", "1,2,3", "--limit", "1", "-P", "max_new_tokens=32",
            "--mode", "delta"]
    ran = repo.cli(["grid", "run", *grid, "--jobs-dir", str(tmp_path / "jobs")], env)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "skip k2: done" in ran.stdout and "skip k3: done" in ran.stdout and "[1/1] k1" in ran.stdout, ran.stdout
    table = CliRunner(env={"MLFLOW_TRACKING_URI": store, "MLFLOW_EXPERIMENT_NAME": "stride"}).invoke(
        compare_cmd, [*grid, "--commit", repo.head, "--no-log", "--allow-contended"])   # speed is not checked here
    assert table.exit_code == 0, table.output
    rows = {line.split()[0].rstrip("*"): line for line in table.output.splitlines() if line.startswith("k")}
    assert set(rows) == {"k1", "k2", "k3"} and "baseline" in rows["k1"] and "k1 is the baseline" in table.output
    assert all("missing" not in r for r in rows.values()) and "vs k=1" in table.output

    client = mlflow.MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("stride").experiment_id])
    by_name = {r.data.tags["mlflow.runName"]: r for r in runs}
    assert set(by_name) == {"stride3_delta_tiny_gsm", "stride2_delta_tiny_gsm", "stride1_tiny_gsm"}
    for name, run in by_name.items():
        k = int(name[6])
        assert run.info.status == "FINISHED" and run.data.tags["git_commit"] == repo.head
        made = Stride.create(8, k=k, mode=run.data.params["mode"])   # k=1 was given no mode: the run's
        trace = json.loads(Path(client.download_artifacts(run.info.run_id, "reuse_trace.json")).read_text())
        assert trace["policy"] == {"policy": "stride", **made.describe()}
        assert run.data.tags["reuse_note"] == made.note()
        assert (run.data.metrics["skipped_fraction"] > 0) == (k > 1), (name, run.data.metrics)
