"""Load and validate a project file (``dlt.yml``) into typed, frozen objects.

Everything is checked up front; a problem raises :class:`ConfigError` naming the file, the key path
and what is allowed. Nothing downstream reads raw YAML again.

Secrets are never written into the YAML: any string may hold ``{env.NAME}``, replaced by the
environment variable ``NAME`` at load time; a destination without credentials gets them from dlt's
own config providers (environment ``DESTINATION__<NAME>__CREDENTIALS``, ``.dlt/secrets.toml``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Union
from urllib.parse import urlparse

import yaml

FORMAT_VERSION = 1
DESTINATION_TYPES = ("duckdb", "filesystem", "postgres")
CONTRACT_ENTITIES = ("tables", "columns", "data_type")
CONTRACT_MODES = ("evolve", "freeze", "discard_row", "discard_value")
_ENV_PATTERN = re.compile(r"\{env\.([A-Za-z_][A-Za-z0-9_]*)\}")
_NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")

ContractMode = Literal["evolve", "freeze", "discard_row", "discard_value"]
Contract = Union[ContractMode, Mapping[str, ContractMode], None]


class ConfigError(ValueError):
    """A project file that cannot be used; names the file and the key path."""

    def __init__(self, file: str | Path, key: str, problem: str) -> None:
        self.file = str(file)
        self.key = key
        self.problem = problem
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f" at '{self.key}'" if self.key else ""
        return f"{self.file}{where}: {self.problem}"


@dataclass(frozen=True)
class DestinationConfig:
    """A named place where datasets live."""

    name: str
    type: str
    location: str | None = None  # duckdb file path or filesystem bucket_url
    credentials: Any = None  # dict/str after env substitution, or None (resolved by dlt)
    table_format: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DatasetConfig:
    """A dataset and the destinations that hold it (the first one is used)."""

    name: str
    destinations: tuple[str, ...]
    schema_name: str | None = None  # dlt schema for a dataset that has none stored yet

    @property
    def destination(self) -> str:
        return self.destinations[0]


@dataclass(frozen=True)
class DatasetAccess:
    """What one profile may do with one dataset."""

    dataset: str
    contract: Contract = None  # None: dlt's default (evolve)
    write: bool = True


@dataclass(frozen=True)
class ProfileConfig:
    """A named set of dataset grants."""

    name: str
    datasets: Mapping[str, DatasetAccess]


@dataclass(frozen=True)
class ServerConfig:
    """Server settings from the project file (CLI flags override)."""

    host: str = "127.0.0.1"
    port: int = 8815
    profile: str = "access"
    data_dir: Path | None = None
    batch_rows: int = 122_880
    max_put_bytes: int = 4 << 30
    # a table read is split into endpoints of about this many rows (Delta: file groups, PostgreSQL:
    # block ranges, duckdb: row-id ranges); each endpoint is readable on its own, in parallel
    endpoint_rows: int = 1_000_000
    # replicas serving the same project over a shared destination: endpoints name them round-robin
    # (empty: endpoints name no location, i.e. "the server you asked")
    locations: tuple[str, ...] = ()


@dataclass(frozen=True)
class ProjectConfig:
    """A whole validated project file."""

    file: Path
    name: str
    destinations: Mapping[str, DestinationConfig]
    datasets: Mapping[str, DatasetConfig]
    profiles: Mapping[str, ProfileConfig]
    server: ServerConfig

    @property
    def root(self) -> Path:
        return self.file.parent

    @property
    def data_dir(self) -> Path:
        return self.server.data_dir or self.root / ".flight-share"

    def profile(self, name: str) -> ProfileConfig:
        try:
            return self.profiles[name]
        except KeyError:
            raise ConfigError(self.file, "profiles", f"profile '{name}' is not defined; defined: {sorted(self.profiles)}") from None


class _Reader:
    """Walks the raw YAML, keeping the file name and key path for errors."""

    def __init__(self, file: Path) -> None:
        self.file = file

    def fail(self, key: str, problem: str) -> ConfigError:
        return ConfigError(self.file, key, problem)

    def mapping(self, value: Any, key: str, allowed: tuple[str, ...] | None = None) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.fail(key, f"must be a mapping, got {type(value).__name__}")
        if allowed is not None:
            for k in value:
                if k not in allowed:
                    path = f"{key}.{k}" if key else str(k)
                    raise self.fail(path, f"unknown key '{k}'; allowed: {', '.join(allowed)}")
        return value

    def name(self, value: Any, key: str) -> str:
        if not isinstance(value, str) or not _NAME_PATTERN.match(value):
            raise self.fail(key, f"'{value}' is not a valid name (letters, digits and _, not starting with a digit)")
        return value

    def substitute(self, value: Any, key: str) -> Any:
        """Replace ``{env.NAME}`` in every string, recursively."""
        if isinstance(value, str):
            def repl(m: re.Match[str]) -> str:
                var = m.group(1)
                if var not in os.environ:
                    raise self.fail(key, f"environment variable '{var}' is not set")
                return os.environ[var]
            return _ENV_PATTERN.sub(repl, value)
        if isinstance(value, dict):
            return {k: self.substitute(v, f"{key}.{k}") for k, v in value.items()}
        if isinstance(value, list):
            return [self.substitute(v, f"{key}[{i}]") for i, v in enumerate(value)]
        return value


def _contract(r: _Reader, value: Any, key: str) -> Contract:
    if value is None:
        return None
    if isinstance(value, str):
        if value not in CONTRACT_MODES:
            raise r.fail(key, f"contract mode '{value}' is not allowed; allowed: {', '.join(CONTRACT_MODES)}")
        return value  # type: ignore[return-value]
    entities = r.mapping(value, key, CONTRACT_ENTITIES)
    for entity, mode in entities.items():
        if mode not in CONTRACT_MODES:
            raise r.fail(f"{key}.{entity}", f"contract mode '{mode}' is not allowed; allowed: {', '.join(CONTRACT_MODES)}")
    return dict(entities)


def _destination(r: _Reader, name: str, raw: Any, root: Path) -> DestinationConfig:
    key = f"destinations.{name}"
    body = r.mapping(raw, key, ("type", "location", "bucket_url", "credentials", "table_format", "options"))
    kind = body.get("type")
    if kind not in DESTINATION_TYPES:
        raise r.fail(f"{key}.type", f"destination type '{kind}' is not supported; supported: {', '.join(DESTINATION_TYPES)}")
    location = body.get("location") or body.get("bucket_url")
    if location is not None and not isinstance(location, str):
        raise r.fail(f"{key}.location", "must be a string")
    location = r.substitute(location, f"{key}.{'location' if 'location' in body else 'bucket_url'}")
    if kind == "duckdb":
        if not location:
            location = f"{name}.duckdb"
        if not os.path.isabs(location) and "://" not in location:
            location = str((root / location).resolve())
    elif kind == "filesystem":
        if not location:
            raise r.fail(f"{key}.bucket_url", "a filesystem destination needs a 'bucket_url' (folder or s3:// URL)")
        if "://" not in location and not os.path.isabs(location):
            location = str((root / location).resolve())
    table_format = body.get("table_format")
    if table_format not in (None, "delta"):
        raise r.fail(f"{key}.table_format", f"table format '{table_format}' is not supported; supported: delta")
    if kind == "filesystem" and table_format != "delta":
        raise r.fail(f"{key}.table_format", "a filesystem destination is served as Delta Lake tables: set 'table_format: delta'")
    if kind != "filesystem" and table_format is not None:
        raise r.fail(f"{key}.table_format", f"only a filesystem destination has a table format, not a {kind} destination")
    if kind == "postgres" and location is not None:
        raise r.fail(f"{key}.location", "a postgres destination is given by 'credentials' (a connection string or a mapping), not a location")
    raw_credentials = body.get("credentials")
    if raw_credentials is not None and not isinstance(raw_credentials, (str, dict)):
        raise r.fail(f"{key}.credentials", "must be a connection string or a mapping")
    credentials = r.substitute(body.get("credentials"), f"{key}.credentials")
    options = r.substitute(r.mapping(body.get("options"), f"{key}.options"), f"{key}.options")
    return DestinationConfig(name, kind, location, credentials, table_format, options)


LOCATION_SCHEMES = ("grpc", "grpc+tcp", "grpc+tls")


def _locations(r: _Reader, value: Any) -> tuple[str, ...]:
    """``server.locations``: Flight URIs of the replicas (``grpc://host:port``), env-substituted."""
    if value is None:
        return ()
    key = "server.locations"
    if not isinstance(value, list):
        raise r.fail(key, "must be a list of Flight locations like grpc://host:8815")
    found: list[str] = []
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise r.fail(f"{key}[{i}]", "must be a string like grpc://host:8815")
        uri = r.substitute(item, f"{key}[{i}]").strip()
        parsed = urlparse(uri)
        try:
            port = parsed.port
        except ValueError:
            port = None
        if parsed.scheme not in LOCATION_SCHEMES or not parsed.hostname or port is None or parsed.path not in ("", "/"):
            raise r.fail(f"{key}[{i}]", f"'{uri}' is not a Flight location; allowed: "
                                        f"{', '.join(s + '://host:port' for s in LOCATION_SCHEMES)}")
        if uri in found:
            raise r.fail(f"{key}[{i}]", f"'{uri}' is listed twice")
        found.append(uri)
    return tuple(found)


def load_project(path: str | Path) -> ProjectConfig:
    """Read, substitute and validate a project file."""
    file = Path(path).resolve()
    r = _Reader(file)
    try:
        text = file.read_text()
    except OSError as exc:
        raise ConfigError(file, "", f"cannot read project file: {exc.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(file, "", f"not valid YAML: {exc}") from None
    top = r.mapping(raw, "", ("format_version", "project", "destinations", "datasets", "profiles", "server"))
    version = top.get("format_version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise r.fail("format_version", f"format {version!r} is not supported by this flight-share (reads {FORMAT_VERSION}); upgrade flight-share")
    project = r.mapping(top.get("project"), "project", ("name", "description"))
    name = r.name(project.get("name"), "project.name")

    destinations = {
        r.name(n, f"destinations.{n}"): _destination(r, n, v, file.parent)
        for n, v in r.mapping(top.get("destinations"), "destinations").items()
    }
    if not destinations:
        raise r.fail("destinations", "at least one destination is needed")

    datasets: dict[str, DatasetConfig] = {}
    for ds_name, raw_ds in r.mapping(top.get("datasets"), "datasets").items():
        key = f"datasets.{r.name(ds_name, f'datasets.{ds_name}')}"
        body = r.mapping(raw_ds, key, ("destination", "schema_name"))
        dests = body.get("destination")
        dests = [dests] if isinstance(dests, str) else dests
        if not isinstance(dests, list) or not dests:
            raise r.fail(f"{key}.destination", "must name one destination or a list of them")
        for d in dests:
            if d not in destinations:
                raise r.fail(f"{key}.destination", f"destination '{d}' is not defined; defined: {', '.join(sorted(destinations))}")
        schema_name = body.get("schema_name")
        if schema_name is not None:
            r.name(schema_name, f"{key}.schema_name")
        datasets[ds_name] = DatasetConfig(ds_name, tuple(dests), schema_name)

    profiles: dict[str, ProfileConfig] = {}
    for p_name, raw_p in r.mapping(top.get("profiles"), "profiles").items():
        key = f"profiles.{r.name(p_name, f'profiles.{p_name}')}"
        body = r.mapping(raw_p, key, ("datasets",))
        grants: dict[str, DatasetAccess] = {}
        for ds_name, raw_g in r.mapping(body.get("datasets"), f"{key}.datasets").items():
            gkey = f"{key}.datasets.{ds_name}"
            if ds_name not in datasets:
                raise r.fail(gkey, f"dataset '{ds_name}' is not defined; defined: {', '.join(sorted(datasets))}")
            g = r.mapping(raw_g, gkey, ("contract", "write"))
            write = g.get("write", True)
            if not isinstance(write, bool):
                raise r.fail(f"{gkey}.write", "must be true or false")
            grants[ds_name] = DatasetAccess(ds_name, _contract(r, g.get("contract"), f"{gkey}.contract"), write)
        profiles[p_name] = ProfileConfig(p_name, grants)

    s = r.mapping(top.get("server"), "server",
                  ("host", "port", "profile", "data_dir", "batch_rows", "max_put_bytes", "endpoint_rows", "locations"))
    server = ServerConfig()
    port = s.get("port", server.port)
    if not isinstance(port, int) or not 0 <= port <= 65535:
        raise r.fail("server.port", f"must be a port number 0-65535, got {port!r}")
    for int_key in ("batch_rows", "max_put_bytes", "endpoint_rows"):
        if int_key in s and (not isinstance(s[int_key], int) or s[int_key] <= 0):
            raise r.fail(f"server.{int_key}", "must be a positive integer")
    profile = s.get("profile", server.profile)
    if profiles and profile not in profiles:
        raise r.fail("server.profile", f"profile '{profile}' is not defined; defined: {', '.join(sorted(profiles))}")
    data_dir = s.get("data_dir")
    server = ServerConfig(
        host=str(s.get("host", server.host)),
        port=port,
        profile=profile,
        data_dir=(file.parent / data_dir).resolve() if data_dir else None,
        batch_rows=s.get("batch_rows", server.batch_rows),
        max_put_bytes=s.get("max_put_bytes", server.max_put_bytes),
        endpoint_rows=s.get("endpoint_rows", server.endpoint_rows),
        locations=_locations(r, s.get("locations")),
    )
    return ProjectConfig(file, name, destinations, datasets, profiles, server)
