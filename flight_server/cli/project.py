"""Server-side commands about the project file: ``check`` it, ``package`` it for analysts."""

from __future__ import annotations

from pathlib import Path

import click

from client.cli.frame import EXIT_ERROR

DEFAULT_PROJECT = "configs/demo/dlt.yml"


def project_file(path: str) -> Path:
    """A project file, or a folder holding ``dlt.yml``."""
    p = Path(path)
    return p / "dlt.yml" if p.is_dir() else p


@click.command("check")
@click.option("--project", "project_path", default=DEFAULT_PROJECT, show_default=True,
              help="Project file (dlt.yml), or its folder.")
def check_command(project_path: str) -> None:
    """Validate a project file, reporting every problem.

    Each problem is one line: the file, the key path and what is allowed. Exits 1 when there are any.
    Warnings (exit 0) name what is read and not used, and every dataset whose location holds no dlt data.
    """
    from flight_server.domain.config import check_project

    file = project_file(project_path)
    project, problems = check_project(file)
    if problems:
        for problem in problems:
            click.echo(str(problem))
        n = len(problems)
        click.echo(f"{n} problem{'s' if n != 1 else ''} in {file.resolve()}", err=True)
        raise click.exceptions.Exit(EXIT_ERROR)
    assert project is not None
    from flight_server.cli.data_check import empty_datasets

    for warning in (*project.warnings, *empty_datasets(project)):
        click.echo(f"warning: {warning}")
    click.echo(f"{project.file}: ok: project {project.name}, {len(project.destinations)} destination(s), "
               f"{len(project.datasets)} dataset(s), {len(project.profiles)} profile(s)")


@click.command("package")
@click.argument("project_dir", type=click.Path(exists=True))
@click.option("--name", default=None, help="Python package (import) name [default: the project's name].")
@click.option("--server", default=None, metavar="URL",
              help="Address analysts connect to, e.g. grpc+tls://data.example.com:8815 [default: the project's server.host:port].")
@click.option("--profile", default=None, help="The package's access_profile() [default: the project's server profile].")
@click.option("--version", "version", default="0.0.1", show_default=True, help="The package's version.")
@click.option("--requires", default=None, metavar="REQUIREMENT",
              help="How the package depends on the flight-share client [default: flight-share>=THIS_VERSION].")
@click.option("--out", "out", type=click.Path(file_okay=False), default=None,
              help="Folder to write the package into [default: ./NAME].")
@click.option("--force", is_flag=True, help="Overwrite a folder that is not empty.")
def package_command(project_dir: str, name: str | None, server: str | None, profile: str | None, version: str,
                    requires: str | None, out: str | None, force: bool) -> None:
    """Write the project as a Python data package for analysts.

    The package depends on the flight-share client only (not dlt), registers itself in the
    `dlt_package` entry-point group, and exposes access_profile(), context(), config() and catalog()
    like a dlt+ project package. The server address is baked in (NAME_URL overrides it); credentials
    never are: users set FLIGHT_SHARE_TOKEN (or NAME_TOKEN) or keep a token file.

    \b
    Example:
      flight-share package configs/demo --name dlt_example_project \\
          --server grpc+tls://data.example.com:8815 --out dist/dlt_example_project
      pip wheel --no-deps dist/dlt_example_project -w dist/
    """
    from flight_server.cli.packaging import PackagingError, make_spec, write_package
    from flight_server.domain.config import load_project

    project = load_project(project_file(project_dir))
    try:
        spec = make_spec(project, name=name, version=version, server=server, profile=profile, requires=requires)
        target = Path(out) if out else Path.cwd() / spec.name
        write_package(spec, target, force=force)
    except PackagingError as exc:
        raise click.UsageError(str(exc)) from None
    click.echo(f"wrote data package {spec.name} {spec.version} to {target.resolve()}")
    click.echo(f"  server {spec.server}, profile {spec.profile}, depends on {spec.requires}")
    click.echo(f"  build it:   pip wheel --no-deps {target} -w dist/")
    click.echo(f"  install it: pip install {target}")


PROJECT_COMMANDS = (check_command, package_command)
