"""The ``flight-share`` command.

One click group; commands live in help sections (:mod:`client.cli.frame`). The server-side
commands are here and in :mod:`flight_server.cli.project`, the client-side ones in
:mod:`client.cli.data`. Every error is printed by one table (``client.cli.frame.cli_error``).
"""

from __future__ import annotations

import logging
import os
import sys

# gRPC's C core logs a failed TLS handshake (and absl its "before InitializeLog" notice) to stderr at INFO;
# the command prints one clear line of its own instead. Set before pyarrow.flight loads gRPC.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import click

from client import __version__
from client.cli.data import DATA_COMMANDS
from client.cli.frame import (
    DATA_SECTION,
    EXIT_CODES,
    EXIT_ERROR,
    SERVER_ERRORS,
    SERVER_SECTION,
    SectionedGroup,
    set_debug,
)
from flight_server.cli.project import DEFAULT_PROJECT, PROJECT_COMMANDS
from flight_server.domain.config import ConfigError, load_project


def _project(path: str):
    try:
        return load_project(path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


SERVER_ERRORS.append((ConfigError, EXIT_ERROR, "Error: ", str))

_EPILOG = "Exit codes: " + "; ".join(f"{code} {what}" for code, what in EXIT_CODES.items()) + "."


@click.group(cls=SectionedGroup, context_settings={"help_option_names": ["-h", "--help"]}, epilog=_EPILOG)
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.version_option(__version__, "--version", prog_name="flight-share", message="%(prog)s %(version)s")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """flight-share: share the datasets of a dlt project over Arrow Flight.

    Run `flight-share COMMAND --help` for a command's options and examples.
    """
    set_debug(ctx, debug)


def _logging(project) -> None:
    from flight_server.domain import masking

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s", stream=sys.stderr)
    if project.server.audit_log is not None:
        project.server.audit_log.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(project.server.audit_log)
        handler.setFormatter(logging.Formatter("%(message)s"))
        audit = logging.getLogger("flight_share.audit")
        audit.addHandler(handler)
        audit.propagate = False
        masking.install(project.secrets, audit)
    # every handler masks credentials, whatever writes to it
    masking.install(project.secrets)


@main.command(section=SERVER_SECTION)
@click.option("--project", "project_path", default=DEFAULT_PROJECT, show_default=True, help="Project file (dlt.yml).")
@click.option("--host", default=None, help="Address to listen on (default: the project's server.host).")
@click.option("--port", type=int, default=None, help="Port (default: the project's server.port; 0 picks a free one).")
@click.option("--anonymous-profile", "--profile", "profile", default=None,
              help="Profile for callers without credentials (default: the project's server.anonymous_profile).")
@click.option("--tls-cert", type=click.Path(dir_okay=False), default=None, help="PEM certificate: serve grpc+tls://.")
@click.option("--tls-key", type=click.Path(dir_okay=False), default=None, help="PEM private key of --tls-cert.")
@click.option("--tls-client-ca", type=click.Path(dir_okay=False), default=None,
              help="PEM CA: require client certificates signed by it (mutual TLS).")
@click.option("--health-port", type=int, default=None,
              help="Also serve the standard gRPC health service (grpc.health.v1) on this port (0 picks a free one).")
def serve(project_path: str, host: str | None, port: int | None, profile: str | None,
          tls_cert: str | None, tls_key: str | None, tls_client_ca: str | None, health_port: int | None) -> None:
    """Serve the project's datasets over Arrow Flight."""
    from flight_server.transport import memory, tls

    project = _project(project_path)
    memory.enforce(project.server.memory_limit or memory.default_limit())  # re-executes this command once
    from flight_server.storage import open_storage
    from flight_server.transport.server import FlightShareServer

    _logging(project)
    from flight_server.cli.data_check import empty_datasets

    for warning in (*project.warnings, *empty_datasets(project)):
        logging.getLogger("flight_share.config").warning("%s", warning)
    host = host or project.server.host
    port = project.server.port if port is None else port
    if profile is not None:
        try:
            project.profile(profile)
        except ConfigError as exc:
            raise click.ClickException(str(exc)) from None
    anonymous = profile if profile is not None else project.server.anonymous_profile
    if not project.users and anonymous is None:
        raise click.ClickException(
            f"{project.file}: nobody could connect: define 'users' (flight-share users add NAME --profile P) "
            "or set 'server.anonymous_profile'")
    try:
        tls_kwargs = tls.server_kwargs(tls_cert or project.server.tls_cert, tls_key or project.server.tls_key,
                                       tls_client_ca or project.server.tls_client_ca)
    except tls.TlsError as exc:
        raise click.ClickException(str(exc)) from None
    scheme = "grpc+tls" if tls_kwargs else "grpc"
    tls.warn_if_exposed(host, bool(tls_kwargs), bool(project.users), anonymous)
    try:
        server = FlightShareServer(project, f"{scheme}://{host}:{port}", open_storage, profile=profile, **tls_kwargs)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    health = None
    if health_port is not None:
        from flight_server.transport.health import HealthServer

        health = HealthServer(host, health_port)
        health.set_serving(True)
        click.echo(f"flight-share health service (grpc.health.v1) on {host}:{health.port}")
    access = f"anonymous profile {anonymous}" if anonymous else "login required"
    users = f", {len(project.users)} user(s)" if project.users else ""
    click.echo(f"flight-share serving project {project.name} on {scheme}://{host}:{server.port} "
               f"({access}{users}{', mutual TLS' if 'verify_client' in tls_kwargs else ''})", err=False)
    sys.stdout.flush()
    try:
        server.serve()
    finally:
        if health is not None:
            health.stop()


@main.group(section=SERVER_SECTION)
def users() -> None:
    """Manage the users of a project (prints entries to paste under `users:`)."""


@users.command("add")
@click.argument("name")
@click.option("--profile", required=True, help="Profile the user gets.")
@click.option("--project", "project_path", default=DEFAULT_PROJECT, show_default=True,
              help="Project file whose profiles to check against.")
@click.option("--password-stdin", is_flag=True, help="Read the password from the first line of standard input.")
@click.option("--token", "with_token", is_flag=True,
              help="Make a random API token instead of a password; it is printed once, on standard error.")
def users_add(name: str, profile: str, project_path: str, password_stdin: bool, with_token: bool) -> None:
    """Print a `users:` entry for NAME with a hash of a new password (prompted) or a new API token."""
    import yaml

    from flight_server.domain.config import _USER_PATTERN
    from flight_server.domain.credentials import hash_password, hash_token, new_token

    if not _USER_PATTERN.match(name):
        raise click.ClickException(f"'{name}' is not a valid user name (letters, digits, _ . @ -; at most 128)")
    project = _project(project_path)
    try:
        project.profile(profile)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    entry: dict[str, str] = {"profile": profile}
    if with_token:
        if password_stdin:
            raise click.ClickException("--token and --password-stdin exclude each other")
        token = new_token()
        entry["token_hash"] = hash_token(token)
        click.echo(f"API token for {name} (shown once; store it now): {token}", err=True)
    else:
        if password_stdin:
            password = sys.stdin.readline().rstrip("\r\n")
        else:
            password = click.prompt(f"Password for {name}", hide_input=True, confirmation_prompt=True)
        if not password:
            raise click.ClickException("the password must not be empty")
        entry["password_hash"] = hash_password(password)
    click.echo(yaml.safe_dump({"users": {name: entry}}, sort_keys=False, width=1000), nl=False)


@main.command(section=SERVER_SECTION)
@click.option("--project", "project_path", default=DEFAULT_PROJECT, show_default=True, help="Project file (dlt.yml).")
@click.option("--events", type=int, default=2000, show_default=True, help="How many GitHub events to generate.")
@click.option("--dataset", default="github_events_dataset", show_default=True, help="Dataset to load into.")
@click.option("--seed", type=int, default=42, show_default=True, help="Random seed (same seed, same data).")
def demo(project_path: str, events: int, dataset: str, seed: int) -> None:
    """Generate the GitHub-events sample locally and load it with a dlt pipeline."""
    from flight_server.cli.demo import load_demo
    from flight_server.storage import open_storage

    project = _project(project_path)
    if dataset not in project.datasets:
        raise click.ClickException(f"dataset '{dataset}' is not defined in {project.file}; defined: {', '.join(project.datasets)}")
    storage = open_storage(project, project.datasets[dataset])
    pipelines_dir = project.data_dir / "demo"
    with storage.writing():  # the destination held for the load (duckdb: dlt borrows the write connection)
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
