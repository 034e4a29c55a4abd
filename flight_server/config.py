"""Load and validate a project file (``dlt.yml``) into typed, frozen objects.

Everything is checked up front; a problem raises :class:`ConfigError` naming the file, the key path
and what is allowed. Nothing downstream reads raw YAML again.

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

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Union

import yaml

from flight_server.credentials import HashFormatError, parse_password_hash, parse_token_hash

FORMAT_VERSION = 1
DESTINATION_TYPES = ("duckdb", "filesystem", "postgres")
CONTRACT_ENTITIES = ("tables", "columns", "data_type")
CONTRACT_MODES = ("evolve", "freeze", "discard_row", "discard_value")
_ENV_PATTERN = re.compile(r"\{env\.([A-Za-z_][A-Za-z0-9_]*)\}")
_NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
_USER_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.@-]{0,127}$")
_ENV_ONLY = re.compile(r"^\{env\.([A-Za-z_][A-Za-z0-9_]*)\}$")

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
class UserConfig:
    """A user who may log in: a profile and only hashes of their secrets."""

    name: str
    profile: str
    password_hash: str | None = None  # scrypt$... (flight_server.credentials)
    token_hashes: tuple[str, ...] = ()  # sha256$... of static API tokens


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
    jwt_secret: str | None = None  # only via {env.NAME}; default: $FLIGHT_SHARE_JWT_SECRET or random
    token_ttl: int = 3600  # seconds a bearer token from the handshake is valid
    ticket_ttl: int = 900  # seconds a DoGet ticket is valid
    sql_max_rows: int = 10_000_000
    sql_timeout: float = 120.0  # seconds
    sql_memory_limit: str = "2GB"
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    audit_log: Path | None = None  # JSON lines; default: the log (stderr)

    @property
    def profile(self) -> str | None:
        """Former name of :attr:`anonymous_profile` (the profile of every caller before auth)."""
        return self.anonymous_profile


@dataclass(frozen=True)
class ProjectConfig:
    """A whole validated project file."""

    file: Path
    name: str
    destinations: Mapping[str, DestinationConfig]
    datasets: Mapping[str, DatasetConfig]
    profiles: Mapping[str, ProfileConfig]
    server: ServerConfig
    users: Mapping[str, UserConfig] = field(default_factory=dict)
    secrets: frozenset[str] = frozenset()  # values substituted from the environment into secret places

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
        self.secrets: set[str] = set()

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

    def substitute(self, value: Any, key: str, secret: bool = False) -> Any:
        """Replace ``{env.NAME}`` in every string, recursively; remember secret values for masking."""
        if isinstance(value, str):
            def repl(m: re.Match[str]) -> str:
                var = m.group(1)
                if var not in os.environ:
                    raise self.fail(key, f"environment variable '{var}' is not set")
                if secret:
                    self.secrets.add(os.environ[var])
                return os.environ[var]
            return _ENV_PATTERN.sub(repl, value)
        if isinstance(value, dict):
            return {k: self.substitute(v, f"{key}.{k}", secret) for k, v in value.items()}
        if isinstance(value, list):
            return [self.substitute(v, f"{key}[{i}]", secret) for i, v in enumerate(value)]
        return value

    def positive(self, s: Mapping[str, Any], key: str, default: Any, kinds: tuple[type, ...] = (int,)) -> Any:
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
    credentials = r.substitute(body.get("credentials"), f"{key}.credentials", secret=True)
    options = r.substitute(r.mapping(body.get("options"), f"{key}.options"), f"{key}.options", secret=True)
    return DestinationConfig(name, kind, location, credentials, table_format, options)


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
    top = r.mapping(raw, "", ("format_version", "project", "destinations", "datasets", "profiles", "users", "server"))
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

    users = _users(r, top.get("users"), profiles)
    server = _server(r, top.get("server"), profiles, file.parent)
    return ProjectConfig(file, name, destinations, datasets, profiles, server, users, frozenset(r.secrets))


_USER_KEYS = ("profile", "password_hash", "token_hash")
_SERVER_KEYS = (
    "host", "port", "anonymous_profile", "profile", "data_dir", "batch_rows", "max_put_bytes", "jwt_secret",
    "token_ttl", "ticket_ttl", "sql_max_rows", "sql_timeout", "sql_memory_limit", "tls_cert", "tls_key",
    "tls_client_ca", "audit_log",
)


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


def _server(r: _Reader, raw: Any, profiles: Mapping[str, ProfileConfig], root: Path) -> ServerConfig:
    s = r.mapping(raw, "server", _SERVER_KEYS)
    d = ServerConfig()
    port = s.get("port", d.port)
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise r.fail("server.port", f"must be a port number 0-65535, got {port!r}")
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
    if not isinstance(memory, str) or not re.match(r"^\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)$", memory):
        raise r.fail("server.sql_memory_limit", f"must be a size like '2GB' or '512MiB', got {memory!r}")

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
        jwt_secret=jwt_secret,
        token_ttl=r.positive(s, "token_ttl", d.token_ttl),
        ticket_ttl=r.positive(s, "ticket_ttl", d.ticket_ttl),
        sql_max_rows=r.positive(s, "sql_max_rows", d.sql_max_rows),
        sql_timeout=float(r.positive(s, "sql_timeout", d.sql_timeout, (int, float))),
        sql_memory_limit=memory,
        tls_cert=path("tls_cert"),
        tls_key=path("tls_key"),
        tls_client_ca=path("tls_client_ca"),
        audit_log=path("audit_log"),
    )
