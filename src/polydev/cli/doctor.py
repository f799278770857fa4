"""`polydev doctor`: can this machine run VMs as configured? Local; no server needed."""

from __future__ import annotations

import json

import typer


def doctor(as_json: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """Check the VM backend, KVM or TCG, images, network mode and its privileges, Firecracker, and the data
    and cache directories. Exits 0 when the configured setup can run VMs, 1 when it cannot."""
    from polydev.config import get_settings
    from polydev.vm.doctor import can_run_vms, run_checks

    settings = get_settings()
    checks = run_checks(settings)
    ok = can_run_vms(checks)
    if as_json:
        typer.echo(json.dumps({"ok": ok, "backend": settings.vm_backend, "network_mode": settings.network_mode,
                               "image_profile": settings.vm_image_profile,
                               "checks": [c.to_json() for c in checks]}, indent=2))
    else:
        from rich.console import Console
        from rich.table import Table

        colours = {"ok": "green", "warn": "yellow", "fail": "red"}
        table = Table("check", "", "detail", title=f"VM_BACKEND={settings.vm_backend}  "
                                                 f"NETWORK_MODE={settings.network_mode}  "
                                                 f"VM_IMAGE_PROFILE={settings.vm_image_profile}")
        for c in checks:
            table.add_row(c.name, f"[{colours[c.status]}]{c.status}[/]", c.detail)
        console = Console()
        console.print(table)
        console.print("[green]this machine can run VMs[/]" if ok else "[red]this machine cannot run VMs as configured[/]")
    raise typer.Exit(0 if ok else 1)
