"""The `polydev` command. Each command group lives in its own module and is mounted here."""

from __future__ import annotations

import typer

from polydev.cli import (
    config_cmd,
    doctor,
    egress,
    flows,
    keys,
    quota,
    remote,
    serve,
    users,
    web,
    workspaces,
)

app = typer.Typer(help="Polydev: AI coding CLIs in disposable microVMs.", no_args_is_help=True,
                  pretty_exceptions_show_locals=False)
app.command("serve")(serve.serve)
app.command("config")(config_cmd.config)
app.add_typer(keys.app, name="keys")
app.add_typer(users.app, name="users")
app.command("login")(flows.login)
app.command("run")(flows.run)
app.add_typer(workspaces.app, name="workspace")
app.command("diff")(workspaces.diff)
app.command("pull")(workspaces.pull)
app.add_typer(remote.credentials, name="credentials")
app.add_typer(remote.vm, name="vm")
app.add_typer(egress.app, name="egress")
app.add_typer(quota.app, name="quota")
app.command("doctor")(doctor.doctor)
app.add_typer(web.app, name="web")

try:  # the image commands arrive with the VM engine (issue 3); keep the CLI usable without them
    from polydev.cli import image
except ImportError:  # pragma: no cover
    image = None  # type: ignore[assignment]
else:
    app.add_typer(image.app, name="image")


def main() -> None:
    app()
