"""Image cache hit, boot-to-ready and in-VM CLI start times, against the seed's fixed 45 s wait.

    .venv/bin/python bench/boot_bench.py [--boots 3] [--accel auto|kvm|tcg] [--profile test] [--no-clis]

Builds the image first if the cache lacks it (that time is printed but not part of the figures). Each boot
gets a fresh overlay and a fresh token; the CLIs run twice in the last VM to show the effect of Node's
compile cache filled by the first run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from polydev.config import Settings
from polydev.vm import images
from polydev.vm.backends.qemu.machine import QemuVM

SEED_FIXED_DELAY_S = 45.0
CLIS = {"claude": ["claude", "--version"], "codex": ["codex", "--version"], "gemini": ["gemini", "--version"]}
QUIET = {"CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "GEMINI_CLI_TRUST_WORKSPACE": "true"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--boots", type=int, default=3)
    parser.add_argument("--accel", default="auto", choices=["auto", "kvm", "tcg"])
    parser.add_argument("--profile", default="test", choices=list(images.PROFILES))
    parser.add_argument("--no-clis", action="store_true")
    args = parser.parse_args()
    cache = Settings().cache_dir

    t0 = time.monotonic()
    image, built = images.ensure(cache, args.profile)
    print(f"image {image.hash}: {'built' if built else 'cached'} in {time.monotonic() - t0:.2f} s")
    hits = []
    for _ in range(5):
        t0 = time.monotonic()
        images.ensure(cache, args.profile)
        hits.append(time.monotonic() - t0)
    print(f"cache hit: median {statistics.median(hits) * 1000:.1f} ms over {len(hits)} calls")

    boots: list[float] = []
    with tempfile.TemporaryDirectory(prefix="polydev-bench-") as tmp:
        for i in range(args.boots):
            vm = QemuVM(image, Path(tmp) / f"vm{i}", accel=args.accel, keep_console=False)
            try:
                boots.append(vm.start())
                with vm.client(timeout=300) as agent:
                    t0 = time.monotonic()
                    agent.exec(["true"])
                    rtt = time.monotonic() - t0
                    print(f"boot {i + 1}: ready in {boots[-1]:.2f} s ({vm.accel}); exec `true` {rtt * 1000:.0f} ms")
                    if not args.no_clis and i == args.boots - 1:
                        for run in ("first", "second"):
                            for name, argv in CLIS.items():
                                result = agent.exec(argv, env=QUIET, timeout_s=600)
                                out = result.stdout.decode(errors="replace").strip()
                                print(f"  {run:6} {name:6} exit {result.exit_code} {result.duration_s:6.1f} s  {out}")
            finally:
                vm.stop()
    med = statistics.median(boots)
    print(f"boot-to-ready: median {med:.2f} s over {len(boots)} boots (min {min(boots):.2f}, max {max(boots):.2f}); "
          f"seed: fixed {SEED_FIXED_DELAY_S:.0f} s before its first health check -> {SEED_FIXED_DELAY_S / med:.1f}x sooner")


if __name__ == "__main__":
    sys.exit(main())
