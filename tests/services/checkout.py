"""A clean git checkout of the working tree in a temp dir, for runs that refuse dirty trees.

Tracked and untracked-but-not-ignored files are copied and committed, so the tracked run
sees a clean tree at a real commit, whatever state the developer's tree is in; `commit()`
then moves HEAD, which is how a test makes the grid's runs stale.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# No hub; one OpenMP thread: tiny models on 2 shared cores run 30x slower with torch's
# default threads spinning against other processes (warm-up 18 s instead of 0.5 s).
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
GIT_ID = {"GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@localhost",
          "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@localhost"}


def _git(args: list[str], cwd: Path) -> str:
    out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=60,
                         env={**os.environ, **GIT_ID})
    if out.returncode:
        raise RuntimeError(f"git {' '.join(args)} failed: {out.stderr.strip()}")
    return out.stdout


@dataclass
class Checkout:
    root: Path

    @property
    def head(self) -> str:
        return _git(["rev-parse", "HEAD"], self.root).strip()

    def commit(self, name: str, text: str) -> str:
        (self.root / name).write_text(text)
        _git(["add", name], self.root)
        _git(["commit", "-q", "-m", f"test: {name}"], self.root)
        return self.head

    def env(self, **extra: str) -> dict[str, str]:
        """This checkout's package first on the path (not the developer's editable install),
        no hub, and no MLflow settings but those given."""
        base = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PYTEST_"))}
        return {**base, **OFFLINE, "PYTHONPATH": str(self.root), **extra}

    def cli(self, args: list[str], env: dict, timeout: int = 900) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "reuse_exp.cli", *args], cwd=self.root, env=env,
                              capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def clean_checkout(dest: Path) -> Checkout:
    files = _git(["ls-files", "-z", "--cached", "--others", "--exclude-standard"], REPO).split("\0")
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file():   # a deleted-but-tracked file is simply left out
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    shutil.copy2(REPO / ".gitignore", dest / ".gitignore")
    _git(["init", "-q", "-b", "main"], dest)
    _git(["add", "-A"], dest)
    _git(["commit", "-q", "-m", "test: snapshot of the working tree"], dest)
    return Checkout(dest)
