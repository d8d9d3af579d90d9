"""The policy registry: looked up lazily, filled by this package's policies, installed plug-ins
(entry points, group `reuse_exp.policies`) and REUSE_EXP_POLICY_MODULES; every policy checked
when it registers and when it is built, with one-line errors; and what every registered policy
declares for the grid (its axes, a baseline that never reuses)."""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch

from reuse_exp.engine.policies import BUILTIN, Memory, ReusePolicy, build, get, names, register
from reuse_exp.errors import ConfigError
from reuse_exp.knobs import POLICY_MODULES
from reuse_exp.settings import DEFAULTS, policy_class

# A plug-in's module, as someone else writes it: `{name}`, `{reads}` and `{extra}` filled per test.
PLUGIN = '''
from dataclasses import dataclass
from typing import ClassVar
from reuse_exp.engine.policies import register
from reuse_exp.engine.policies.fixed import Clocked, FixedPolicy
{extra}

@register
@dataclass(frozen=True)
class Plugin(FixedPolicy):
    name: ClassVar[str] = "{name}"
'''


def test_the_registry_knows_the_packages_policies_and_refuses_others():
    assert set(BUILTIN) <= set(names()) and {get(n).name for n in BUILTIN} == set(BUILTIN)
    with pytest.raises(ConfigError) as e:   # every name a lookup finds (a test module may have registered more)
        get("nope")
    assert str(e.value) == f"unknown policy 'nope'; use one of {', '.join(names())}"
    assert ", ".join(sorted(BUILTIN)) in str(e.value)
    from reuse_exp.settings import RunSettings
    assert RunSettings.parse({"policy": "depth"}).policy == "depth"   # the setting takes what the registry has


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_every_policy_declares_its_grid_and_its_baseline_never_reuses(name):
    """A grid varies the policy's axes and measures the rest against its baseline, which must be
    a configuration that reuses nothing: k=1's tokens, bit for bit, and nothing skipped."""
    from reuse_exp.engine.decoding import generate
    from reuse_exp.engine.loading import random_model
    from test_fast_path import FIVE
    from test_reuse import CFG, DEC
    cls = policy_class(name)
    assert cls.axes and set(cls.axes) <= set(cls.reads) and set(cls.baseline) <= set(cls.reads)
    values = {n: cls.baseline.get(n, getattr(DEFAULTS, n)) for n in cls.reads}
    if "mode" in cls.reads and values["mode"] not in getattr(cls, "modes", (values["mode"],)):
        values["mode"] = cls.modes[0]
    model = random_model(CFG, "float32", seed=0, std=0.2)
    base, never = generate(model, FIVE, DEC), generate(model, FIVE, DEC, build(cls, 8, **values))
    assert never.tokens == base.tokens and never.report.skipped_fraction == 0.0


# -- checked when registered, and when built -------------------------------------------------------
@pytest.fixture(autouse=True)
def own_registry(monkeypatch):
    """Probes registered here stay here: the registry is a copy per test."""
    from reuse_exp.engine import policies
    for name in BUILTIN:   # imported once, into the registry every test starts from
        get(name)
    monkeypatch.setattr(policies, "_registry", dict(policies._registry))


class NeverMemory(Memory):
    def decide(self, kind, group, active, clock, drift):
        return torch.zeros_like(active)


class HostMemory:
    """A memory written to the host-side interface the engine no longer has: lists per row."""
    def __init__(self, *_):
        self.refresh_drifts = []

    def decide(self, kind, group, active, clock, drift):
        return [False for _ in active]


class ListMemory(NeverMemory):
    def decide(self, kind, group, active, clock, drift):
        return [False for _ in active]


class CountMemory(NeverMemory):
    def decide(self, kind, group, active, clock, drift):
        return clock.step % 2


class NeedsDriftMemory(NeverMemory):
    def decide(self, kind, group, active, clock, drift):
        return active & (drift > 0)   # a policy that does not measure is given no drift


def policy_class_of(**body) -> type:
    """A frozen dataclass policy with the class attributes `body` (defaults: a complete one)."""
    namespace = {"__annotations__": {"name": ClassVar[str], "reads": ClassVar[tuple], "axes": ClassVar[dict],
                                     "baseline": ClassVar[dict], "k": int, "groups": tuple, "mode": str},
                 "name": "probe", "reads": ("k",), "axes": {"k": (1, 2)}, "baseline": {"k": 1},
                 "create": classmethod(lambda cls, n, k: cls(k=k, groups=((n - 1,),), mode="delta")),
                 "run_name": classmethod(lambda cls, k, **_: f"probe{k}"), "memory": lambda self, state: NeverMemory(self, state),
                 "describe": lambda self: {}, "note": lambda self: "", "__module__": "probe_module"}
    for name, value in body.items():
        if value is None:
            namespace.pop(name)
        else:
            namespace[name] = value
    return dataclass(frozen=True)(type("Probe", (ReusePolicy,), namespace))


@pytest.mark.parametrize("body, message", [
    (dict(memory=None, note=None), "it does not implement memory, note"),
    (dict(reads=["k"]), "reads ['k'] is not a tuple of setting names"),
    (dict(name="Probe Policy"), "name 'Probe Policy' is not a lower-case word"),
    (dict(axes={"drift": (0.0,)}), "its axes name drift, which it does not read"),
    (dict(baseline=None), "it declares no baseline"),
    (dict(axes={"k": ()}), "its axes' values are not non-empty tuples"),
    (dict(memory=lambda self: None), "its memory does not take (self, state)"),
])
def test_a_policy_is_checked_when_it_registers(body, message):
    with pytest.raises(ConfigError) as e:
        register(policy_class_of(**body))
    assert message in str(e.value) and "\n" not in str(e.value) and "probe_module.Probe" in str(e.value)
    assert "probe" not in names()


@pytest.mark.parametrize("memory, message", [
    (HostMemory, "memory(state) made a HostMemory: make a subclass of reuse_exp.engine.policies.Memory"),
    (ListMemory, "decided group 0 of 2 rows with a list: answer a bool tensor [2]"),
    (CountMemory, "decided group 0 of 2 rows with a torch.int64 tensor of shape [2]: answer a bool tensor [2]"),
    (NeedsDriftMemory, "fails a probe decoding call of 2 rows on the CPU: TypeError: '>' not supported")])
def test_a_memory_is_probed_when_the_policy_is_built(memory, message):
    """Before a run opens, on the CPU: a memory of another interface is refused in one line, not
    in the middle of a decode."""
    cls = policy_class_of(memory=lambda self, state: memory(self, state))
    with pytest.raises(ConfigError) as e:
        build(cls, 8, k=2)
    assert message in str(e.value) and str(e.value).startswith("the probe policy") and "\n" not in str(e.value)
    build(policy_class_of(), 8, k=2)   # NeverMemory answers as the engine asks


def test_a_policy_that_is_no_frozen_dataclass_or_carries_no_groups_is_refused():
    class Loose(ReusePolicy):
        name, reads, axes, baseline = "loose", ("k",), {"k": (1,)}, {"k": 1}
    with pytest.raises(ConfigError, match="it is not a frozen dataclass"):
        register(Loose)
    annotations = {"name": ClassVar[str], "reads": ClassVar[tuple], "axes": ClassVar[dict],
                   "baseline": ClassVar[dict], "k": int}
    with pytest.raises(ConfigError, match="it declares no groups or mode"):
        register(policy_class_of(__annotations__=annotations))


@pytest.mark.parametrize("groups, message", [
    (((7, 8),), "the model has layers 0..7"), (((3, 4), (1, 2)), "groups in layer order"),
    (((1, 2), (2, 3)), "each layer once"), ((), "a tuple of non-empty tuples")])
def test_what_create_made_is_checked_when_built(groups, message):
    cls = policy_class_of(create=classmethod(lambda cls, n, k: cls(k=k, groups=groups, mode="delta")))
    with pytest.raises(ConfigError, match=message):
        build(cls, 8, k=2)


def test_what_a_policy_reads_and_its_grid_are_checked_against_the_settings():
    """The first lookup through the settings (the `policy` setting's, a run's, a grid's)."""
    for body, message in ((dict(name="reads_none", reads=("k", "stride_of")), "reads stride_of, which no setting is"),
                          (dict(name="axis_off", reads=("k", "threshold"), axes={"threshold": (0.5,)}),
                           "grid axes threshold: an axis is a reuse setting"),
                          (dict(name="bad_value", axes={"k": (0, 1)}), "declares a value its setting refuses: k=0")):
        register(policy_class_of(**body))
        with pytest.raises(ConfigError, match=message):
            policy_class(body["name"])


# -- found lazily: the package's, installed plug-ins', REUSE_EXP_POLICY_MODULES' ------------------
def install(site: Path, entry_points: dict[str, str], modules: dict[str, str]) -> None:
    """A distribution in `site` declaring `entry_points` (name -> "module:attr"), with `modules`."""
    info = site / "probe_plugins-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: probe-plugins\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[reuse_exp.policies]\n" + "".join(f"{n} = {v}\n" for n, v in
                                                                                entry_points.items()))
    for name, text in modules.items():
        (site / f"{name}.py").write_text(text)


def python(code: str, site: Path, **env) -> subprocess.CompletedProcess:
    path = os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": path, **env},
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """Three installed plug-ins: one that imports reuse_exp.settings first, one that does not load,
    one whose entry point registers another name."""
    site = tmp_path_factory.mktemp("site")
    install(site, {"settled": "settled_policy:Plugin", "broken": "broken_policy:Plugin", "misnamed": "misnamed_policy"},
            {"settled_policy": PLUGIN.format(name="settled", extra="from reuse_exp.settings import RunSettings"),
             "broken_policy": "raise RuntimeError('this plug-in is broken')\n",
             "misnamed_policy": PLUGIN.format(name="other", extra="")})
    return site


def test_an_installed_plug_in_is_found_by_its_entry_point_and_imported_only_when_named(site):
    code = ("import sys; from reuse_exp.settings import RunSettings\n"
            "loaded = lambda: sorted(m for m in sys.modules if m.endswith('_policy') or '.policies.' in m)\n"
            "before = loaded(); s = RunSettings.parse({'policy': 'settled', 'k': 2})\n"
            "from reuse_exp.engine.policies import names\n"
            "print(before, loaded(), s.policy, ','.join(names()))")
    out = python(code, site)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["[]", "['reuse_exp.engine.policies.fixed',", "'settled_policy']", "settled",
                                  "adaptive,broken,depth,fixed,misnamed,settled"]


def test_a_broken_plug_in_or_a_typo_in_the_variable_breaks_only_what_asks_for_it(site):
    typo = {POLICY_MODULES.name: "my_polcies"}
    helped = python("from reuse_exp.cli import main; main(['run', '--help'])", site, **typo)
    assert helped.returncode == 0 and "--policy" in helped.stdout, helped.stderr
    for name, line in (("broken", "policy plug-in broken (broken_policy:Plugin) does not load: RuntimeError: this "
                                  "plug-in is broken"),
                       ("misnamed", "policy plug-in misnamed (misnamed_policy) registered no policy named 'misnamed'"),
                       ("nothing", f"{POLICY_MODULES.name}: cannot import 'my_polcies'")):
        out = python(f"from reuse_exp.cli import main; main(['run', '--policy', '{name}', '--limit', '1'])", site,
                     **typo)
        assert out.returncode == 2 and line in out.stderr and "Traceback" not in out.stderr, out.stderr
    fine = python("from reuse_exp.settings import RunSettings; print(RunSettings.parse({'policy': 'depth'}).policy)",
                  site, **typo)
    assert fine.stdout.strip() == "depth", fine.stderr


def test_the_env_knob_imports_plug_in_modules(tmp_path):
    (tmp_path / "my_policies.py").write_text(PLUGIN.format(name="mine", extra="from reuse_exp.settings import SPECS"))
    code = ("from reuse_exp.settings import RunSettings; from reuse_exp.engine.policies import names; "
            "RunSettings.parse({'policy': 'mine'}); print(','.join(names()))")
    out = python(code, tmp_path, **{POLICY_MODULES.name: " my_policies ,"})
    assert out.stdout.strip() == "adaptive,depth,fixed,mine", out.stderr


@pytest.mark.parametrize("args, line", [
    (["--policy", "adaptive", "--mode", "output"], "the adaptive policy works in mode delta or replay, not 'output'"),
    (["--k", "2", "--subset", "3,99"], "layer index 99 out of range: the model has layers 0..7")])
def test_a_value_the_policy_refuses_leaves_no_run(tmp_path, args, line):
    """Built before the run opens (the bundled model's depth read from its config.json): refused as
    a typo is, with one line, and nothing in the store."""
    import mlflow
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = python(f"from reuse_exp.cli import main; main(['run', *{args!r}, '--limit', '1', '--allow-dirty', 'true'])",
                 tmp_path, MLFLOW_TRACKING_URI=store)
    assert out.returncode == 2 and "Traceback" not in out.stderr and line in out.stderr, out.stderr
    client = mlflow.MlflowClient(store)
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []


def test_a_cell_matches_only_runs_that_the_same_settings_shaped():
    """A cell passes only what shapes it, so a run that agrees with all it passes may still have
    been shaped by more: a policy that drops `mode` from `computes` in replay mode leaves an
    output-mode run agreeing with the replay cell on every value the cell passes."""
    from reuse_exp.engine.policies.fixed import FixedPolicy
    from reuse_exp.study.cells import make_cell
    from reuse_exp.study.store import RunRecord
    from services.fabricate import PARAMS

    @register
    @dataclass(frozen=True)
    class ModeBlind(FixedPolicy):
        name: ClassVar[str] = "mode_blind"

        @classmethod
        def computes(cls, k, mode="output", **_):
            return ("k",) if k == 1 or mode == "replay" else cls.reads

    values = {**DEFAULTS.as_dict(), "policy": "mode_blind", "k": 2, "mode": "replay", "limit": 4}
    values = {n: v for n, v in values.items() if n not in ("experiment", "include_path")}
    cell = make_cell(values)
    assert "mode" not in cell.as_dict()
    run = lambda mode: RunRecord("r", "FINISHED", 0, {**PARAMS, "policy": "mode_blind", "k": "2", "mode": mode}, {}, {})  # noqa: E731
    assert cell.matches(run("replay")) and not cell.matches(run("output"))
