"""Headless Chromium (Debian's) reading a page on loopback: the DOM after the JS app ran."""
from __future__ import annotations

import html
import re
import shutil
import subprocess
import tempfile

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def binary() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def page_text(url: str, budget_ms: int = 30000, width: int = 3800, timeout: float = 180) -> str:
    """The rendered DOM's visible text, whitespace collapsed. `--virtual-time-budget` lets the
    app fetch and render before the dump; the wide window keeps every run's column rendered
    (the UI's tables virtualise columns out of view). A fresh profile each time."""
    assert url.startswith(("http://127.0.0.1:", "http://localhost:")), "loopback only"
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        out = subprocess.run([binary(), *FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}",
                              f"--window-size={width},1400", "--dump-dom", url],
                             capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if out.returncode:
        raise RuntimeError(f"chromium exited {out.returncode}: {out.stderr[-2000:]}")
    dom = re.sub(r"<(script|style)\b.*?</\1>", " ", out.stdout, flags=re.S)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", dom))).strip()
