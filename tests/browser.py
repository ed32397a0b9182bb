"""Render a page in headless Chromium (Debian's `chromium`) and read back what the browser laid out.

The probe script is appended to a copy of the page; Chromium runs it after layout and writes its
findings into the DOM, which `--dump-dom` prints. So the figures come from the browser's own
rendering (element sizes, what is visible), not from parsing our HTML.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

PROBE = """
<script>
window.addEventListener('load', () => {
  const box = (e) => { const r = e.getBoundingClientRect(); return {w: r.width, h: r.height}; };
  const visible = (e) => { const b = box(e); const s = getComputedStyle(e);
                           return b.w > 0 && b.h > 0 && s.display !== 'none' && s.visibility !== 'hidden'; };
  const found = {
    svgs: [...document.querySelectorAll('svg')].map(s => ({cls: s.getAttribute('class'), ...box(s),
             visible: visible(s), rects: [...s.querySelectorAll('rect')].filter(visible).length,
             points: [...s.querySelectorAll('circle')].filter(visible).length,
             lines: [...s.querySelectorAll('polyline')].filter(p => { const b = box(p); return b.w > 0 || b.h > 0; }).length})),
    tables: [...document.querySelectorAll('table')].map(t => ({cls: t.getAttribute('class'), visible: visible(t),
             head: [...t.querySelectorAll('thead th')].map(c => c.innerText.trim()),
             rows: [...t.querySelectorAll('tbody tr')].map(r => [...r.cells].map(c => c.innerText.trim()))})),
    marks: [...document.querySelectorAll('[class]')].filter(e => ['decision', 'decision-line', 'side-by-side',
             'threshold', 'threshold-label', 'fallback-zone', 'axis-x', 'axis-y', 'disagreements', 'student']
             .some(c => e.classList.contains(c))).map(e => { const r = e.getBoundingClientRect();
             return {cls: e.getAttribute('class'), top: r.top + window.scrollY, left: r.left, w: r.width, h: r.height,
                     visible: visible(e) || (e.tagName === 'line' && (r.width > 0 || r.height > 0)),
                     text: (e.innerText || e.textContent || '').trim().slice(0, 2000)}; }),
    title: document.title,
    text: document.body.innerText.slice(0, 20000),
  };
  const out = document.createElement('pre'); out.id = 'distill-probe';
  out.textContent = JSON.stringify(found); document.body.appendChild(out);
});
</script>
"""


def chromium() -> str:
    """The Chromium binary; without one, skip (or fail where CI requires it: DISTILL_REQUIRE_CHROMIUM=1)."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    message = "no headless Chromium: run scripts/setup-browser.sh (installs Debian's chromium)"
    if os.environ.get("DISTILL_REQUIRE_CHROMIUM") == "1":
        pytest.fail(message)
    pytest.skip(message)


def _flags(profile: str) -> list[str]:
    return ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
            "--hide-scrollbars", f"--user-data-dir={profile}", "--virtual-time-budget=5000"]


def screenshot(page: Path, png: Path, width: int = 1280, height: int = 2400, timeout_s: float = 60) -> Path:
    """A PNG of `page` as Chromium paints it in a `width` x `height` window (the top of the page first)."""
    binary = chromium()
    with tempfile.TemporaryDirectory(prefix="distill-browser-") as tmp:
        done = subprocess.run([binary, *_flags(f"{tmp}/profile"), f"--window-size={width},{height}",
                               f"--screenshot={png}", page.resolve().as_uri()],
                              capture_output=True, text=True, timeout=timeout_s, check=False)
    assert png.exists() and png.stat().st_size > 0, f"Chromium wrote no screenshot (exit {done.returncode}): " \
        f"{done.stderr[-2000:]}"
    return png


def png_size(png: Path) -> tuple[int, int]:
    """(width, height) from a PNG's header."""
    head = png.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{png} is not a PNG"
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def render(page: Path, timeout_s: float = 60) -> dict:
    """What Chromium laid out for `page`: its svgs (size, visible bars, points, lines), tables, the report's
    marked elements (`marks`: the decision, the side-by-side table, the threshold, the axes: where each stands
    on the page and its text) and the page's text."""
    binary = chromium()
    with tempfile.TemporaryDirectory(prefix="distill-browser-") as tmp:
        copy = Path(tmp) / "page.html"
        html = page.read_text(encoding="utf-8")
        copy.write_text(html.replace("</body>", PROBE + "</body>") if "</body>" in html else html + PROBE,
                        encoding="utf-8")
        done = subprocess.run(
            [binary, *_flags(f"{tmp}/profile"), "--window-size=1280,2000", "--dump-dom", copy.as_uri()],
            capture_output=True, text=True, timeout=timeout_s, check=False)
    match = re.search(r'<pre id="distill-probe">(.*?)</pre>', done.stdout, re.DOTALL)
    assert match, f"Chromium rendered no probe (exit {done.returncode}): {done.stderr[-2000:]}"
    import html as html_lib

    return json.loads(html_lib.unescape(match.group(1)))
