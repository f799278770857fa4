"""Playwright helpers for the dashboard tests and bench: Debian's Chromium (no browser download), headless,
screenshots into an artifacts directory, signing in, and reading the noVNC canvas."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from tests.support.required import unmet

CHROMIUM = Path("/usr/bin/chromium")
ROOT = Path(__file__).resolve().parents[2]


def artifacts_dir() -> Path:
    path = Path(os.environ.get("POLYDEV_ARTIFACTS") or ROOT / "tests" / "artifacts") / "dashboard"
    path.mkdir(parents=True, exist_ok=True)
    return path


def missing_browser() -> str | None:
    try:
        import playwright  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install -e '.[test]')"
    if not CHROMIUM.exists() or shutil.which(str(CHROMIUM)) is None:
        return "Debian's Chromium is not installed (apt-get install chromium; scripts/test.sh does)"
    return None


def launch() -> Iterator[object]:
    """A headless Chromium under Playwright; skips (fails under POLYDEV_REQUIRE_SERVERS=1) without one."""
    reason = missing_browser()
    if reason:
        unmet(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        # --no-sandbox: the tests run as root in CI, where Chromium's sandbox refuses to start.
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()


def sign_in(page, base_url: str, token: str) -> None:
    page.goto(f"{base_url}/")
    page.get_by_label("API token").fill(token)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(f"{base_url}/app/providers")


def canvas_colours(page, selector: str = ".vnc canvas") -> int:
    """How many distinct colours the noVNC canvas shows (sampled): 1 means blank, or not drawn yet."""
    return page.eval_on_selector(selector, """(c) => {
        const ctx = c.getContext("2d");
        if (!c.width || !c.height) return 0;
        const data = ctx.getImageData(0, 0, c.width, c.height).data;
        const seen = new Set();
        const step = Math.max(4, Math.floor(data.length / 4 / 20000)) * 4;
        for (let i = 0; i < data.length; i += step) seen.add((data[i] << 16) | (data[i + 1] << 8) | data[i + 2]);
        return seen.size;
    }""")


# How many canvas pixels (sampled every 4th row and column) have this colour, give or take a little
# (JPEG/Tight encodings blur edges).
COLOUR_PIXELS = """([c, r, g, b]) => {
    if (!c || !c.width || !c.height) return 0;
    const data = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
    let n = 0;
    for (let y = 0; y < c.height; y += 4) for (let x = 0; x < c.width; x += 4) {
        const i = (y * c.width + x) * 4;
        if (Math.abs(data[i] - r) + Math.abs(data[i + 1] - g) + Math.abs(data[i + 2] - b) < 40) n++;
    }
    return n;
}"""


def wait_for_colour(page, rgb: tuple[int, int, int], pixels: int, timeout_ms: float,
                    selector: str = ".vnc canvas", *, at_most: bool = False) -> None:
    """Until the noVNC canvas shows at least `pixels` (sampled) of colour `rgb` (at most, with `at_most`)."""
    test = "<=" if at_most else ">="
    page.wait_for_function(f"""([sel, r, g, b, n]) => ({COLOUR_PIXELS})([document.querySelector(sel), r, g, b]) {test} n""",
                           arg=[selector, *rgb, pixels], timeout=timeout_ms, polling=100)


def wait_for_drawn(page, timeout_ms: float, selector: str = ".vnc canvas") -> None:
    """Until the noVNC canvas shows more than one colour (anything drawn at all)."""
    page.wait_for_function("""(sel) => {
        const c = document.querySelector(sel);
        if (!c || !c.width) return false;
        const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
        for (let i = 4; i < d.length; i += 4 * 97) if (d[i] !== d[0] || d[i + 1] !== d[1] || d[i + 2] !== d[2]) return true;
        return false;
    }""", arg=selector, timeout=timeout_ms, polling=100)
