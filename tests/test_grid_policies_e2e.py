"""Which settings shape a run is decided once (tracking/schema.py's `shaping_settings`, from the
settings' flags and the policy's `computes`), and the run's key, the grid's cells, compare,
resume and the audit all ask it. Checked on a store of real runs: for every built-in policy in
every mode it takes, `grid run` then `compare` with the same options makes the table against the
policy's own baseline, and a baseline that computes the same in every mode (k=1) is run once.
The bundled model, one document, one block per run."""
from __future__ import annotations

import re

import pytest
from click.testing import CliRunner

from reuse_exp.engine.policies import BUILTIN, build
from reuse_exp.engine.reuse import MODES
from reuse_exp.errors import ConfigError
from reuse_exp.settings import DEFAULTS, RunSettings, policy_class, spec, to_text

pytestmark = pytest.mark.slow
SMALL = ["--limit", "1", "-P", "max_new_tokens=32"]


def grids() -> list[tuple[str, str, dict[str, str]]]:
    """(policy, mode, its axes' values) per built-in policy and mode it takes: its first axis at
    the baseline and the next value it declares, every other axis at its first value."""
    out = []
    for name in sorted(BUILTIN):
        cls = policy_class(name)
        axes, point = {}, {}
        for i, (axis, values) in enumerate(cls.axes.items()):
            base = cls.baseline.get(axis)
            picked = [base, next(v for v in values if v != base)] if i == 0 and base is not None else list(values[:1])
            axes[axis], point[axis] = ",".join(map(to_text, picked)), picked[-1]
        for mode in MODES:
            try:
                build(cls, 8, **{n: getattr(DEFAULTS, n) for n in cls.reads} | point | {"mode": mode})
            except ConfigError:
                continue   # a mode it refuses (adaptive: output)
            out.append((name, mode, axes))
    return out


def options(policy: str, mode: str, axes: dict[str, str]) -> list[str]:
    return ["--task", "tiny_gsm", "-P", f"policy={policy}", "--mode", mode,
            *(a for n, v in axes.items() for a in (spec(n).option, v)), *SMALL]


def cell_names(policy: str, mode: str, axes: dict[str, str]) -> list[str]:
    from reuse_exp.study.cells import build_request
    request = build_request("tiny_gsm", limit=1, params=(f"policy={policy}", "max_new_tokens=32"), mode=mode, **axes)
    return [c.name for c in request.cells("generate_until")]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """Every grid run, then compared, in one store, from a clean checkout."""
    from reuse_exp.cli.study import compare_cmd
    from services.checkout import clean_checkout
    tmp = tmp_path_factory.mktemp("policies")
    repo = clean_checkout(tmp / "repo")
    store = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}", "MLFLOW_EXPERIMENT_NAME": "policies"}
    env = repo.env(**store)
    out = {}
    for policy, mode, axes in grids():
        ran = repo.cli(["grid", "run", *options(policy, mode, axes), "--jobs-dir", str(tmp / "jobs")], env)
        # the runs share two cores with the suite: their speed is not what this checks
        table = CliRunner(env=store).invoke(compare_cmd, [*options(policy, mode, axes), "--commit", repo.head,
                                                          "--no-log", "--allow-contended"])
        out[policy, mode] = (ran, table)
    return {"repo": repo, "uri": store["MLFLOW_TRACKING_URI"], "head": repo.head, "grids": out}


def test_every_policy_and_mode_it_takes_has_a_grid():
    assert {(p, m) for p, m, _ in grids()} == {("fixed", "output"), ("fixed", "delta"), ("fixed", "replay"),
                                               ("adaptive", "delta"), ("adaptive", "replay"), ("depth", "delta")}


def test_grid_run_then_compare_with_the_same_options_makes_the_table(study):
    for policy, mode, axes in grids():
        ran, table = study["grids"][policy, mode]
        assert ran.returncode == 0, (policy, mode, ran.stdout + ran.stderr)
        assert table.exit_code == 0, (policy, mode, table.output)
        names = cell_names(policy, mode, axes)
        rows = {}
        for line in table.output.split("\nruns:")[0].splitlines():   # the table, not the list of runs under it
            if line.split() and (name := line.split()[0].rstrip("*")) in names:   # *: its timing was contended
                rows[name] = line
        assert list(rows) == names and len(names) == 2, (policy, mode, table.output)
        assert "baseline" in rows[names[0]] and re.search(r" (\d+\.\d\dx\??|~1 \(noise\)) ", rows[names[1]]), \
            table.output   # a speed ratio against the baseline
        assert f"{names[0]} is the baseline" in table.output and "missing" not in table.output
    fixed = {m: study["grids"]["fixed", m][0].stdout for m in ("output", "delta", "replay")}
    assert "[1/2] k1_any" in fixed["output"] and "skip k1_any: done" in fixed["delta"], fixed
    assert "skip k1_any: done" in fixed["replay"] and "k2_any" in fixed["replay"]   # replay computes no subset
    adaptive = {m: study["grids"]["adaptive", m][0].stdout for m in ("delta", "replay")}
    assert all("[1/2] drift0" in out for out in adaptive.values()), adaptive   # drift 0 costs differ by mode


def runs(study):
    import mlflow

    from reuse_exp.study.store import fetch_runs
    cl = mlflow.MlflowClient(study["uri"])
    return cl, fetch_runs(cl, cl.get_experiment_by_name("policies").experiment_id)


def test_the_run_key_follows_what_shapes_the_run(study):
    from reuse_exp.tracking.schema import config_key
    _, found = runs(study)
    assert len(found) == 10   # k1 once for three modes; adaptive's drift 0 once per mode
    for r in found:
        params = {**r.params, "device_type": "cpu"}
        assert config_key(params) == r.tags["config_key"], r.params   # the key is the logged params' own
        other_mode = config_key({**params, "mode": "delta" if params["mode"] != "delta" else "output"})
        assert (other_mode == r.tags["config_key"]) == (r.params["policy"] == "fixed" and r.params["k"] == "1")


def test_the_audit_finds_one_grid_per_mode_each_holding_the_shared_baseline(study):
    from reuse_exp.study.audit import audit, newest_cells
    _, found = runs(study)
    assert audit(found) == []
    by_policy = {}
    for cells in newest_cells(found).values():
        policy = next(iter(cells.values())).params["policy"]
        by_policy.setdefault(policy, []).append(sorted(cells))
    assert len(by_policy["fixed"]) == 3 and all(len(c) == 2 for c in by_policy["fixed"])
    k1 = (("k", "1"), ("subset", "any"))
    assert all(k1 in cells for cells in by_policy["fixed"])
    assert len(by_policy["adaptive"]) == 2 and len(by_policy["depth"]) == 1


def test_resume_compares_what_shapes_the_run(study):
    """An interrupted k=1 run resumes under any mode (it computes the same), not at another k; an
    adaptive run at drift 0 under any cap on reuses in a row."""
    from reuse_exp.runner import resume
    cl, found = runs(study)
    k1 = next(r for r in found if r.params["policy"] == "fixed" and r.params["k"] == "1")
    drift0 = next(r for r in found if r.params["policy"] == "adaptive" and float(r.params["drift"]) == 0
                  and r.params["mode"] == "delta")
    base = dict(task="tiny_gsm", limit=1, max_new_tokens=32)
    for r in (k1, drift0):
        cl.set_terminated(r.run_id, "KILLED")   # as an interrupted run ends
    try:
        resume.check(cl, RunSettings(**base, k=1, mode="replay", resume=k1.run_id), study["head"], False)
        with pytest.raises(ConfigError, match="it ran with k=1; this run has k=2"):
            resume.check(cl, RunSettings(**base, k=2, resume=k1.run_id), study["head"], False)
        adaptive = dict(base, policy="adaptive", mode="delta", drift=0.0, resume=drift0.run_id)
        resume.check(cl, RunSettings(**adaptive, max_reuse=8), study["head"], False)
        with pytest.raises(ConfigError, match="it ran with drift=0.0; this run has drift=0.5"):
            resume.check(cl, RunSettings(**{**adaptive, "drift": 0.5}), study["head"], False)
    finally:
        for r in (k1, drift0):
            cl.set_terminated(r.run_id, "FINISHED")
