"""Unmasking schedules: every decode records one; a trajectory replays one, step for step."""
import json
from dataclasses import replace

import pytest
from click.testing import CliRunner

from reuse_exp.cli import main
from reuse_exp.engine.config import ModelConfig
from reuse_exp.engine.decoding import DecodeConfig, generate
from reuse_exp.engine.loading import BUNDLED_MODEL_DIR, load_model, load_tokenizer, random_model
from reuse_exp.engine.policies.fixed import FixedPolicy
from reuse_exp.engine.trajectory import Trajectory, bundled
from reuse_exp.errors import ConfigError
from reuse_exp.evaluation.stats import HarnessStats

CFG = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=8,
                  num_attention_heads=4, num_key_value_heads=2)
# threshold 1.0: random weights unmask one token a step unless a trajectory says otherwise
BASE = DecodeConfig(mask_id=63, stop_id=62, pad_id=61, max_new_tokens=64, threshold=1.0, ignore_stop=True)
# Lengths 32, 40 and 19: whole and partial small blocks, one prompt a block past the others.
PROMPTS = [[5, 6, 7, 8] * 8, [9, 10, 11, 12, 13] * 8, list(range(1, 20))]
# Two samples for three rows (row 2 follows sample 0); blocks that sum to more and fewer than
# a window's masks (the step counts start over), of several lengths (the blocks wrap).
PROFILE = Trajectory(samples=(((3, 5), (1, 1, 6), (8,), (2, 1)), ((1, 2, 3, 4), (7, 1))), name="test")


@pytest.fixture(scope="module")
def model():
    return random_model(CFG, "float32", seed=0, std=0.2)


def expected(profile: Trajectory, windows: list[list[int]]) -> list[list[list[int]]]:
    """The rule, written out: per sample, per small block, the profile's count of each step,
    clamped to the masks left; `windows` are each sample's masks per small block."""
    out = []
    for i, masks in enumerate(windows):
        sample = profile.samples[i % len(profile.samples)]
        blocks = []
        for j, left in enumerate(masks):
            counts, steps = sample[j % len(sample)], []
            while left:
                n = min(counts[len(steps) % len(counts)], left)
                steps.append(n)
                left -= n
            blocks.append(steps)
        out.append(blocks)
    return out


def windows_of(model, prompts, cfg):
    """Masks per small block: what a one-token decode unmasks in each."""
    schedule = generate(model, prompts, cfg).report.unmasking
    assert all(n == 1 for s in schedule for b in s for n in b)
    return [[len(b) for b in s] for s in schedule]


def test_without_a_trajectory_random_weights_unmask_one_token_a_step(model):
    r = generate(model, PROMPTS, BASE).report
    assert r.tokens_per_step == 1.0
    # one entry per denoising step of each sample
    steps = [sum(s.forwards[k] for k in ("full_block", "small_block", "replay")) for s in r.samples]
    assert [sum(map(len, s)) for s in r.unmasking] == steps


@pytest.mark.parametrize("policy", [None, FixedPolicy.create(8, k=2, subset="first", mode="replay"),
                                    FixedPolicy.create(8, k=3, subset="middle", mode="output")])
def test_a_replayed_decode_unmasks_the_profiles_counts_step_by_step(model, policy):
    r = generate(model, PROMPTS, replace(BASE, trajectory=PROFILE), policy).report
    assert r.unmasking == expected(PROFILE, windows_of(model, PROMPTS, BASE))
    if policy is not None and policy.mode == "replay":
        assert sum(s.forwards["replay"] for s in r.samples) > 0, "replayed steps are in the schedule too"
    assert r.tokens_per_step > 2


def test_a_trajectory_of_ones_decodes_what_the_threshold_rule_does(model):
    """Replay takes the most confident positions: one each step is the argmax rule."""
    ones = Trajectory(samples=(((1,),),))
    for cfg in (BASE, replace(BASE, threshold=0.9, ignore_stop=False)):
        plain = generate(model, PROMPTS, replace(cfg, threshold=1.0))
        replayed = generate(model, PROMPTS, replace(cfg, trajectory=ones))
        assert replayed.tokens == plain.tokens and replayed.report.unmasking == plain.report.unmasking


def test_under_a_trajectory_k1_is_no_reuse_and_a_batch_equals_each_sample_alone(model):
    cfg = replace(BASE, trajectory=PROFILE)
    batch = generate(model, PROMPTS, cfg)
    k1 = generate(model, PROMPTS, cfg, FixedPolicy.create(8, k=1))
    assert k1.tokens == batch.tokens and k1.report.unmasking == batch.report.unmasking
    for policy in (None, FixedPolicy.create(8, k=2, subset="middle")):
        batch = generate(model, PROMPTS, cfg, policy)
        for i, p in enumerate(PROMPTS):
            own = Trajectory(samples=(PROFILE.samples[i % len(PROFILE.samples)],))
            extra = max(map(len, PROMPTS)) // 32 - len(p) // 32   # the blocks the batch gives it
            alone = generate(model, [p], replace(cfg, trajectory=own, max_new_tokens=64 + 32 * extra), policy)
            assert alone.tokens[0] == batch.tokens[i], (i, policy)
            assert alone.report.unmasking[0] == batch.report.unmasking[i]


def test_record_save_load_replay_round_trip(tmp_path):
    """The tiny model's real decode, saved and loaded, replayed on random weights: the same counts."""
    tiny, _ = load_model(BUNDLED_MODEL_DIR, "float32")
    tok = load_tokenizer(BUNDLED_MODEL_DIR)
    prompts = [tok(q)["input_ids"] for q in ("Emma shares 27 coins equally among 3 friends. Answer:",
                                             "Sara reads 11 pages on Monday and 12 on Tuesday. How many?",
                                             "Ivy has 8 apples.")]
    cfg = DecodeConfig(mask_id=tok.convert_tokens_to_ids("|<MASK>|"), stop_id=-1, pad_id=0, max_new_tokens=64,
                       ignore_stop=True)
    real = generate(tiny, prompts, cfg).report
    assert real.tokens_per_step > 1.5, "the trained model unmasks several tokens a step"
    Trajectory.from_schedule(real.unmasking, "recorded", {"commit": "test"}).save(tmp_path / "t.json")
    loaded = Trajectory.load(str(tmp_path / "t.json"))
    assert dict(loaded.source) == {"commit": "test"} and loaded.tokens_per_step == real.tokens_per_step
    rand = random_model(tiny.config, "float32", seed=3)
    replayed = generate(rand, prompts, replace(cfg, threshold=1.0, trajectory=loaded)).report
    assert replayed.unmasking == real.unmasking


def test_a_runs_trace_loads_as_a_trajectory_and_one_without_it_fails_in_one_line(model, tmp_path):
    reports = [generate(model, [p], replace(BASE, threshold=0.2)).report for p in PROMPTS]
    trace = HarnessStats(decode=reports).trace()
    assert trace["unmasking"] == [r.unmasking[0] for r in reports]
    (tmp_path / "reuse_trace.json").write_text(json.dumps({"policy": {}, **trace}))
    t = Trajectory.load(str(tmp_path / "reuse_trace.json"))
    assert [list(map(list, s)) for s in t.samples] == trace["unmasking"]
    for old in ({"policy": {}, "layer_totals_computed_reused": []}, {"policy": {}, "note": "loglikelihood"}):
        (tmp_path / "old.json").write_text(json.dumps(old))
        with pytest.raises(ConfigError, match="no unmasking schedule: rerun it at this commit") as e:
            Trajectory.load(str(tmp_path / "old.json"))
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("spec, message", [("nope", "unknown trajectory 'nope': give one-token, a bundled profile"),
                                           ("run:abc", "needs the tracking store")])
def test_a_bad_spec_is_one_line(spec, message):
    with pytest.raises(ConfigError, match=message):
        Trajectory.load(spec)


def test_the_bundled_profile_is_a_real_runs_schedule():
    assert "tiny_gsm" in bundled() and Trajectory.load("one-token") is None
    t = Trajectory.load("tiny_gsm")
    source = dict(t.source)
    assert source["task"] == "tiny_gsm" and source["threshold"] == "0.9" and len(source["commit"]) == 40
    assert source["run_id"] and source["command"].startswith("reuse-exp trajectory run:")
    assert len(t.samples) == 200 and 3 < t.tokens_per_step < 8


def test_a_runs_schedule_from_the_store(store, tmp_path, monkeypatch):
    """`reuse-exp trajectory run:ID` reads the run's reuse_trace.json; a run without it: one line."""
    import mlflow
    client = mlflow.MlflowClient(store)
    exp = client.create_experiment("t")
    runs = {}
    for name, trace in (("new", {"unmasking": [[[2, 6], [8]]]}), ("old", {"layer_totals_computed_reused": []})):
        run = client.create_run(exp, tags={"git_commit": "c" * 40})
        client.log_param(run.info.run_id, "task", "t_gen")
        client.log_dict(run.info.run_id, {"policy": {}, **trace}, "reuse_trace.json")
        runs[name] = run.info.run_id
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    out = CliRunner().invoke(main, ["trajectory", f"run:{runs['new']}", "-o", str(tmp_path / "p.json")])
    assert out.exit_code == 0, out.output
    assert "1 samples, 5.33 tokens per step" in out.output   # (2 + 6 + 8) / 3
    t = Trajectory.load(str(tmp_path / "p.json"))
    assert t.samples == (((2, 6), (8,)),) and dict(t.source)["run_id"] == runs["new"]
    assert dict(t.source)["commit"] == "c" * 40 and dict(t.source)["task"] == "t_gen"
    bad = CliRunner().invoke(main, ["trajectory", f"run:{runs['old']}", "-o", str(tmp_path / "q.json")])
    assert bad.exit_code == 1 and "rerun it at this commit" in bad.output and "Traceback" not in bad.output
    assert len(bad.output.strip().splitlines()) == 1
