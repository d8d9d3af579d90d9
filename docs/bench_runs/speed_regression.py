"""Does `audit --speed` name a real slowdown, and never the machine's noise? A benchmark.

A clean clone of HEAD (commit A) and, on top, commit B whose decoder spins `--slower` of its own
time more inside the timed part (tokens/s x 1/(1+slower): 0.11 is 10 % slower). Rounds of one
tracked run at A and one at B, one at a time (`reuse-exp run` on the bundled model, one thread),
optionally beside `--rivals` busy processes. Every pair is then judged as the audit judges two
commits (study/speed.py): A_i against B_i (should be named), A_i against A_i+1 and B_i against
B_i+1 (should not); then, as the audit reads repeats, every A run against every B run (should be
named) and A's first rounds against its last (should not). Raw JSON: every run's timing figures
and every verdict.

    python docs/bench_runs/speed_regression.py --rounds 6 --slower 0.11 --out docs/bench_runs/speed_regression.json
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TIMED_END = re.compile(r"^(?P<indent>\s*)\S+\.wall_seconds = time\.perf_counter\(\) - t0$", re.M)
KEEP = ("tokens_per_second", "tokens_per_second_median", "tokens_per_second_noise", "timing_quality",
        "timing_cpu_wait_fraction", "timing_cpu_fraction", "timing_other_busy_cores", "probe_seconds_before",
        "probe_seconds_after", "probe_spread", "probe_drift", "seconds", "timed_batches")


def git(args, cwd):
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True,
                          env={**os.environ, "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@localhost",
                               "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@localhost"}).stdout.strip()


def clone(dest: Path, slower: float) -> tuple[str, str]:
    git(["clone", "-q", str(REPO), str(dest)], REPO)
    a = git(["rev-parse", "HEAD"], dest)
    path = dest / "reuse_exp" / "engine" / "decoding.py"
    text = path.read_text()
    m = TIMED_END.search(text)
    i = m["indent"]
    path.write_text(text[:m.start()] + f"{i}_until = time.perf_counter() + {slower!r} * (time.perf_counter() - t0)\n"
                    f"{i}while time.perf_counter() < _until:\n{i}    pass\n" + text[m.start():])
    git(["commit", "-qam", f"bench: the decoder spins {slower:.0%} longer"], dest)
    return a, git(["rev-parse", "HEAD"], dest)


def spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def favoured() -> None:
    """A session of its own, ahead of other sessions' processes, where allowed (tests/test_speed_e2e.py)."""
    try:
        os.setsid()
        Path("/proc/self/autogroup").write_text("-20")
        os.nice(-20)
    except OSError:
        pass


def run(root: Path, commit: str, env: dict, args, rivals: int) -> dict:
    git(["checkout", "-q", commit], root)
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=spin, args=(3600.0,), daemon=True) for _ in range(rivals)]
    for p in procs:
        p.start()
    try:
        out = subprocess.run([sys.executable, "-m", "reuse_exp.cli", "run", "--k", "2", "--subset", "middle",
                              "--limit", str(args.limit), "--batch-size", "1", "--experiment", "bench"],
                             cwd=root, env=env, capture_output=True, text=True, timeout=1800,
                             preexec_fn=favoured if args.favoured else None)
    finally:
        for p in procs:
            p.kill()
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    run_id = re.search(r"^run\s+(\w+)", out.stdout, re.M)[1]
    import mlflow
    r = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"]).get_run(run_id)
    return {"commit": commit[:7], "run_id": run_id, "start_ms": r.info.start_time, "tags": dict(r.data.tags),
            "metrics": dict(r.data.metrics), "params": dict(r.data.params), "status": r.info.status}


def judge(before: dict | list[dict], after: dict | list[dict]) -> str:
    """As the audit judges two commits: one run each, or a list of runs each (repeats)."""
    from reuse_exp.study.speed import AtCommit, Regression, compare_commits, timing_of
    from reuse_exp.study.store import RunRecord
    sides = []
    for runs in (before, after):
        recs = [RunRecord(x["run_id"], x["status"], x["start_ms"], x["params"], x["tags"], x["metrics"])
                for x in (runs if isinstance(runs, list) else [runs])]
        clean = tuple(r for r in recs if timing_of(r).clean)
        if not clean:
            return "not compared (contended)"
        sides.append(AtCommit(clean[0].commit, clean, min(r.start_ms for r in recs)))
    found = compare_commits(*sides)
    return ("named: " + found.line) if isinstance(found, Regression) else (found or "within noise")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--slower", type=float, default=0.11)
    ap.add_argument("--limit", type=int, default=8)
    ap.add_argument("--rivals", type=int, default=0, help="busy processes beside every run")
    ap.add_argument("--favoured", action="store_true", help="runs in a session of their own at nice -20 (root)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "repo"
        a, b = clone(root, args.slower)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(root),
               "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db"}
        rounds = []
        for i in range(args.rounds):
            pair = [run(root, c, env, args, args.rivals) for c in ((a, b) if i % 2 == 0 else (b, a))]
            rounds.append(sorted(pair, key=lambda x: x["commit"] != a[:7]))
            for x in rounds[-1]:
                print(i, x["commit"], {k: round(x["metrics"].get(k, float("nan")), 4) for k in KEEP},
                      x["tags"].get("timing_quality", "")[:60], flush=True)
        verdicts = {"slowed (A_i vs B_i)": [judge(ra, rb) for ra, rb in rounds],
                    "same code (A_i vs A_i+1)": [judge(x[0], y[0]) for x, y in zip(rounds, rounds[1:])],
                    "same code (B_i vs B_i+1)": [judge(x[1], y[1]) for x, y in zip(rounds, rounds[1:])],
                    "slowed, every round's runs as repeats": [judge([x[0] for x in rounds], [x[1] for x in rounds])],
                    "same code, first half against second half (A)": [
                        judge([x[0] for x in rounds[:len(rounds) // 2]], [x[0] for x in rounds[len(rounds) // 2:]])]}
    for what, v in verdicts.items():
        print(what, v)
    args.out.write_text(json.dumps({
        "command": " ".join(sys.argv), "commit": git(["rev-parse", "HEAD"], REPO), "slower": args.slower,
        "rivals": args.rivals, "favoured": args.favoured, "limit": args.limit, "verdicts": verdicts,
        "runs": [{"commit": x["commit"], "run_id": x["run_id"], "timing_quality": x["tags"].get("timing_quality"),
                  **{k: x["metrics"].get(k) for k in KEEP}} for pair in rounds for x in pair]}, indent=1) + "\n")


if __name__ == "__main__":
    main()
