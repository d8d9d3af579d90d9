"""One declaration of every run setting: MLproject, the README, the CLI and the lm-eval model agree with it."""
import re
from pathlib import Path

import click
import pytest
import yaml

from reuse_exp.cli import run as run_cmd
from reuse_exp.evaluation.lm import MODEL_ARGS
from reuse_exp.cli.declared_files import readme_table
from reuse_exp.settings import DEFAULTS, MODEL, SPECS, RunSettings, SettingError, spec

REPO = Path(__file__).resolve().parents[1]
README_TABLE = re.compile(r"<!-- settings-table -->\n(.*?)<!-- /settings-table -->", re.S)


def mlproject_problems(text: str) -> list[str]:
    """What in an MLproject text disagrees with the declaration: names, types, defaults, command."""
    entry = yaml.safe_load(text)["entry_points"]["main"]
    params, command = entry["parameters"], entry["command"]
    declared = {s.name: s for s in SPECS if s.mlproject}
    problems = [f"{n}: in MLproject, not a setting" for n in params if n not in declared]
    for name, s in declared.items():
        p = params.get(name)
        if p is None:
            problems.append(f"{name}: missing from MLproject")
            continue
        if p.get("type") != s.mlproject_type:
            problems.append(f"{name}: type {p.get('type')}, the setting is {s.mlproject_type}")
        if s.parse(str(p.get("default"))) != s.default:
            problems.append(f"{name}: default {p.get('default')!r}, the setting's is {s.text()!r}")
        if f"{s.option} {{{name}}}" not in command:
            problems.append(f"{name}: the command does not pass {s.option} {{{name}}}")
    return problems


def readme_problems(text: str) -> list[str]:
    m = README_TABLE.search(text)
    if m is None:
        return ["README has no settings table between <!-- settings-table --> markers"]
    return [] if m.group(1) == readme_table() else ["README's settings table differs: "
                                                    "paste `python -m reuse_exp.cli.declared_files readme`"]


def test_mlproject_agrees_with_the_settings():
    assert mlproject_problems((REPO / "MLproject").read_text()) == []


def test_a_mismatched_mlproject_is_caught():
    text = (REPO / "MLproject").read_text()
    assert "k: {type: int, default: 1}" in text
    assert mlproject_problems(text.replace("k: {type: int, default: 1}", "k: {type: float, default: 1}")) == [
        "k: type float, the setting is int"]
    assert mlproject_problems(text.replace("seed: {type: int, default: 1234}", "seed: {type: int, default: 0}")) == [
        "seed: default 0, the setting's is '1234'"]
    dropped = text.replace(" --threshold {threshold}", "")
    assert mlproject_problems(dropped) == ["threshold: the command does not pass --threshold {threshold}"]


def test_readme_table_agrees_with_the_settings():
    text = (REPO / "README.md").read_text()
    assert readme_problems(text) == []
    assert readme_problems(text.replace("| `k` | int | `1` |", "| `k` | int | `2` |")) != []


def test_cli_options_are_the_settings_with_their_defaults():
    options = {p.name: p for p in run_cmd.params}
    assert set(options) == {s.name for s in SPECS}
    ctx = click.Context(run_cmd)
    for s in SPECS:
        default = options[s.name].get_default(ctx)
        value = () if s.kind == "paths" else options[s.name].type_cast_value(ctx, default)
        assert value == s.default, s.name


def test_lm_eval_model_takes_the_model_settings_with_the_same_defaults():
    import inspect
    from reuse_exp.evaluation.lm import FastDLLMv2LM, model_settings
    assert set(MODEL_ARGS) == {s.name for s in SPECS if s.role == MODEL}
    # it takes typed settings, nothing else: no defaults of its own to drift from the declaration's
    sig = inspect.signature(FastDLLMv2LM.__init__)
    assert list(sig.parameters) == ["self", "settings", "placement"]
    assert model_settings({}) == DEFAULTS
    # lm-eval's --model_args, parsed by the declaration; a layer list needs no quoting
    got = model_settings({"pretrained": "DIR", "k": "2"}, {"batch_size": "4", "device": "cpu", "max_batch_size": None})
    assert (got.model, got.k, got.batch_size, got.device) == ("DIR", 2, 4, "cpu")
    with pytest.raises(SettingError, match="k=0: must be >= 1"):
        model_settings({"k": "0"})


def test_lm_eval_model_args_are_parsed_once_into_run_settings(monkeypatch):
    """create_from_arg_string hands __init__ a RunSettings; nothing is flattened and parsed back."""
    from reuse_exp.evaluation import lm as lm_mod
    made = []
    monkeypatch.setattr(lm_mod.FastDLLMv2LM, "__init__", lambda self, settings, placement=None: made.append(settings))
    lm_mod.FastDLLMv2LM.create_from_arg_string("pretrained=DIR,k=2.0,subset=8,9,10,threshold=0.75",
                                               {"batch_size": 1, "max_batch_size": None, "device": "cpu"})
    assert made == [RunSettings(model="DIR", k=2, subset=(8, 9, 10), threshold=0.75, batch_size=1, device="cpu")]
    with pytest.raises(SettingError, match="fast_dllm_v2 does not take task"):
        lm_mod.FastDLLMv2LM.create_from_arg_string("task=gsm8k")
    monkeypatch.undo()
    with pytest.raises(TypeError, match="takes a RunSettings"):
        lm_mod.FastDLLMv2LM({"k": 2})


def test_a_tracked_run_hands_the_model_its_settings_and_one_placement(store, monkeypatch, tiny_ckpt, tasks_dir):
    """In a tracked run the model gets the run's RunSettings (its task is the real one) and the
    placement this process resolved, once: the device is resolved one time in the process."""
    from reuse_exp.evaluation import placement
    from reuse_exp.runner import ranks, run as tracked
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    devices, models = [], []
    resolve_device, load_model = placement._device, ranks.load_model
    monkeypatch.setattr(placement, "_device", lambda d: devices.append(d) or resolve_device(d))
    monkeypatch.setattr(ranks, "load_model", lambda s, p: models.append(load_model(s, p)) or models[-1])
    s = RunSettings(model=str(tiny_ckpt), task="t_gen", include_path=(str(tasks_dir),), limit=1,
                    max_new_tokens=32, device="cpu", allow_dirty=True)
    tracked.run(s)
    assert devices == ["cpu"]
    assert models[0].settings is s and models[0].settings.task == "t_gen"


@pytest.mark.parametrize("name, text, value", [
    ("k", "2", 2), ("k", "2.0", 2), ("subset", "8,9,10", (8, 9, 10)), ("limit", "none", None),
    ("limit", "0.5", 0.5), ("use_block_cache", "False", False), ("revision", "none", None),
    ("threshold", "1", 1.0)])
def test_values_parse_as_declared(name, text, value):
    assert spec(name).parse(text) == value


@pytest.mark.parametrize("name, text, message", [
    ("k", "0", "k=0: must be >= 1"), ("k", "abc", "k=abc: give a whole number"),
    ("k", "2.5", "k=2.5: give a whole number"), ("subset", "foo", "use first, middle, last"),
    ("mode", "bar", "mode=bar: use one of output, delta"), ("limit", "-1", "must be positive"),
    ("threshold", "2", "threshold=2.0: must be <= 1"), ("batch_size", "0", "batch_size=0: must be >= 1"),
    ("dtype", "int8", "use one of auto, bfloat16")])
def test_bad_values_are_one_line_errors(name, text, message):
    with pytest.raises(SettingError, match=re.escape(message)):
        spec(name).parse(text)


def test_unknown_setting_and_bad_combination():
    with pytest.raises(SettingError, match="unknown setting 'kk'"):
        RunSettings.parse({"kk": "2"})
    with pytest.raises(SettingError, match="small_block_size=5 must divide block_size=32"):
        RunSettings.parse({"small_block_size": "5"})
    assert DEFAULTS == RunSettings.parse({})


# -- the grid takes what `run` takes ------------------------------------------------------------
# Written values to try on every setting: the declaration's own (defaults, choices, bounds) and
# the spellings a user might type.
TRIES = ("0", "1", "2", "2.0", "2.5", "0.5", "-1", "1e3", "none", "all", "auto", "true", "False", "yes",
         "first", "middle", "8,9,10", "abc", "cpu", "")
REFUSED = "refused"


def tries(s) -> list[str]:
    bounds = [str(b) for b in (s.minimum, s.maximum) if b is not None]
    return list(dict.fromkeys([*TRIES, s.text(), *s.choices, *bounds]))


def run_takes(name: str, text: str):
    """What `reuse-exp run --NAME TEXT` makes of TEXT (REFUSED on a usage error)."""
    s = spec(name)
    try:
        ctx = run_cmd.make_context("run", [s.option, text])
    except click.UsageError:
        return REFUSED
    value = ctx.params[name]
    value = tuple(p for group in value for p in group) if s.kind == "paths" else value
    try:
        RunSettings(**{name: value})   # what `run` refuses of a whole configuration
    except SettingError:
        return REFUSED
    return value


def grid_takes(name: str, text: str):
    """What the grid makes of TEXT for NAME: its own option (a reuse setting: under a policy that
    reads it), or -P."""
    from reuse_exp.settings import REUSE, grid_settings
    from reuse_exp.study.cells import build_request
    from reuse_exp.cli.study import status_cmd
    own = {p.name for p in status_cmd.params}
    args = [spec(name).option, text] if name in own else ["-P", f"{name}={text}"]
    reader = next(p for p in ("fixed", "adaptive") if name not in grid_settings(REUSE) or name in policy(p).reads)
    try:
        ctx = status_cmd.make_context("status", ["--task", "t_gen", "-P", f"policy={reader}", *args])
        p = ctx.params
        request = build_request(p["task"], limit=p["limit"], model=p["model"], params=p["params"],
                                **{n: p[n] for n in grid_settings(REUSE)})
    except (click.UsageError, SettingError):
        return REFUSED
    axes = dict(request.axes)
    if name in axes:
        return axes[name][0] if len(axes[name]) == 1 else axes[name]
    return dict(request.settings)[name]


def policy(name: str):
    from reuse_exp.settings import policy_class
    return policy_class(name)


def grid_shared():
    """Every setting a grid can be given (not the ones it sets itself), from the declaration."""
    from reuse_exp.settings import OWN
    return [s.name for s in SPECS if s.grid != OWN]


@pytest.mark.parametrize("name", grid_shared())
def test_every_grid_setting_takes_exactly_what_run_takes(name):
    for text in tries(spec(name)):
        if "," in text and name in ("k", "drift"):
            continue   # a comma list is several values to the grid's axis
        ran, gridded = run_takes(name, text), grid_takes(name, text)
        if name == "subset" and text in ("first", "middle") and gridded != REFUSED:
            gridded = gridded if isinstance(gridded, str) else gridded[0]
        assert gridded == ran, f"{name}={text!r}: run gives {ran!r}, the grid {gridded!r}"


def test_the_grid_refuses_what_only_a_whole_run_refuses():
    assert grid_takes("small_block_size", "5") == REFUSED   # must divide block_size, as run says


def test_grid_help_is_the_declaration():
    from click.testing import CliRunner

    from reuse_exp.cli.study import compare_cmd
    from reuse_exp.cli.study import grid
    for cmd, args in ((grid, ["status", "--help"]), (compare_cmd, ["--help"])):
        text = " ".join(CliRunner().invoke(cmd, args).output.split())
        for choice in spec("mode").choices:
            assert choice in text, f"{cmd.name} help does not name mode {choice}"
        assert "fraction below 1" in text   # --limit says what run's limit takes


def test_flags_on_the_declaration_make_the_config_key_and_the_grid():
    from reuse_exp.settings import OWN, PINNED, REUSE, grid_settings
    from reuse_exp.study.cells import run_defaults
    from reuse_exp.tracking.schema import config_key, shaping_settings
    key_params = {p for s in SPECS for p in s.key_params}
    assert {"k", "layers", "model_hash", "resolved_dtype", "path", "device_type"} <= key_params
    assert not {"subset", "experiment", "allow_dirty", "resume", "processes"} & key_params
    assert grid_settings(REUSE) == ("k", "subset", "mode", "scope", "drift", "max_reuse")
    assert set(run_defaults()) == set(grid_settings(PINNED) + grid_settings(REUSE)) and "resume" in grid_settings(OWN)
    shaping = set(shaping_settings({"k": 2}))   # every `key` setting, the reuse ones the fixed policy computes
    assert shaping == {s.name for s in SPECS if s.key} - {"drift", "max_reuse"}
    assert set(shaping_settings({"k": 1})) == shaping - {"subset", "mode", "scope"}
    base = {p: "1" for p in key_params} | {"policy": "fixed"}
    assert config_key(base) != config_key({**base, "threshold": "0.8"})


def test_environment_knobs_are_declared_and_read_typed(monkeypatch):
    from reuse_exp.knobs import COLLECTIVE_TIMEOUT_S, HEARTBEAT_S, KNOBS, LAUNCHED
    names = {k.name for k in KNOBS}
    package = REPO / "reuse_exp"
    used = {m for p in package.rglob("*.py") for m in re.findall(r'"(REUSE_EXP_[A-Z_]+)"', p.read_text())}
    assert used <= names, f"undeclared knobs: {used - names}"
    assert HEARTBEAT_S.read({}) == 30.0 and HEARTBEAT_S.read({HEARTBEAT_S.name: "0.2"}) == 0.2
    assert COLLECTIVE_TIMEOUT_S.read({}) == 1800.0 and LAUNCHED.read({LAUNCHED.name: "1"}) is True
    with pytest.raises(SettingError, match="REUSE_EXP_COLLECTIVE_TIMEOUT_S='-5'"):
        COLLECTIVE_TIMEOUT_S.read({COLLECTIVE_TIMEOUT_S.name: "-5"})


@pytest.mark.parametrize("name, value, message", [
    ("limit", -1, "limit=-1: the limit must be positive"), ("limit", 1.5, "a limit of 1 or more must be a whole"),
    ("limit", True, "give a number of samples"), ("k", 0, "k=0: must be >= 1"), ("mode", "bar", "use one of")])
def test_typed_values_obey_the_rules_written_ones_do(name, value, message):
    """A caller that passes values (a grid's limit=4, lm-eval's model_args as objects) is checked as
    the command line is."""
    with pytest.raises(SettingError, match=re.escape(message)):
        spec(name).parse(value)
