"""Time from clicking Connect in the dashboard to the provider's login page visible in the noVNC canvas.

    .venv/bin/python bench/login_visible.py [--rounds 3] [--provider claude_code] [--pool [--settle 60]]

A real `polydev serve` booting full-image VMs (QEMU, user networking), the dashboard in Debian's Chromium
(headless, Playwright), the provider played by the stand-ins of tests/support/vm_login_stand.py. Each round: sign
in, click Connect, and note when the session reaches awaiting_user_auth, when the canvas appears (VNC up,
bridge connected), when it first shows anything (Xtigervnc + Chromium's placeholder page), and when it shows
the login page itself (the stand-in sign-in page's banner colour). Then cancel, and the next round.

With --pool the server keeps one pre-started login for the provider (LOGIN_POOL): each round starts once
/health says the pool holds a login whose URL is known, plus --settle seconds (the steady state, when users
do not arrive right after the previous one; 0 shows the worst case, the page maybe still loading).

The seed's figure: ≥ 90 s before its noVNC showed the login page (a fixed 45 s sleep before the first health
check, then Chromium and VNC started cold).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.standins.signin import BANNER_RGB, BUTTON_RGB
from tests.support.dashboard_browser import (
    launch,
    missing_browser,
    sign_in,
)
from tests.support.vm_login_stand import full_image_missing, vm_stand

SEED_S = 90.0
WAIT_MS = 900_000  # a bound on a hang, not a measurement


# What the page shows, polled every 100 ms: each mark is the first poll that saw it.
PROBE = """([banner, button]) => {
    const c = document.querySelector(".vnc canvas");
    const s = document.querySelector("p.status")?.dataset.status;
    const out = {awaiting: s === "awaiting_user_auth", canvas: !!(c && c.width && c.offsetParent), drawn: false,
                 login: false, ended: ["failed", "timeout", "cancelled"].includes(s)};
    if (!out.canvas) return out;
    const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
    let first = null, b1 = 0, b2 = 0;
    for (let i = 0; i < d.length; i += 4 * 7) {
        const px = (d[i] << 16) | (d[i + 1] << 8) | d[i + 2];
        if (first === null) first = px; else if (px !== first) out.drawn = true;
        if (Math.abs(d[i] - banner[0]) + Math.abs(d[i + 1] - banner[1]) + Math.abs(d[i + 2] - banner[2]) < 40) b1++;
        if (Math.abs(d[i] - button[0]) + Math.abs(d[i + 1] - button[1]) + Math.abs(d[i + 2] - button[2]) < 40) b2++;
    }
    out.login = b1 > 2000 && b2 > 10000;  // the whole page, banner and button
    return out;
}"""
MARKS = {"canvas": "VNC canvas shown", "drawn": "first frame drawn", "awaiting": "awaiting_user_auth",
         "login": "login page visible"}


def one_round(page, url: str, provider: str) -> dict[str, float]:
    page.goto(f"{url}/app/providers")
    button = page.locator(f'section[data-provider="{provider}"]').get_by_role("button", name="Connect", exact=True)
    button.wait_for()
    t0 = time.monotonic()
    button.click()
    marks: dict[str, float] = {}
    deadline = t0 + WAIT_MS / 1000
    while "login" not in marks:
        seen = page.evaluate(PROBE, [list(BANNER_RGB), list(BUTTON_RGB)])
        if seen["ended"] or time.monotonic() > deadline:
            raise RuntimeError(f"the login ended or hung before its page showed: {seen}")
        for key in MARKS:
            if seen[key] and key not in marks:
                marks[key] = time.monotonic() - t0
        page.wait_for_timeout(100)
    page.get_by_role("button", name="Cancel").click()
    page.wait_for_selector('p.status[data-status="cancelled"]', timeout=WAIT_MS)
    return {MARKS[k]: v for k, v in sorted(marks.items(), key=lambda kv: kv[1])}


def wait_for_pool(url: str, key: str, settle: float) -> None:
    import httpx

    deadline = time.monotonic() + WAIT_MS / 1000
    while True:
        pool = httpx.get(f"{url}/health", timeout=30).json()["vm"]["login_pool"].get(key, {})
        if pool.get("ready", 0) >= 1:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"the login pool did not get a login ready: {pool}")
        time.sleep(1)
    time.sleep(settle)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--provider", default="claude_code", choices=("claude_code", "codex", "gemini_cli"))
    parser.add_argument("--pool", action="store_true", help="with one pre-started login (LOGIN_POOL)")
    parser.add_argument("--settle", type=float, default=60.0,
                        help="with --pool: seconds to wait after the pool has a login ready")
    args = parser.parse_args()
    reason = full_image_missing() or missing_browser()
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    results: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="polydev-bench-login-") as tmp:
        stand_gen = vm_stand(Path(tmp), **({"LOGIN_POOL": f"{args.provider}=1"} if args.pool else {}))
        stand = next(stand_gen)
        browser_gen = launch()
        try:
            browser = next(browser_gen)
            page = browser.new_page(viewport={"width": 1280, "height": 1000})  # type: ignore[attr-defined]
            sign_in(page, stand.server.url, stand.server.admin_token)
            for n in range(1, args.rounds + 1):
                if args.pool:
                    wait_for_pool(stand.server.url, f"{args.provider}:browser", args.settle)
                marks = one_round(page, stand.server.url, args.provider)
                results.append(marks)
                print(f"round {n}: " + ", ".join(f"{k} {v:.1f} s" for k, v in marks.items()), flush=True)
            # QEMU falls back to software emulation where KVM does not work; the server log says which ran.
            accel = "TCG (software emulation)" if "(tcg)" in stand.server.log.read_text() else "KVM"
        finally:
            browser_gen.close()
            stand_gen.close()
    mode = f", pre-started login ready {args.settle:.0f} s before" if args.pool else ""
    print(f"\nConnect → login page visible in the canvas ({args.provider}, {len(results)} rounds, QEMU, "
          f"full image{mode}):")
    for key in MARKS.values():
        values = [r[key] for r in results if key in r]
        print(f"  {key:<20} median {statistics.median(values):6.1f} s   min {min(values):6.1f} s   "
              f"max {max(values):6.1f} s")
    best = statistics.median(r["login page visible"] for r in results)
    print(f"\nseed: ≥ {SEED_S:.0f} s   polydev: {best:.1f} s (median, {accel})   polydev/seed = {best / SEED_S:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
