"""Fault campaign: interrupt tiny tracked runs at random moments and recover each as a user would.

Each case starts one run (`reuse-exp run` or `mlflow run . --env-manager local`, 1 or 2
ranks), sends it SIGKILL or SIGTERM during start-up, decoding or logging (the moment is the one
observed at the signal: how many requests its request cache held), then runs the audit
(`reuse-exp audit --stale-after 3s`), every command the audit printed exactly as printed, and
`--resume RUN_ID` (or a fresh run where there is nothing to resume) or `reuse-exp grid run`.
The run that finishes is compared with an uninterrupted one-rank run: per-document outputs
(per_sample.jsonl, generations.jsonl, lm-eval's filtered responses) and every metric that is
not a timing. Not a test: a benchmark of the guard, written to a JSON file.

    OMP_NUM_THREADS=1 python benchmarks/faults.py --interruptions 32 --out docs/reliability/campaign.json

It runs the code of the checkout it sits in (which must be clean: runs refuse a dirty tree).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import random
import re
import shlex
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SETTINGS = {"k": "2", "subset": "middle", "limit": "8", "max_new_tokens": "64"}
TOTAL = int(SETTINGS["limit"])
STALE = 3          # --stale-after, seconds; the heartbeat beats every second
SIGNALS = {"SIGKILL": signal.SIGKILL, "SIGTERM": signal.SIGTERM}
TARGETS = ("reuse-exp run", "mlflow run")
MOMENTS = ("start-up", "decoding", "logging")
MLFLOW_START_S = 6.0   # about how much later `mlflow run` reaches the same point (measured: 6-7 s)


# -- commands -------------------------------------------------------------------------------
def run_cmd(target: str, ranks: int, resume: str | None = None) -> list[str]:
    settings = {**SETTINGS, "processes": str(ranks), **({"resume": resume} if resume else {})}
    if target == "mlflow run":
        return [sys.executable, "-m", "mlflow", "run", ".", "--env-manager", "local",
                *itertools.chain.from_iterable(("-P", f"{k}={v}") for k, v in settings.items())]
    return ["reuse-exp", "run", *itertools.chain.from_iterable((f"--{k.replace('_', '-')}", v)
                                                               for k, v in settings.items())]


def grid_cmd(ranks: int) -> list[str]:
    return ["reuse-exp", "grid", "run", "--task", "tiny_gsm", "--k", SETTINGS["k"], "--subset", SETTINGS["subset"],
            "--limit", SETTINGS["limit"], "-P", f"max_new_tokens={SETTINGS['max_new_tokens']}",
            "-P", f"processes={ranks}", "--stale-after", f"{STALE}s"]


def env_for(store: str, experiment: str, cache_root: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PYTEST_", "REUSE_EXP_"))}
    return env | {"MLFLOW_TRACKING_URI": store, "MLFLOW_EXPERIMENT_NAME": experiment, "PYTHONPATH": str(REPO),
                  "OMP_NUM_THREADS": "1", "REUSE_EXP_HEARTBEAT_S": "1", "REUSE_EXP_CACHE_ROOT": str(cache_root),
                  "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def sh(cmd: list[str], env: dict, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


# -- what a run left ----------------------------------------------------------------------------
def cached(cache_root: Path) -> int:
    """Requests the run's request cache holds (every rank's file)."""
    n = 0
    for db in cache_root.rglob("requests_rank*.db"):
        try:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=0.05) as con:
                n += con.execute("SELECT COUNT(*) FROM unnamed").fetchone()[0]
        except sqlite3.Error:
            pass
    return n


def session_left(sid: int) -> list[str]:
    """Processes still alive in the case's session (orphans of the interrupted run)."""
    out = subprocess.run(["ps", "-o", "pid=,stat=,args=", "-s", str(sid)], capture_output=True, text=True).stdout
    return [line.strip() for line in out.splitlines() if line.split() and "Z" not in line.split()[1]]


def outputs(client, run_id: str) -> dict:
    """Per document: what the run returned and how it scored, in every form the run logs."""
    from reuse_exp.evaluation.stats import computed_only
    run = client.get_run(run_id)
    art = {name: Path(client.download_artifacts(run_id, name)).read_text()
           for name in ("per_sample.jsonl", "generations.jsonl", "samples_tiny_gsm.jsonl")}
    filtered = sorted((r["doc_id"], r["filter"], json.dumps(r["filtered_resps"]))
                      for r in map(json.loads, art.pop("samples_tiny_gsm.jsonl").splitlines()))
    metrics = {k: v for k, v in run.data.metrics.items()
               if not computed_only(k) and k != "cached_requests" and not k.startswith("rank")}
    return {**art, "filtered_resps": filtered, "metrics": metrics}


def differences(a: dict, b: dict) -> list[str]:
    out = [name for name in ("per_sample.jsonl", "generations.jsonl", "filtered_resps") if a[name] != b[name]]
    ma, mb = a["metrics"], b["metrics"]
    out += [f"metric {k}: {ma.get(k)} vs {mb.get(k)}" for k in sorted(set(ma) | set(mb)) if ma.get(k) != mb.get(k)]
    return out


# -- one case -------------------------------------------------------------------------------------
class Campaign:
    def __init__(self, work: Path, seed: int):
        import mlflow
        self.work, self.seed, self.rng = work, seed, random.Random(seed)
        self.store = f"sqlite:///{work / 'mlflow.db'}"
        self.client = mlflow.MlflowClient(self.store)
        self.client.search_experiments()   # migrate the new store once, before any process races to
        self.timing: dict[tuple, dict] = {}

    def experiment(self, name: str) -> str:
        return self.client.create_experiment(name)

    def start(self, cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                start_new_session=True)

    def baseline(self, target: str, ranks: int) -> dict:
        """An uninterrupted run, timed: when its cache got its first and its last request."""
        name = f"baseline_{target.split()[0]}_{ranks}"
        exp = self.experiment(name)
        cache_root = self.work / name
        t0 = time.monotonic()
        proc = self.start(run_cmd(target, ranks), env_for(self.store, name, cache_root), self.work / f"{name}.log")
        first = last = None
        while proc.poll() is None:
            n = cached(cache_root)
            now = time.monotonic() - t0
            first = first if first is not None or n == 0 else now
            last = last if last is not None or n < TOTAL else now
            time.sleep(0.05)
        assert proc.returncode == 0, (self.work / f"{name}.log").read_text()[-3000:]
        [run] = self.client.search_runs([exp])
        self.timing[(target, ranks)] = {"first_cached_s": first, "all_cached_s": last,
                                        "end_s": time.monotonic() - t0}
        return {"name": name, "run_id": run.info.run_id, "timing": self.timing[(target, ranks)],
                "outputs": outputs(self.client, run.info.run_id)}

    def interrupt(self, i: int, sig: str, target: str, ranks: int, moment: str) -> dict:
        """Start the run and signal it at `moment`; what was observed."""
        rng = random.Random(self.seed * 1000 + i)
        name = f"case{i:02d}"
        exp = self.experiment(name)
        cache_root = self.work / name
        env = env_for(self.store, name, cache_root)
        t = dict(self.timing[("reuse-exp run", ranks)])
        if target == "mlflow run":   # MLflow's CLI starts before the run's own command
            t = {k: v + MLFLOW_START_S for k, v in t.items()}
        proc = self.start(run_cmd(target, ranks), env, self.work / f"{name}.log")
        t0 = time.monotonic()
        if moment == "start-up":
            time.sleep(rng.uniform(0.3, 0.7 * (t["first_cached_s"] or 5)))
        else:
            want = 1 if moment == "decoding" else TOTAL
            while proc.poll() is None and cached(cache_root) < want:
                time.sleep(0.02)
            if moment == "decoding":   # somewhere among the requests still to decode
                span = (t["all_cached_s"] or 0) - (t["first_cached_s"] or 0)
                time.sleep(rng.uniform(0, 0.8 * max(span, 0)))
            else:                      # after the last request, while the run logs its results
                time.sleep(rng.uniform(0, 0.5))
        held = cached(cache_root)
        if proc.poll() is not None:
            return {"case": name, "exp": exp, "signalled": False, "exit": proc.returncode}
        os.kill(proc.pid, SIGNALS[sig])
        at = time.monotonic() - t0
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            pass
        # A child that outlives its parent (`mlflow run`'s, told by PDEATHSIG) ends its run itself:
        # give it a minute; what is still alive then is an orphan.
        drained = time.monotonic() + 60
        while session_left(proc.pid) and time.monotonic() < drained:
            time.sleep(0.5)
        orphans = session_left(proc.pid)
        for line in orphans:   # leave the machine clean; counted below
            try:
                os.kill(int(line.split()[0]), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        observed = "start-up" if held == 0 else "decoding" if held < TOTAL else "logging"
        runs = self.client.search_runs([exp])
        return {"case": name, "exp": exp, "env": env, "signalled": True, "signal_at_s": round(at, 2),
                "cached_at_signal": held, "moment": observed, "aimed_at": moment, "exit": proc.returncode,
                "orphans": orphans, "runs": {r.info.run_id: r.info.status for r in runs}}

    def audit(self, case: dict) -> dict:
        """The audit as a user runs it, once the dead are older than --stale-after, and every
        command it prints run exactly as printed; was its verdict right?"""
        from reuse_exp.tracking.heartbeat import parse_stamp
        from reuse_exp.tracking.schema import HEARTBEAT_TAG
        if any(status == "RUNNING" for status in case["runs"].values()):
            time.sleep(STALE + 1.5)
        before = {r.info.run_id: r for r in self.client.search_runs([case["exp"]])}
        truly_dead = {rid for rid, r in before.items() if r.info.status == "RUNNING"}
        out = sh(["reuse-exp", "audit", "--stale-after", f"{STALE}s"], case["env"])
        lines = (out.stdout + out.stderr).splitlines()
        named = {line.split()[0] for line in lines if "  dead:" in line}
        other = [line for line in lines if "  " in line and "  dead:" not in line and not line.startswith("audit")]
        ended = []
        for line in lines:
            for printed in re.findall(r"`(reuse-exp runs end [^`]+)`", line):
                res = sh(shlex.split(printed), case["env"], timeout=300)
                rid = printed.split()[3]
                run = self.client.get_run(rid)
                hb = before[rid].data.tags.get(HEARTBEAT_TAG)
                last = parse_stamp(hb)
                want_end = int(last * 1000) if last else before[rid].info.start_time
                ended.append({"command": printed, "exit": res.returncode, "line": (res.stdout + res.stderr).strip(),
                              "status": run.info.status, "end_time_is_last_sign_of_life":
                              abs((run.info.end_time or 0) - want_end) <= 1})
        misjudged = named != truly_dead or bool(other) or (out.returncode != 0) != bool(named or other)
        return {"audit_exit": out.returncode, "audit_lines": lines, "dead_named": sorted(named),
                "dead_truly": sorted(truly_dead), "misjudged": misjudged, "ended": ended}

    def recover(self, case: dict, target: str, ranks: int, follow: str) -> dict:
        runs = [r for r in self.client.search_runs([case["exp"]], order_by=["attributes.start_time DESC"])]
        steps = []
        if follow == "grid run":
            res = sh(grid_cmd(ranks), case["env"])
            steps.append({"command": " ".join(grid_cmd(ranks)), "exit": res.returncode,
                          "tail": (res.stdout + res.stderr)[-600:]})
        else:
            rid = runs[0].info.run_id if runs else None
            cmd = run_cmd(target, ranks, resume=rid)
            res = sh(cmd, case["env"])
            steps.append({"command": " ".join(cmd), "exit": res.returncode, "tail": (res.stdout + res.stderr)[-600:]})
            if res.returncode != 0 and rid is not None:   # refused (nothing it could resume): start anew
                res = sh(run_cmd(target, ranks), case["env"])
                steps.append({"command": " ".join(run_cmd(target, ranks)), "exit": res.returncode,
                              "tail": (res.stdout + res.stderr)[-600:]})
        finished = [r for r in self.client.search_runs([case["exp"]], order_by=["attributes.start_time DESC"])
                    if r.info.status == "FINISHED" and r.data.params.get("k") == SETTINGS["k"]]
        from reuse_exp.study.audit import audit
        from reuse_exp.study.store import fetch_runs
        after = audit(fetch_runs(self.client, case["exp"]), stale_after_s=STALE)
        return {"follow": follow, "steps": steps, "finished": [r.info.run_id for r in finished],
                "resumed": bool(finished and finished[0].data.tags.get("resumed_from")),
                "cached_requests": finished[0].data.metrics.get("cached_requests") if finished else None,
                "audit_after": [str(f) for f in after]}


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "host": platform.node(), "python": platform.python_version(),
            "kernel": platform.release()}


def table(data: dict) -> str:
    """The campaign as a markdown table: per signal, target and ranks, the interruptions by
    moment, then how recovery went."""
    head = ("| signal | target | ranks | start-up | decoding | logging | resumed | differences | lost "
            "| audit misjudged | orphans |\n|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for sig, target, ranks in itertools.product(SIGNALS, TARGETS, (1, 2)):
        cases = [c for c in data["cases"] if (c["signal"], c["target"], c["ranks"]) == (sig, target, ranks)]
        if not cases:
            continue
        by = [sum(c["moment"] == m for c in cases) for m in MOMENTS]
        rows.append(f"| {sig} | `{target}` | {ranks} | " + " | ".join(map(str, by)) + " | "
                    f"{sum(c['resumed'] for c in cases)} | {sum(bool(c['differences']) for c in cases)} | "
                    f"{sum(c['lost'] for c in cases)} | {sum(c['misjudged'] for c in cases)} | "
                    f"{sum(len(c['orphans']) for c in cases)} |")
    cs = data["cases"]
    rows.append("| **all** | | | " + " | ".join(str(sum(c["moment"] == m for c in cs)) for m in MOMENTS) +
                f" | {sum(c['resumed'] for c in cs)} | {sum(bool(c['differences']) for c in cs)} | "
                f"{sum(c['lost'] for c in cs)} | {sum(c['misjudged'] for c in cs)} | "
                f"{sum(len(c['orphans']) for c in cs)} |")
    return "\n".join([head, *rows])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--table", type=Path, default=None, help="print a campaign JSON's table and exit")
    ap.add_argument("--interruptions", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2, help="cases at once (each mostly waits on its processes)")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "reliability" / "campaign.json")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a new temporary one)")
    a = ap.parse_args()
    if a.table is not None:
        print(table(json.loads(a.table.read_text())))
        return
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout
    if dirty.strip():
        sys.exit("the checkout is dirty: commit first (runs refuse a dirty tree)")
    work = a.work or Path(tempfile.mkdtemp(prefix="faults_"))
    work.mkdir(parents=True, exist_ok=True)
    c = Campaign(work, a.seed)
    t_start = time.time()
    baselines = {("reuse-exp run", n): c.baseline("reuse-exp run", n) for n in (1, 2)}
    reference = baselines[("reuse-exp run", 1)]["outputs"]
    base_diffs = {f"{t} x{n}": differences(b["outputs"], reference) for (t, n), b in baselines.items()}
    plan = list(itertools.product(SIGNALS, TARGETS, (1, 2), MOMENTS))
    c.rng.shuffle(plan)
    plan = (plan * 3)[:a.interruptions]
    cases, tries = [], itertools.count(1)
    lock = threading.Lock()

    def one(job: tuple[int, tuple]) -> None:
        n, (sig, target, ranks, moment) = job
        while True:   # a run that finished before its signal is no interruption: try again
            with lock:
                i = next(tries)
            case = c.interrupt(i, sig, target, ranks, moment)
            if case["signalled"]:
                break
        follow = "grid run" if n % 2 else "resume"
        try:
            audit = c.audit(case)
            rec = c.recover(case, target, ranks, follow)
            diffs = differences(outputs(c.client, rec["finished"][0]), reference) if rec["finished"] else None
        except Exception as e:   # the campaign's own failure: reported as such, never as a pass
            audit, rec, diffs = {"misjudged": True, "ended": [], "error": repr(e)}, \
                {"finished": [], "resumed": False, "audit_after": ["campaign error"]}, None
        case.pop("env")
        row = {**case, "signal": sig, "target": target, "ranks": ranks, **audit, **rec, "differences": diffs,
               "lost": not rec["finished"]}
        with lock:
            cases.append(row)
            print(f"{len(cases):2d} {sig} {target} x{ranks} {row['moment']:9s} audit "
                  f"{'MISJUDGED' if row['misjudged'] else 'ok'} {follow}: "
                  f"{'LOST' if row['lost'] else 'diff ' + str(len(diffs))} orphans {len(row['orphans'])}", flush=True)
            write(a.out, commit, baselines, base_diffs, cases, t_start, tries_so_far=i)

    with ThreadPoolExecutor(a.workers) as pool:
        list(pool.map(one, enumerate(plan)))
    print(json.dumps(write(a.out, commit, baselines, base_diffs, cases, t_start, tries_so_far=None), indent=1))


def write(out: Path, commit: str, baselines: dict, base_diffs: dict, cases: list, t_start: float,
          tries_so_far: int | None) -> dict:
    """The campaign so far, as JSON (rewritten after every case: a cut-short campaign still reports)."""
    summary = {
        "interruptions": len(cases), "runs_started": tries_so_far,
        "by_kind_and_moment": {f"{s} {t} x{n} {m}": sum(1 for r in cases if (r["signal"], r["target"], r["ranks"],
                                                                             r["moment"]) == (s, t, n, m))
                               for s, t, n, m in itertools.product(SIGNALS, TARGETS, (1, 2), MOMENTS)},
        "resumed": sum(r["resumed"] for r in cases),
        "with_differences": sum(bool(r["differences"]) for r in cases),
        "lost": sum(r["lost"] for r in cases),
        "audit_misjudged": sum(r["misjudged"] for r in cases),
        "printed_commands_failed": sum(e["exit"] != 0 for r in cases for e in r["ended"]),
        "ended_not_at_last_heartbeat": sum(not e["end_time_is_last_sign_of_life"] for r in cases for e in r["ended"]),
        "orphans": sum(len(r["orphans"]) for r in cases),
        "audit_findings_after_recovery": sum(bool(r["audit_after"]) for r in cases),
        "baselines_differ_from_one_rank_reuse_exp_run": base_diffs,
        "minutes": round((time.time() - t_start) / 60, 1),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": " ".join(["python", "benchmarks/faults.py", *sys.argv[1:]]),
                                 "complete": tries_so_far is None, "commit": commit, "machine": machine(), "settings": SETTINGS,
                                 "stale_after_s": STALE, "summary": summary,
                                 "baselines": [{k: v for k, v in b.items() if k != "outputs"}
                                               for b in baselines.values()],
                                 "cases": cases}, indent=1) + "\n")
    return summary


if __name__ == "__main__":
    main()
