"""`polydev image build | ls | test | rm`: the golden VM image."""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from polydev.config import get_settings
from polydev.vm import images

app = typer.Typer(help="Build, list and test the golden VM image.", no_args_is_help=True)
console = Console()
STAGES = ["host packages", "kernel", "debootstrap", "node", "CLIs", "trim", "guest agent", "ext4", "done"]
# The in-VM checks `image test` runs, by npm package; background traffic off as CLI-FACTS.md says (and
# restrict=on blocks it). Each must print the version the image's manifest records.
VERSION_CHECKS = {
    "@anthropic-ai/claude-code": ["claude", "--version"],
    "@openai/codex": ["codex", "-c", "analytics.enabled=false", "--version"],
    "@google/gemini-cli": ["gemini", "--version"],
}
CLI_OPTION = typer.Option([], "--cli", metavar="PROVIDER=VERSION", help="a CLI's version in the image (an exact "
                          "version or latest; repeatable), over POLYDEV_CLI_VERSIONS, e.g. codex=0.180.0")
QUIET_ENV = {"CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "GEMINI_CLI_TRUST_WORKSPACE": "true",
             "DISABLE_AUTOUPDATER": "1", "NO_UPDATE_NOTIFIER": "1"}
GEMINI_SETTINGS = {"privacy": {"usageStatisticsEnabled": False}}


def _cache_dir() -> Path:
    return get_settings().cache_dir


def cli_versions(cli: list[str]) -> dict[str, str]:
    """POLYDEV_CLI_VERSIONS with the --cli options over it; a bad one ends the command with usage status 2."""
    from polydev.config import PROVIDERS
    from polydev.config.cli_versions import check_cli_versions, parse_cli_versions

    try:
        return {**get_settings().cli_versions, **check_cli_versions(parse_cli_versions(cli), PROVIDERS)}
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--cli") from None


def build_with_progress(profile: str, rebuild: bool = False,
                        versions: dict[str, str] | None = None) -> tuple[images.Image, bool, float]:
    started = time.monotonic()
    columns = (SpinnerColumn(), TextColumn("[bold]{task.fields[stage]:<13}"), BarColumn(bar_width=20),
               TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
               TextColumn("[dim]{task.description}"))
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task("", total=len(STAGES), stage="cache")

        last_stage = [""]

        def report(stage: str, line: str) -> None:
            done = STAGES.index(stage) if stage in STAGES else 0
            bar.update(task, completed=max(done, bar.tasks[0].completed), stage=stage, description=line[:90])
            if not console.is_terminal and stage != last_stage[0]:  # CI logs: one line per stage
                last_stage[0] = stage
                console.print(f"{time.monotonic() - started:7.1f} s  {stage}: {line[:100]}")

        try:
            image, built = images.ensure(_cache_dir(), profile, report, rebuild=rebuild, versions=versions)
        except images.VersionUnresolved as exc:
            console.print(f"[red]error:[/] {exc}")
            raise typer.Exit(1) from None
        bar.update(task, completed=len(STAGES), stage="done", description=str(image.dir))
    return image, built, time.monotonic() - started


@app.command("build")
def build(profile: str = typer.Option("test", help="test (no browser) or full (Xtigervnc + Chromium)"),
          rebuild: bool = typer.Option(False, help="build even if the cache has this recipe"),
          cli: list[str] = CLI_OPTION) -> None:
    """Build the image for a profile, or reuse the cached one when its recipe is unchanged."""
    if profile not in images.PROFILES:
        raise typer.BadParameter(f"choose one of {', '.join(images.PROFILES)}", param_hint="--profile")
    image, built, seconds = build_with_progress(profile, rebuild, cli_versions(cli))
    verb = "built" if built else "reused from cache"
    clis = ", ".join(f"{k.rsplit('/', 1)[-1]} {v}" for k, v in dict(image.manifest.get("clis") or {}).items())
    console.print(f"[green]{verb}[/] {profile} image {image.hash} in {seconds:.2f} s: {image.dir}")
    console.print(f"CLIs: {clis}")


@app.command("ls")
def ls(as_json: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """List cached images with profile, size, build time and hash."""
    found = images.list_images(_cache_dir())
    rows = [{"hash": i.hash, "profile": i.profile, "size_mib": round(i.rootfs.stat().st_blocks * 512 / 2**20),
             "built_at": i.manifest.get("built_at"), "build_seconds": i.manifest.get("build_seconds"),
             "clis": i.manifest.get("clis"), "path": str(i.dir)} for i in found]
    if as_json:
        console.print_json(json.dumps(rows))
        return
    if not rows:
        console.print(f"no images in {images.images_dir(_cache_dir())}; run `polydev image build`")
        return
    table = Table("hash", "profile", "disk used", "built at", "build time", "CLIs")
    for r in rows:
        clis = ", ".join(f"{k.rsplit('/', 1)[-1]} {v}" for k, v in (r["clis"] or {}).items())  # type: ignore[union-attr]
        table.add_row(r["hash"], r["profile"], f"{r['size_mib']} MiB", str(r["built_at"]),
                      f"{r['build_seconds']} s", clis)
    console.print(table)


@app.command("test")
def test(profile: str = typer.Option("test", help="which cached image to boot (built first if missing)"),
         accel: str = typer.Option("auto", help="auto (KVM, else TCG), kvm or tcg"),
         cli: list[str] = CLI_OPTION) -> None:
    """Boot the image once, wait for the agent, run the three CLIs' --version inside and check each reports
    the version the image's manifest records; print the timings. Exits 1 when one does not."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    image, _, _ = build_with_progress(profile, versions=cli_versions(cli))
    if not check_image(image, accel):
        raise typer.Exit(1)


def check_image(image: images.Image, accel: str = "auto") -> bool:
    """Boot `image`, run each CLI's --version (and Chromium for `full`) in it; print the table; True when all
    started and reported the manifest's versions."""
    from polydev.vm.backends.qemu.machine import QemuVM

    expected = dict(image.manifest.get("clis") or {})
    failed = False
    with tempfile.TemporaryDirectory(prefix="polydev-image-test-") as tmp:
        vm = QemuVM(image, Path(tmp) / "vm", accel=accel, keep_console=False)
        with console.status("booting (QEMU)…"):
            vm.start()
        console.print(f"agent ready [bold]{vm.boot_seconds:.1f} s[/] after QEMU start ({vm.accel}); "
                      f"the seed waited a fixed 45 s before its first health check")
        try:
            with vm.client(timeout=120) as agent:
                agent.put_file("/root/.gemini/settings.json", json.dumps(GEMINI_SETTINGS).encode(), 0o600)
                table = Table("CLI", "exit", "seconds", "expected", "output")
                for package, args in VERSION_CHECKS.items():
                    with console.status(f"{' '.join(args)} …"):
                        result = agent.exec(args, env=QUIET_ENV, timeout_s=300)
                    text = (result.stdout or result.stderr).decode(errors="replace").strip()
                    want = str(expected.get(package, "?"))
                    ok = result.exit_code == 0 and reports_version(text, want)
                    failed |= not ok
                    table.add_row(args[0], str(result.exit_code), f"{result.duration_s:.1f}",
                                  want if ok else f"[red]{want}[/]", text[:80])
                if image.profile == "full":
                    with console.status("chromium --headless --dump-dom about:blank …"):
                        result = agent.exec(["chromium", "--headless", "--no-sandbox", "--disable-gpu",
                                             "--no-first-run", "--disable-background-networking",
                                             "--dump-dom", "about:blank"], timeout_s=300)
                    failed |= result.exit_code != 0 or b"<html" not in result.stdout
                    table.add_row("chromium", str(result.exit_code), f"{result.duration_s:.1f}", "",
                                  result.stdout.decode(errors="replace").strip()[:80])
                console.print(table)
        finally:
            vm.stop()
    return not failed


@app.command("update")
def update(profile: str = typer.Option(None, help="the profile to follow (default: VM_IMAGE_PROFILE)"),
           check: bool = typer.Option(False, "--check", help="only report what the npm registry has"),
           accel: str = typer.Option("auto", help="for the image's test: auto (KVM, else TCG), kvm or tcg")) -> None:
    """Follow the CLIs: ask the npm registry for newer versions, build an image with them, test it (every CLI
    starts and reports its version) and only then make it the active image: running servers switch to it
    within seconds, with no downtime (work in progress finishes on the old one). A failed build or test leaves
    the active image as it was. Exits 0 when up to date or updated."""
    from polydev.vm import image_updates

    settings = get_settings()
    profile = profile or settings.vm_image_profile
    if settings.cli_versions:
        console.print("[yellow]note:[/] POLYDEV_CLI_VERSIONS pins versions; servers use those, not the active "
                      "image, until it is unset")
    current = image_updates.in_use(_cache_dir(), profile)
    try:
        found = image_updates.updates(current)
    except images.VersionUnresolved as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(1) from None
    table = Table("CLI", "in use", "latest", "")
    for u in found:
        table.add_row(u.package, u.current or "-", u.latest, "[green]newer[/]" if u.newer else "")
    console.print(f"{profile} image in use: {current.hash if current else 'none built'}")
    console.print(table)
    if not any(u.newer for u in found):
        console.print("up to date")
        return
    if check:
        return
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    image, _, _ = build_with_progress(profile, versions=image_updates.latest_versions(found))
    if not check_image(image, accel):
        console.print(f"[red]the new image {image.hash} failed its test:[/] the active image is unchanged")
        raise typer.Exit(1)
    image_updates.activate(_cache_dir(), image)
    console.print(f"[green]active:[/] {profile} image {image.hash}; running servers switch to it within 15 s "
                  "(new VMs; work in progress finishes on the old image, which is removed once unused)")


def reports_version(output: str, version: str) -> bool:
    """Whether a CLI's `--version` output names exactly `version` (2.1.19 is not 2.1.197)."""
    import re

    return re.search(rf"(?<![\w.]){re.escape(version)}(?![\w.])", output) is not None


@app.command("rm")
def rm(image_hash: str) -> None:
    """Remove a cached image by hash."""
    if not images.remove(_cache_dir(), image_hash):
        raise typer.BadParameter(f"no image {image_hash}")
    console.print(f"removed {image_hash}")


@app.command("prune")
def prune() -> None:
    """Remove cached images and base trees that no current recipe uses (stop VMs on old images first)."""
    try:
        from polydev.vm import image_updates

        active = tuple(i for p in images.PROFILES if (i := image_updates.active(_cache_dir(), p)) is not None)
        removed = images.prune(_cache_dir(), get_settings().cli_versions, also_keep=active)
    except images.VersionUnresolved as exc:
        console.print(f"[red]error:[/] nothing removed: which image the settings use is not known: {exc}")
        raise typer.Exit(1) from None
    console.print("\n".join(f"removed {name}" for name in removed) or "nothing to remove")
