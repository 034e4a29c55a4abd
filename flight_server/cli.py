"""The ``flight-share`` command.

One click group; commands live in help sections (:mod:`flight_server.cli_support`). The server-side
commands are here and in :mod:`flight_server.cli_project`, the client-side ones in
:mod:`flight_server.cli_data`. Every error is printed by one table (``cli_support.cli_error``).
"""

from __future__ import annotations

import importlib.metadata
import logging
import sys
from pathlib import Path

import click

from flight_server.cli_data import DATA_COMMANDS
from flight_server.cli_project import DEFAULT_PROJECT, PROJECT_COMMANDS
from flight_server.cli_support import DATA_SECTION, EXIT_CODES, SERVER_SECTION, SectionedGroup, set_debug
from flight_server.config import ConfigError, load_project


def _project(path: str):
    try:
        return load_project(path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


def _version() -> str:
    try:
        return importlib.metadata.version("flight-share")
    except importlib.metadata.PackageNotFoundError:
        return "(not installed: running from a checkout)"


_EPILOG = "Exit codes: " + "; ".join(f"{code} {what}" for code, what in EXIT_CODES.items()) + "."


@click.group(cls=SectionedGroup, context_settings={"help_option_names": ["-h", "--help"]}, epilog=_EPILOG)
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.version_option(_version(), "--version", prog_name="flight-share", message="%(prog)s %(version)s")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """flight-share: share the datasets of a dlt project over Arrow Flight.

    Run `flight-share COMMAND --help` for a command's options and examples.
    """
    set_debug(ctx, debug)


@main.command(section=SERVER_SECTION)
@click.option("--project", "project_path", default=DEFAULT_PROJECT, show_default=True, help="Project file (dlt.yml).")
@click.option("--host", default=None, help="Address to listen on (default: the project's server.host).")
@click.option("--port", type=int, default=None, help="Port (default: the project's server.port; 0 picks a free one).")
@click.option("--profile", default=None, help="Profile for every caller (default: the project's server.profile).")
@click.option("--health-port", type=int, default=None,
              help="Also serve the standard gRPC health service (grpc.health.v1) on this port (0 picks a free one).")
def serve(project_path: str, host: str | None, port: int | None, profile: str | None, health_port: int | None) -> None:
    """Serve the project's datasets over Arrow Flight."""
    from flight_server.service import FlightShareServer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s", stream=sys.stderr)
    project = _project(project_path)
    host = host or project.server.host
    port = project.server.port if port is None else port
    if profile is not None:
        try:
            project.profile(profile)
        except ConfigError as exc:
            raise click.ClickException(str(exc)) from None
    server = FlightShareServer(project, f"grpc://{host}:{port}", profile=profile)
    health = None
    if health_port is not None:
        from flight_server.health import HealthServer

        health = HealthServer(host, health_port)
        health.set_serving(True)
        click.echo(f"flight-share health service (grpc.health.v1) on {host}:{health.port}")
    click.echo(f"flight-share serving project {project.name} on grpc://{host}:{server.port} "
               f"(profile {server.default_profile})", err=False)
    sys.stdout.flush()
    try:
        server.serve()
    finally:
        if health is not None:
            health.stop()


@main.command(section=SERVER_SECTION)
@click.option("--project", "project_path", default=DEFAULT_PROJECT, show_default=True, help="Project file (dlt.yml).")
@click.option("--events", type=int, default=2000, show_default=True, help="How many GitHub events to generate.")
@click.option("--dataset", default="github_events_dataset", show_default=True, help="Dataset to load into.")
@click.option("--seed", type=int, default=42, show_default=True, help="Random seed (same seed, same data).")
def demo(project_path: str, events: int, dataset: str, seed: int) -> None:
    """Generate the GitHub-events sample locally and load it with a dlt pipeline."""
    from flight_server.demo import load_demo
    from flight_server.storage import open_storage

    project = _project(project_path)
    if dataset not in project.datasets:
        raise click.ClickException(f"dataset '{dataset}' is not defined in {project.file}; defined: {', '.join(project.datasets)}")
    storage = open_storage(project, project.datasets[dataset])
    pipelines_dir = project.data_dir / "demo"
    info = load_demo(storage.dlt_destination(), dataset, events=events, seed=seed, pipelines_dir=str(pipelines_dir),
                     table_format=storage.destination_config.table_format)
    storage.invalidate()
    click.echo(f"loaded {events} events into {dataset}@{storage.destination_config.name}[{storage.location}]: "
               f"{len(storage.table_names())} tables")
    if info.has_failed_jobs:
        raise click.ClickException("the demo load has failed jobs")


for _command in PROJECT_COMMANDS:
    main.add_command(_command, section=SERVER_SECTION)
for _command in DATA_COMMANDS:
    main.add_command(_command, section=DATA_SECTION)


if __name__ == "__main__":
    main(prog_name="flight-share")
