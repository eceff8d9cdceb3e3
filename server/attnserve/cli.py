"""The `attnserve` command."""

from __future__ import annotations

import asyncio
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from . import logs

app = typer.Typer(
    help="attnserve: LLM serving with per-request attention interventions.",
    no_args_is_help=True,
    add_completion=False,
)


class LogFormat(str, Enum):
    json = "json"
    text = "text"


@app.callback()
def main() -> None:
    """attnserve server commands."""


@app.command()
def serve(
    config: Annotated[
        Path | None,
        typer.Option(
            help="Server config (YAML or TOML); default: the packaged config.", exists=True, dir_okay=False
        ),
    ] = None,
    host: Annotated[str, typer.Option(help="Address to bind.")] = "0.0.0.0",
    port: Annotated[int, typer.Option(help="gRPC port (0 picks a free one).")] = 50051,
    metrics_port: Annotated[int, typer.Option(help="Prometheus /metrics port.")] = 9400,
    grace: Annotated[float, typer.Option(help="Seconds in-flight requests get to finish on SIGTERM.")] = 25.0,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
    log_format: Annotated[LogFormat, typer.Option(help="json lines or plain text.")] = LogFormat.json,
) -> None:
    """Serve the models of a config over gRPC."""
    from .models.config import ConfigError, load_config
    from .server import serve as run

    logs.configure(log_level, log_format.value)
    try:
        server_config = load_config(config)
    except ConfigError as exc:
        typer.echo(f"config error: {exc}", err=True)
        raise typer.Exit(2) from None
    asyncio.run(run(server_config, host=host, port=port, metrics_port=metrics_port, grace=grace))


if __name__ == "__main__":
    app()
