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


def page_dom(url: str, budget_ms: int = 30000, width: int = 3800, timeout: float = 180) -> str:
    """The DOM after the JS app ran. `--virtual-time-budget` lets the app fetch and render before
    the dump; the wide window keeps every run's column rendered (the UI's tables virtualise
    columns out of view). A fresh profile each time: nothing configured in the browser."""
    assert url.startswith(("http://127.0.0.1:", "http://localhost:")), "loopback only"
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        out = subprocess.run([binary(), *FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}",
                              f"--window-size={width},1400", "--dump-dom", url],
                             capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if out.returncode:
        raise RuntimeError(f"chromium exited {out.returncode}: {out.stderr[-2000:]}")
    return out.stdout


def visible_text(dom: str) -> str:
    """A DOM's visible text, whitespace collapsed."""
    dom = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", dom))).strip()


def page_text(url: str, **kw) -> str:
    return visible_text(page_dom(url, **kw))


def column_positions(dom: str) -> dict[str, int]:
    """The runs table's header cells by column id, at their horizontal offset on screen (ag-grid
    keeps its DOM in definition order and places the columns by `left`)."""
    cells = re.findall(r'role="columnheader"[^>]*?col-id="([^"]+)"[^>]*?style="left: (\d+)px', dom)
    return {html.unescape(col): int(left) for col, left in cells}


def screenshot(url: str, path, budget_ms: int = 30000, size: tuple[int, int] = (1600, 900), timeout: float = 180):
    """A PNG of the page as a user's window shows it, once the app has rendered."""
    assert url.startswith(("http://127.0.0.1:", "http://localhost:")), "loopback only"
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        out = subprocess.run([binary(), *FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}",
                              f"--window-size={size[0]},{size[1]}", f"--screenshot={path}", url],
                             capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if out.returncode:
        raise RuntimeError(f"chromium exited {out.returncode}: {out.stderr[-2000:]}")
