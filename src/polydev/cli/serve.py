from __future__ import annotations

import typer


def serve(
    host: str = typer.Option(None, help="listen address (default: HOST, else 127.0.0.1)"),
    port: int = typer.Option(None, help="listen port (default: PORT, else 4000)"),
) -> None:
    """Run the control plane API. Migrations run on start."""
    import uvicorn

    from polydev.api.app import create_app
    from polydev.config import get_settings
    from polydev.logging import configure_logging

    settings = get_settings()
    configure_logging(settings.log_level)
    uvicorn.run(create_app(settings), host=host or settings.host, port=port or settings.port,
                log_config=None, proxy_headers=False, timeout_graceful_shutdown=10)
