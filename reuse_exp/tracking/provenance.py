"""Where a run's code came from: the commit, whether the tree was dirty (and its diff), and
the secrets that must never reach the tracking store."""
from __future__ import annotations

import hashlib
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from ..errors import DirtyTree

PACKAGE_DIR = Path(__file__).resolve().parents[1]
SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSW|API_?KEY|ACCESS_?KEY|PRIVATE_?KEY|CREDENTIAL|AUTH", re.I)


@dataclass(frozen=True)
class Provenance:
    commit: str                    # HEAD's sha, or "unknown" outside git
    branch: str
    dirty: bool
    dirty_files: tuple[str, ...]   # tracked changes and untracked-not-ignored files, the store excluded
    root: Path | None              # the checkout (of the package's files, unless asked of another)
    source_hash: str


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def source_hash(pkg: Path = PACKAGE_DIR) -> str:
    """Content hash of the package's files (code, tasks, bundled weights), bytecode excluded."""
    h = hashlib.sha256()
    for f in sorted(p for p in pkg.rglob("*") if p.is_file()):
        if "__pycache__" in f.parts or f.suffix == ".pyc":
            continue
        h.update(f.relative_to(pkg).as_posix().encode() + b"\0")
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def store_paths(tracking_uri: str | None = None) -> list[Path]:
    """Files and folders of a local tracking store: changes there are not the code's."""
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    paths = [Path.cwd() / "mlruns"]
    if uri.startswith("sqlite:///"):
        db = Path(unquote(uri[len("sqlite:///"):]))
        db = db if db.is_absolute() else Path.cwd() / db
        paths += [db.with_name(db.name + suffix) for suffix in ("", "-journal", "-wal", "-shm", "-lock")]
    elif uri.startswith("file:") or "://" not in uri:
        paths.append(Path(unquote(urlparse(uri).path) if uri.startswith("file:") else uri))
    return [p.resolve() for p in paths]


def _porcelain_paths(out: str) -> list[str]:
    """Paths of `git status --porcelain -z` (a rename's source entry skipped)."""
    entries, files, skip = out.split("\0"), [], False
    for e in entries:
        if skip:
            skip = False
            continue
        if len(e) > 3:
            files.append(e[3:])
            skip = e[0] in "RC"
    return files


def checkout_root(where: Path | None = None) -> Path | None:
    """The top of the git checkout holding `where` (the current directory by default), or None."""
    top = _git(["rev-parse", "--show-toplevel"], where or Path.cwd())
    return Path(top.strip()) if top else None


def provenance(exclude: list[Path] | None = None, pkg: Path = PACKAGE_DIR) -> Provenance:
    """Where the code in `pkg` came from (by default the running package's). Outside git:
    commit `unknown`, dirty."""
    digest = source_hash(pkg)
    root = checkout_root(pkg)
    if root is None:
        return Provenance("unknown", "unknown", True, (f"{pkg} is not in a git checkout",), None, digest)
    commit = (_git(["rev-parse", "HEAD"], root) or "unknown").strip()
    branch = (_git(["rev-parse", "--abbrev-ref", "HEAD"], root) or "unknown").strip()
    status = _git(["status", "--porcelain=v1", "-z", "--untracked-files=all"], root)
    if status is None:
        return Provenance(commit, branch, True, ("git status failed",), root, digest)
    excluded = [p.resolve() for p in (exclude if exclude is not None else store_paths())]
    files = []
    for rel in _porcelain_paths(status):
        full = (root / rel).resolve()
        if not any(full == x or x in full.parents for x in excluded):
            files.append(rel)
    return Provenance(commit, branch, bool(files) or commit == "unknown", tuple(files), root, digest)


def check_clean(prov: Provenance, allow_dirty: bool) -> None:
    """The dirty guard: refuse a run whose code is not a commit, unless told otherwise."""
    if not prov.dirty or allow_dirty:
        return
    shown = ", ".join(prov.dirty_files[:10]) + (f" and {len(prov.dirty_files) - 10} more"
                                                 if len(prov.dirty_files) > 10 else "")
    if prov.commit == "unknown":
        raise DirtyTree(f"refusing to run: the code is not a git commit ({shown}); "
                        "run from a git checkout, or pass --allow-dirty (-P allow_dirty=true)")
    raise DirtyTree(f"refusing to run from a dirty tree: {shown}; commit (or ignore) them, "
                    "or pass --allow-dirty (-P allow_dirty=true) to run anyway, tagged dirty")


def dirty_diff(prov: Provenance, max_bytes: int = 5 << 20) -> str:
    """`git diff HEAD` plus every untracked file as an addition, for the dirty.diff artifact."""
    if prov.root is None:
        return "\n".join(prov.dirty_files) + "\n"
    parts = [_git(["diff", "HEAD"], prov.root) or ""]
    tracked = set((_git(["ls-files"], prov.root) or "").splitlines())
    for rel in prov.dirty_files:
        if rel not in tracked and (prov.root / rel).is_file():
            out = subprocess.run(["git", "diff", "--no-index", "--", "/dev/null", rel], cwd=prov.root,
                                 capture_output=True, text=True, errors="replace", timeout=60)
            parts.append(out.stdout)
    text = "".join(parts)
    return text if len(text) <= max_bytes else text[:max_bytes] + "\n[diff truncated]\n"



def secret_values(environ=None) -> list[str]:
    env = os.environ if environ is None else environ
    return sorted({v for k, v in env.items() if SECRET_NAME.search(k) and len(v) >= 6}, key=len, reverse=True)


def redact(text: str, secrets: list[str] | None = None) -> str:
    for s in secret_values() if secrets is None else secrets:
        text = text.replace(s, "[redacted]")
    return text
