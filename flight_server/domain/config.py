"""Load and validate a project file (``dlt.yml``) into typed, frozen objects.

Everything is checked up front; a problem raises :class:`ConfigError` naming the file, the key path
and what is allowed. Nothing downstream reads raw YAML again. :func:`check_project` reads the same way
but collects every problem instead of stopping at the first (``flight-share check``).

Secrets are never written into the YAML: any string may hold ``{env.NAME}``, replaced by the
environment variable ``NAME`` at load time; a destination without credentials gets them from dlt's
own config providers (environment ``DESTINATION__<NAME>__CREDENTIALS``, ``.dlt/secrets.toml``).
Values substituted into credentials, options and ``server.jwt_secret`` are collected in
:attr:`ProjectConfig.secrets` so logs and errors can mask them.

Users (top-level ``users:``, next to the ``profiles:`` they are given) hold only hashes::

    users:
      alice: {profile: analysts, password_hash: "scrypt$n=16384,r=8,p=1$<salt>$<key>"}
      etl:   {profile: access, token_hash: "sha256$<hex>"}        # or a list, for rotation

``flight-share users add NAME --profile P`` prints such an entry. Callers without credentials get
``server.anonymous_profile`` if the project sets one, and are refused otherwise.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import yaml

from flight_server.domain.credentials import (
    HashFormatError,
    parse_password_hash,
    parse_token_hash,
)
from flight_server.domain.dltplus import is_dlt_plus, to_flight_share
from flight_server.domain.masking import Masker

FORMAT_VERSION = 1
#: dlt destination types served through dlt's own dataset interface (flight_server/storage/dlt_dataset.py);
#: tested here on dlt's sqlalchemy destination over SQLite, the others only as dlt supports them
SQL_DESTINATION_TYPES = ("sqlalchemy", "snowflake", "bigquery", "motherduck", "clickhouse", "mssql", "redshift",
                         "databricks", "athena", "synapse", "dremio")
DESTINATION_TYPES = ("duckdb", "filesystem", "postgres", *SQL_DESTINATION_TYPES)
CONTRACT_ENTITIES = ("tables", "columns", "data_type")
CONTRACT_MODES = ("evolve", "freeze", "discard_row", "discard_value")
_SECRET_FIELD = re.compile(r"pass|secret|token|key|credential|session", re.IGNORECASE)
_ENV_PATTERN = re.compile(r"\{env\.([A-Za-z_][A-Za-z0-9_]*)\}")
_NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
_USER_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.@-]{0,127}$")
_ENV_ONLY = re.compile(r"^\{env\.([A-Za-z_][A-Za-z0-9_]*)\}$")

ContractMode = Literal["evolve", "freeze", "discard_row", "discard_value"]
Contract = ContractMode | Mapping[str, ContractMode] | None


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
    table_format: Literal["delta"] | None = None  # the one table format read here (dlt's filesystem + Delta)
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
class UserConfig:
    """A user who may log in: a profile and only hashes of their secrets."""

    name: str
    profile: str
    password_hash: str | None = None  # scrypt$... (flight_server.domain.credentials)
    token_hashes: tuple[str, ...] = ()  # sha256$... of static API tokens


@dataclass(frozen=True)
class LoginLimits:
    """``server.logins``: password checks at once, and failed logins let through before slowing down
    (see :mod:`flight_server.transport.logins`)."""

    concurrent: int = 0  # password (scrypt) checks at once; 0: half the machine's cores, at least 1
    peer_failures: int = 20  # failed logins from one address in a burst
    user_failures: int = 10  # failed logins for one user name in a burst


@dataclass(frozen=True)
class ServerConfig:
    """Server settings from the project file (CLI flags override)."""

    host: str = "127.0.0.1"
    port: int = 8815
    # profile of callers that send no credentials; None: they are refused (UNAUTHENTICATED)
    anonymous_profile: str | None = None
    data_dir: Path | None = None
    batch_rows: int = 122_880
    max_put_bytes: int = 4 << 30
    # hot tables kept as Arrow in server memory (bytes; 0: off), see flight_server/domain/table_cache.py
    cache_bytes: int = 1 << 30
    jwt_secret: str | None = None  # only via {env.NAME}; default: $FLIGHT_SHARE_JWT_SECRET or random
    token_ttl: int = 3600  # seconds a bearer token from the handshake is valid before it needs renewing
    session_ttl: int = 12 * 3600  # seconds a login lasts at most, renewals included (see transport/auth.py)
    logins: LoginLimits = LoginLimits()  # password checks and failed-login throttling
    ticket_ttl: int = 900  # seconds a DoGet ticket is valid
    sql_max_rows: int = 10_000_000
    sql_timeout: float = 120.0  # seconds
    sql_memory_limit: str = "2GB"
    # SQL sandbox workers one user may hold at once (None: half of them, rounded up; see domain/sql/workers.py)
    sql_per_user: int | None = None
    # uploads (saves) one user may have open at once; more are refused "busy" (see domain/writer.py)
    uploads_per_user: int = 8
    # an upload whose client sends nothing for this many seconds is ended (transport/upload.py)
    upload_idle_seconds: float = 60.0
    # ceiling on the Arrow memory of the whole server process (bytes; None: half the machine's memory),
    # enforced by Arrow's own pool: see flight_server/transport/memory.py
    memory_limit: int | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    audit_log: Path | None = None  # JSON lines; default: the log (stderr)

    @property
    def profile(self) -> str | None:
        """Former name of :attr:`anonymous_profile` (the profile of every caller before auth)."""
        return self.anonymous_profile
    # a table read is split into endpoints of about this many rows (Delta: file groups, PostgreSQL:
    # block ranges, duckdb: row-id ranges); each endpoint is readable on its own, in parallel
    endpoint_rows: int = 1_000_000
    # a row-wise SQL statement over a table of more rows than this is answered as one endpoint per partition
    # of the table (Flight SQL; 0: never split). Off by default: some clients read only the first endpoint
    # (flightsql-dbapi, altertable-flightsql), and on one machine the split costs more than it gains
    sql_endpoint_rows: int = 0
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
    description: str | None = None
    users: Mapping[str, UserConfig] = field(default_factory=dict)
    secrets: frozenset[str] = frozenset()  # values substituted from the environment into secret places
    warnings: tuple[str, ...] = ()  # keys of the file that flight-share reads and does not use

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
    """Walks the raw YAML, keeping the file name and key path for errors.

    Strict (``collect=False``): the first problem raises. Collecting: :meth:`report` keeps a problem and
    reading goes on; a raised problem ends only the enclosing :meth:`part` of the file.
    """

    def __init__(self, file: Path, collect: bool = False) -> None:
        self.file = file
        self.collect = collect
        self.problems: list[ConfigError] = []
        self.warnings: list[ConfigError] = []  # keys read and not used: said, never silently dropped
        self.secrets: set[str] = set()
        self._masker = Masker()  # every value taken from the environment, secret place or not

    def fail(self, key: str, problem: str) -> ConfigError:
        """A problem; any value substituted from the environment is shown as ``***`` in its text (a
        value read into a non-secret key, such as a URL with a password in it, can still be one)."""
        return ConfigError(self.file, key, self._masker(problem))

    def warn(self, key: str, text: str) -> None:
        self.warnings.append(self.fail(key, text))

    def report(self, key: str, problem: str) -> None:
        """A problem reading can step over: raised when strict, kept when collecting."""
        error = self.fail(key, problem)
        if not self.collect:
            raise error
        self.problems.append(error)

    @contextlib.contextmanager
    def part(self) -> Iterator[None]:
        """One independent part of the file (a destination, a dataset, a grant...)."""
        try:
            yield
        except ConfigError as exc:
            if not self.collect:
                raise
            self.problems.append(exc)

    def mapping(self, value: Any, key: str, allowed: tuple[str, ...] | None = None) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.fail(key, f"must be a mapping, got {type(value).__name__}")
        mapping: dict[str, Any] = value
        if allowed is not None:
            for k in mapping:
                if k not in allowed:
                    path = f"{key}.{k}" if key else str(k)
                    self.report(path, f"unknown key '{k}'; allowed: {', '.join(allowed)}")
            mapping = {k: v for k, v in mapping.items() if k in allowed}
        return mapping

    def name(self, value: Any, key: str) -> str:
        if not isinstance(value, str) or not _NAME_PATTERN.match(value):
            raise self.fail(key, f"'{value}' is not a valid name (letters, digits and _, not starting with a digit)")
        return value

    def substitute(self, value: Any, key: str, secret: bool = False) -> Any:
        """Replace ``{env.NAME}`` in every string, recursively; remember secret values for masking."""
        if isinstance(value, str):
            def repl(m: re.Match[str]) -> str:
                var = m.group(1)
                if var not in os.environ:
                    self.report(key, f"environment variable '{var}' is not set")
                    return m.group(0)
                if secret:
                    self.secrets.add(os.environ[var])
                self._masker.add([os.environ[var]])
                return os.environ[var]
            return _ENV_PATTERN.sub(repl, value)
        if isinstance(value, dict):
            # in a credentials mapping only the secret fields are secrets: a host or user name stays readable
            return {k: self.substitute(v, f"{key}.{k}", secret and bool(_SECRET_FIELD.search(str(k))))
                    for k, v in value.items()}
        if isinstance(value, list):
            return [self.substitute(v, f"{key}[{i}]", secret) for i, v in enumerate(value)]
        return value

    def positive(self, s: Mapping[str, Any], key: str, default: Any,
                 kinds: tuple[type[int] | type[float], ...] = (int,)) -> Any:
        value = s.get(key, default)
        if isinstance(value, bool) or not isinstance(value, kinds) or value <= 0:
            raise self.fail(f"server.{key}", f"must be a positive number, got {value!r}")
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
            r.report(f"{key}.{entity}", f"contract mode '{mode}' is not allowed; allowed: {', '.join(CONTRACT_MODES)}")
    return {entity: mode for entity, mode in entities.items() if mode in CONTRACT_MODES}


def _destination(r: _Reader, name: str, raw: Any, root: Path) -> DestinationConfig:
    key = f"destinations.{name}"
    body = r.mapping(raw, key, ("type", "location", "bucket_url", "credentials", "table_format", "options"))
    kind = body.get("type")
    if kind not in DESTINATION_TYPES:
        r.report(f"{key}.type", f"destination type '{kind}' is not supported; supported: {', '.join(DESTINATION_TYPES)}"
                                f" (and dlt+'s delta)")
        kind = str(kind)  # reported; kept as text (it reads the same in later messages) while problems are collected
    location = body.get("location") or body.get("bucket_url")
    if location is not None and not isinstance(location, str):
        r.report(f"{key}.location", "must be a string")
        location = None
    location = r.substitute(location, f"{key}.{'location' if 'location' in body else 'bucket_url'}")
    if kind == "duckdb":
        if not location:
            location = f"{name}.duckdb"
        if not os.path.isabs(location) and "://" not in location:
            location = str((root / location).resolve())
    elif kind == "filesystem":
        if not location:
            r.report(f"{key}.bucket_url", "a filesystem destination needs a 'bucket_url' (folder or s3:// URL)")
        elif "://" not in location and not os.path.isabs(location):
            location = str((root / location).resolve())
    table_format = body.get("table_format")
    if table_format not in (None, "delta"):
        r.report(f"{key}.table_format", f"table format '{table_format}' is not supported; supported: delta")
    elif kind != "filesystem" and table_format is not None:
        r.report(f"{key}.table_format", f"only a filesystem destination has a table format, not a {kind} destination")
    if kind in ("postgres", *SQL_DESTINATION_TYPES) and location is not None:
        r.report(f"{key}.location", f"a {kind} destination is given by 'credentials' (a connection string or a mapping), not a location")
    raw_credentials = body.get("credentials")
    if raw_credentials is not None and not isinstance(raw_credentials, (str, dict)):
        r.report(f"{key}.credentials", "must be a connection string or a mapping")
    credentials = r.substitute(body.get("credentials"), f"{key}.credentials", secret=True)
    options = r.substitute(r.mapping(body.get("options"), f"{key}.options"), f"{key}.options", secret=True)
    return DestinationConfig(name, kind, location, credentials, table_format, options)


LOCATION_SCHEMES = ("grpc", "grpc+tcp", "grpc+tls")


_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)$")
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}  # duckdb's meaning of each unit


def size_bytes(size: str) -> int:
    """``'512MB'`` / ``'2GiB'`` (duckdb's spelling of sizes) -> bytes; ValueError when it is not one."""
    m = _SIZE.match(size.strip())
    if not m:
        raise ValueError(f"not a size: {size!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def _size_bytes(text: str) -> int | None:
    try:
        return size_bytes(text)
    except ValueError:
        return None


def _non_negative(r: _Reader, s: Mapping[str, Any], key: str, default: int) -> int:
    value = s.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        r.report(f"server.{key}", f"must be a whole number of bytes, 0 or more, got {value!r}")
        return default
    return value


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
    """Read, substitute and validate a project file; the first problem raises :class:`ConfigError`."""
    file = Path(path).resolve()
    project = _read(_Reader(file))
    assert project is not None  # a strict reader raises instead of returning nothing
    return project


def check_project(path: str | Path) -> tuple[ProjectConfig | None, list[ConfigError]]:
    """Read a project file collecting every problem: ``(project, [])`` when it is valid, else ``(None, problems)``."""
    reader = _Reader(Path(path).resolve(), collect=True)
    with reader.part():
        project = _read(reader)
    if reader.problems:
        return None, reader.problems
    return project, []


def _read(r: _Reader) -> ProjectConfig | None:
    file = r.file
    try:
        text = file.read_text()
    except OSError as exc:
        raise ConfigError(file, "", f"cannot read project file: {exc.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(file, "", f"not valid YAML: {exc}") from None
    if isinstance(raw, dict) and is_dlt_plus(raw):  # dlt+'s own format, read into this one (flight_server/domain/dltplus.py)
        raw = {**to_flight_share(raw, file, r.report, r.warn, r.secrets), "format_version": FORMAT_VERSION}
        for secret in r.secrets:
            r._masker.add([secret])
    top = r.mapping(raw, "", ("format_version", "project", "destinations", "datasets", "profiles", "users", "server"))
    version = top.get("format_version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        # a newer format may mean anything: reading on would only add noise to the report
        raise r.fail("format_version", f"format {version!r} is not supported by this flight-share (reads {FORMAT_VERSION}); upgrade flight-share")
    name = description = None
    with r.part():
        project = r.mapping(top.get("project"), "project", ("name", "description"))
        name = r.name(project.get("name"), "project.name")
        description = project.get("description")
        if description is not None and not isinstance(description, str):
            r.report("project.description", "must be a string")
            description = None

    # names declared in the file: a reference to a declared-but-broken entity is not a second problem
    raw_destinations = _declared(r, top, "destinations")
    raw_datasets = _declared(r, top, "datasets")
    raw_profiles = _declared(r, top, "profiles")

    destinations: dict[str, DestinationConfig] = {}
    for n, v in raw_destinations.items():
        with r.part():
            dest_name = r.name(n, f"destinations.{n}")
            destinations[dest_name] = _destination(r, n, v, file.parent)
    if not raw_destinations:
        r.report("destinations", "at least one destination is needed")

    datasets: dict[str, DatasetConfig] = {}
    for ds_name, raw_ds in raw_datasets.items():
        with r.part():
            key = f"datasets.{r.name(ds_name, f'datasets.{ds_name}')}"
            body = r.mapping(raw_ds, key, ("destination", "schema_name"))
            dests = body.get("destination")
            dests = [dests] if isinstance(dests, str) else dests
            if not isinstance(dests, list) or not dests:
                raise r.fail(f"{key}.destination", "must name one destination or a list of them")
            for d in dests:
                if d not in raw_destinations:
                    r.report(f"{key}.destination", f"destination '{d}' is not defined; defined: {', '.join(sorted(map(str, raw_destinations)))}")
            schema_name = body.get("schema_name")
            if schema_name is not None:
                r.name(schema_name, f"{key}.schema_name")
            datasets[ds_name] = DatasetConfig(ds_name, tuple(dests), schema_name)

    profiles: dict[str, ProfileConfig] = {}
    for p_name, raw_p in raw_profiles.items():
        with r.part():
            key = f"profiles.{r.name(p_name, f'profiles.{p_name}')}"
            body = r.mapping(raw_p, key, ("datasets",))
            grants: dict[str, DatasetAccess] = {}
            for ds_name, raw_g in r.mapping(body.get("datasets"), f"{key}.datasets").items():
                with r.part():
                    gkey = f"{key}.datasets.{ds_name}"
                    if ds_name not in raw_datasets:
                        raise r.fail(gkey, f"dataset '{ds_name}' is not defined; defined: {', '.join(sorted(map(str, raw_datasets)))}")
                    g = r.mapping(raw_g, gkey, ("contract", "write"))
                    write = g.get("write", True)
                    if not isinstance(write, bool):
                        r.report(f"{gkey}.write", "must be true or false")
                    grants[ds_name] = DatasetAccess(ds_name, _contract(r, g.get("contract"), f"{gkey}.contract"), write)
            profiles[p_name] = ProfileConfig(p_name, grants)

    users: dict[str, UserConfig] = {}
    with r.part():
        users = _users(r, top.get("users"), profiles)
    server = ServerConfig()
    with r.part():
        server = _server(r, top.get("server"), profiles, file.parent)
    if r.problems or name is None:
        return None
    return ProjectConfig(file, name, destinations, datasets, profiles, server, description, users, frozenset(r.secrets),
                         tuple(str(w) for w in r.warnings))


def _declared(r: _Reader, top: Mapping[str, Any], section: str) -> dict[str, Any]:
    """A top-level section as a mapping of names (empty, with the problem reported, when it is not one)."""
    with r.part():
        return r.mapping(top.get(section), section)
    return {}


_USER_KEYS = ("profile", "password_hash", "token_hash")
_SERVER_KEYS = (
    "host", "port", "anonymous_profile", "profile", "data_dir", "batch_rows", "max_put_bytes", "jwt_secret",
    "token_ttl", "ticket_ttl", "sql_max_rows", "sql_timeout", "sql_memory_limit", "tls_cert", "tls_key",
    "tls_client_ca", "audit_log", "endpoint_rows", "locations", "cache_bytes", "memory_limit",
    "sql_endpoint_rows",
    "session_ttl", "logins", "sql_per_user", "uploads_per_user", "upload_idle_seconds",
)
_LOGIN_KEYS = ("concurrent", "peer_failures", "user_failures")


def _users(r: _Reader, raw: Any, profiles: Mapping[str, ProfileConfig]) -> dict[str, UserConfig]:
    users: dict[str, UserConfig] = {}
    for u_name, raw_u in r.mapping(raw, "users").items():
        key = f"users.{u_name}"
        if not isinstance(u_name, str) or not _USER_PATTERN.match(u_name):
            raise r.fail(key, f"'{u_name}' is not a valid user name (letters, digits, _ . @ -; at most 128)")
        if isinstance(raw_u, dict):
            for plain in ("password", "token", "api_key", "secret"):
                if plain in raw_u:
                    raise r.fail(f"{key}.{plain}", "plaintext secrets are not allowed in the project file; store a hash "
                                 "(flight-share users add NAME --profile P prints one)")
        body = r.substitute(r.mapping(raw_u, key, _USER_KEYS), key, secret=True)
        profile = body.get("profile")
        if profile not in profiles:
            raise r.fail(f"{key}.profile", f"profile '{profile}' is not defined; defined: {', '.join(sorted(profiles)) or '(none)'}")
        password_hash = body.get("password_hash")
        if password_hash is not None:
            try:
                parse_password_hash(password_hash)
            except HashFormatError as exc:
                raise r.fail(f"{key}.password_hash", str(exc)) from None
        raw_tokens = body.get("token_hash")
        tokens = [raw_tokens] if isinstance(raw_tokens, str) else (raw_tokens or [])
        if not isinstance(tokens, list):
            raise r.fail(f"{key}.token_hash", "must be a token hash or a list of them")
        for i, token in enumerate(tokens):
            try:
                parse_token_hash(token)
            except HashFormatError as exc:
                raise r.fail(f"{key}.token_hash" + (f"[{i}]" if isinstance(raw_tokens, list) else ""), str(exc)) from None
        if password_hash is None and not tokens:
            raise r.fail(key, "a user needs a 'password_hash' or a 'token_hash'")
        users[u_name] = UserConfig(u_name, profile, password_hash, tuple(tokens))
    return users


def _logins(r: _Reader, raw: Any) -> LoginLimits:
    """``server.logins``: whole numbers, ``concurrent`` 0 or more, the failure counts 1 or more."""
    body, d = r.mapping(raw, "server.logins", _LOGIN_KEYS), LoginLimits()
    values: dict[str, int] = {}
    for key in _LOGIN_KEYS:
        value, least = body.get(key, getattr(d, key)), 0 if key == "concurrent" else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise r.fail(f"server.logins.{key}", f"must be a whole number, {least} or more, got {value!r}")
        values[key] = value
    return LoginLimits(**values)


def _server(r: _Reader, raw: Any, profiles: Mapping[str, ProfileConfig], root: Path) -> ServerConfig:
    s = r.mapping(raw, "server", _SERVER_KEYS)
    d = ServerConfig()
    port = s.get("port", d.port)
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        r.report("server.port", f"must be a port number 0-65535, got {port!r}")
        port = d.port
    if "profile" in s and "anonymous_profile" in s:
        raise r.fail("server.profile", "'profile' is the former name of 'anonymous_profile'; set only 'anonymous_profile'")
    anon_key = "anonymous_profile" if "anonymous_profile" in s else "profile"
    anonymous = s.get(anon_key)
    if anonymous is not None and anonymous not in profiles:
        raise r.fail(f"server.{anon_key}", f"profile '{anonymous}' is not defined; defined: {', '.join(sorted(profiles)) or '(none)'}")
    jwt_secret = s.get("jwt_secret")
    if jwt_secret is not None:
        if not isinstance(jwt_secret, str) or not _ENV_ONLY.match(jwt_secret):
            raise r.fail("server.jwt_secret", "must be '{env.NAME}' (a secret is never written into the project file)")
        jwt_secret = r.substitute(jwt_secret, "server.jwt_secret", secret=True)
    memory = s.get("sql_memory_limit", d.sql_memory_limit)
    if not isinstance(memory, str) or _size_bytes(memory) is None:
        raise r.fail("server.sql_memory_limit", f"must be a size like '2GB' or '512MiB', got {memory!r}")
    process_memory = s.get("memory_limit")
    if process_memory is not None:
        given = process_memory
        process_memory = given if isinstance(given, int) and not isinstance(given, bool) else \
            _size_bytes(given) if isinstance(given, str) else None
        if process_memory is None or process_memory < 64 << 20:
            raise r.fail("server.memory_limit", f"must be a size of at least 64MiB like '8GB' or a number of bytes, got {given!r}")
        cache = s.get("cache_bytes")
        if isinstance(cache, int) and cache >= process_memory:
            raise r.fail("server.memory_limit", f"must be larger than server.cache_bytes ({cache}), got {given!r}")

    def path(key: str) -> Path | None:
        value = s.get(key)
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            raise r.fail(f"server.{key}", "must be a file path")
        return (root / value).resolve()

    data_dir = s.get("data_dir")
    return ServerConfig(
        host=str(s.get("host", d.host)),
        port=port,
        anonymous_profile=anonymous,
        data_dir=(root / data_dir).resolve() if data_dir else None,
        batch_rows=r.positive(s, "batch_rows", d.batch_rows),
        max_put_bytes=r.positive(s, "max_put_bytes", d.max_put_bytes),
        # the cache takes at most a quarter of a memory_limit that is set (unless set itself)
        cache_bytes=_non_negative(r, s, "cache_bytes", min(d.cache_bytes, (process_memory or d.cache_bytes * 4) // 4)),
        jwt_secret=jwt_secret,
        token_ttl=r.positive(s, "token_ttl", d.token_ttl),
        ticket_ttl=r.positive(s, "ticket_ttl", d.ticket_ttl),
        session_ttl=r.positive(s, "session_ttl", d.session_ttl),
        logins=_logins(r, s.get("logins")),
        sql_max_rows=r.positive(s, "sql_max_rows", d.sql_max_rows),
        sql_timeout=float(r.positive(s, "sql_timeout", d.sql_timeout, (int, float))),
        sql_memory_limit=memory,
        sql_per_user=r.positive(s, "sql_per_user", d.sql_per_user) if "sql_per_user" in s else None,
        uploads_per_user=r.positive(s, "uploads_per_user", d.uploads_per_user),
        upload_idle_seconds=float(r.positive(s, "upload_idle_seconds", d.upload_idle_seconds, (int, float))),
        memory_limit=process_memory,
        tls_cert=path("tls_cert"),
        tls_key=path("tls_key"),
        tls_client_ca=path("tls_client_ca"),
        audit_log=path("audit_log"),
        endpoint_rows=r.positive(s, "endpoint_rows", d.endpoint_rows),
        sql_endpoint_rows=_non_negative(r, s, "sql_endpoint_rows", d.sql_endpoint_rows),
        locations=_locations(r, s.get("locations")),
    )
