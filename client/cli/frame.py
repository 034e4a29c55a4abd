"""The frame of the ``flight-share`` command: help sections, connection options, and the one error table.

Adding a command to a help section::

    @main.command(section=SERVER_SECTION)      # or main.group(...) for a command with subcommands
    def users(): ...

Every exception a command lets escape goes through :func:`cli_error`: one line (or dlt's
PipelineStepFailed text) on stderr and an exit code from :data:`EXIT_CODES`, never a traceback unless
``flight-share --debug``.
"""

from __future__ import annotations

import functools
import os
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

import click

from client.protocol import (
    DEFAULT_URL,
    ENV_PASSWORD,
    ENV_TOKEN,
    ENV_TOKEN_FILE,
    ENV_URL,
    ENV_USERNAME,
)

DATA_SECTION = "Read and write data (on a running server: --url, or FLIGHT_SHARE_URL)"
SERVER_SECTION = "Serve a project (on the server side: --project dlt.yml)"
SECTIONS = (DATA_SECTION, SERVER_SECTION)

EXIT_OK = 0
EXIT_ERROR = 1  # anything else, and `check` finding problems
EXIT_USAGE = 2  # click's own: a wrong option or argument
EXIT_NOT_FOUND = 3  # no such dataset, table, column or file
EXIT_REFUSED = 4  # the server said no: contract violation, permission, credentials
EXIT_UNAVAILABLE = 5  # the server cannot be reached
EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_ERROR: "error (also: `check` found problems)",
    EXIT_USAGE: "wrong option or argument",
    EXIT_NOT_FOUND: "dataset, table, column or file not found",
    EXIT_REFUSED: "refused: contract violation, permission or credentials",
    EXIT_UNAVAILABLE: "server unreachable",
}

_DEBUG_KEY = "flight_share.debug"
_URL_KEY = "flight_share.url"
_FLIGHT_PREFIX = re.compile(r"^Flight returned [a-z ]+ error, with message: ")


class CliError(click.ClickException):
    """An error as the command line shows it: text (prefix included) and an exit code."""

    def __init__(self, message: str, exit_code: int = EXIT_ERROR, prefix: str = "Error: ") -> None:
        super().__init__(message)
        # click declares exit_code a ClassVar, yet click.main exits with the raised instance's own value
        self.exit_code = exit_code  # type: ignore[misc]
        self.prefix = prefix

    def show(self, file: Any = None) -> None:
        click.echo(f"{self.prefix}{self.format_message()}", err=True, file=file)


def _flight_text(exc: BaseException) -> str:
    return _FLIGHT_PREFIX.sub("", str(exc)).strip()


def _unavailable(exc: BaseException) -> str:
    url = click.get_current_context().meta.get(_URL_KEY, "the server")
    return f"cannot reach the flight-share server at {url}: {_flight_text(exc)}"


def _os_error(exc: BaseException) -> str:
    assert isinstance(exc, OSError)
    if exc.filename is not None and exc.strerror:
        return f"{exc.filename}: {exc.strerror}"
    return str(exc)


#: rows the server side adds (its project-file errors), checked before the generic ones below
SERVER_ERRORS: list[tuple[type[BaseException], int, str, Callable[[BaseException], str]]] = []


def _error_table() -> list[tuple[type[BaseException], int, str, Callable[[BaseException], str]]]:
    """Exception class -> (exit code, prefix, message); the first match wins, so subclasses come first."""
    import pyarrow as pa

    from client import errors
    from client.cli.output import FileFormatError

    return [*SERVER_ERRORS,
        (errors.PipelineStepFailed, EXIT_REFUSED, "PipelineStepFailed: ", str),
        (errors.DataValidationError, EXIT_REFUSED, "DataValidationError: ", str),
        (errors.AuthenticationError, EXIT_REFUSED, "Error: ", lambda e: f"authentication failed: {_flight_text(e)}"),
        (errors.PermissionDeniedError, EXIT_REFUSED, "Error: ", _flight_text),
        (errors.ServerUnavailableError, EXIT_UNAVAILABLE, "Error: ", _unavailable),
        (errors.NotFoundError, EXIT_NOT_FOUND, "Error: ", _flight_text),
        (errors.FlightShareError, EXIT_ERROR, "Error: ", _flight_text),
        (FileFormatError, EXIT_ERROR, "Error: ", str),
        (FileNotFoundError, EXIT_NOT_FOUND, "Error: ", _os_error),
        (OSError, EXIT_ERROR, "Error: ", _os_error),
        (pa.ArrowException, EXIT_ERROR, "Error: ", _flight_text),
    ]


def cli_error(exc: BaseException) -> CliError:
    """The one translation from any exception to what the command line prints."""
    for cls, code, prefix, message in _error_table():
        if isinstance(exc, cls):
            return CliError(message(exc), code, prefix)
    return CliError(f"unexpected {type(exc).__name__}: {exc} (run `flight-share --debug ...` for the traceback)")


class SectionedGroup(click.Group):
    """A click group whose help lists commands by section, in the order they were added."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sections: dict[str, str] = {}

    def add_command(self, cmd: click.Command, name: str | None = None, section: str | None = None) -> None:
        super().add_command(cmd, name)
        if section:
            self.sections[name or cmd.name or ""] = section

    def _sectioned(self, make: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        section = kwargs.pop("section", None)
        if args and callable(args[0]):  # bare @main.command
            return make(*args, **kwargs)
        decorator = make(*args, **kwargs)

        def wrap(f: Callable[..., Any]) -> click.Command:
            cmd = decorator(f)
            if section:
                self.sections[cmd.name or ""] = section
            return cmd
        return wrap

    def command(self, *args: Any, **kwargs: Any) -> Any:
        return self._sectioned(super().command, args, kwargs)

    def group(self, *args: Any, **kwargs: Any) -> Any:
        return self._sectioned(super().group, args, kwargs)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        by_section: dict[str, list[tuple[str, str]]] = {}
        for name in self.list_commands(ctx):
            cmd = self.get_command(ctx, name)
            if cmd is None or cmd.hidden:
                continue
            by_section.setdefault(self.sections.get(name, "Other commands"), []).append(
                (name, cmd.get_short_help_str(limit=max(formatter.width - 6 - max(map(len, self.commands)), 40))))
        order = [s for s in SECTIONS if s in by_section] + [s for s in by_section if s not in SECTIONS]
        for section in order:
            with formatter.section(section):
                formatter.write_dl(by_section[section])

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort, BrokenPipeError):
            raise
        except KeyboardInterrupt:
            raise click.exceptions.Abort() from None
        except Exception as exc:
            if ctx.meta.get(_DEBUG_KEY):
                raise
            raise cli_error(exc) from None


def set_debug(ctx: click.Context, debug: bool) -> None:
    ctx.meta[_DEBUG_KEY] = debug


def connection_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """``--url --token --token-file --username`` (and the environment); the command gets ``settings``."""

    @click.option("--url", envvar=ENV_URL, default=DEFAULT_URL, show_default=True, show_envvar=True,
                  help="Server address: grpc://HOST:PORT, or grpc+tls://HOST:PORT.")
    @click.option("--token", default=None,
                  help=f"Bearer token [env: {ENV_TOKEN}; prefer it, or --token-file: a command line is visible to others].")
    @click.option("--token-file", default=None, type=click.Path(dir_okay=False),
                  help=f"File holding the token [env: {ENV_TOKEN_FILE}].")
    @click.option("--username", default=None,
                  help=f"User name [env: {ENV_USERNAME}]; the password comes from {ENV_PASSWORD} or a prompt.")
    @functools.wraps(f)
    def wrapper(*args: Any, url: str, token: str | None, token_file: str | None, username: str | None,
                **kwargs: Any) -> Any:
        from client.environment import resolve

        click.get_current_context().meta[_URL_KEY] = url
        password = os.environ.get(ENV_PASSWORD) if username else None
        settings = resolve(url, token=token, username=username, password=password, token_file=token_file)
        user = settings.credentials.get("username")
        if user and "password" not in settings.credentials and "token" not in settings.credentials and sys.stdin.isatty():
            password = click.prompt(f"Password for {user}", hide_input=True, err=True)
            settings = replace(settings, credentials={**settings.credentials, "password": password})
        return f(*args, settings=settings, **kwargs)

    return wrapper


def open_catalog(settings: Any) -> Any:
    """The catalog on the server the options name."""
    from client.catalog import open_catalog as _open

    return _open(settings)


def echo_lines(lines: Iterable[str]) -> None:
    for line in lines:
        click.echo(line)
