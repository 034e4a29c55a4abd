"""Helpers for the security tests: a locked-down project with users, throwaway certificates."""

from __future__ import annotations

import datetime as dt
import ipaddress
import shutil
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from flight_server.domain.credentials import hash_password, hash_token
from flight_server.testing.servers import cli

# secrets of the test project (the server gets them from the environment, never from the YAML)
JWT_SECRET = "test-signing-secret-0123456789-abcdefghijklmnop"
PG_SECRET = "pg-Secret-Value-4711"
PASSWORDS = {"alice": "alice-pw-Correct-Horse", "bob": "bob-pw-Battery-Staple", "admin": "admin-pw-Tr0ub4dor", "rita": "rita-pw-reports-only"}
BOT_TOKEN = "fst_static-api-token-for-tests-0123456789abcdef"
SECRETS = (JWT_SECRET, PG_SECRET, BOT_TOKEN, *PASSWORDS.values())
ENV = {"FLIGHT_SHARE_JWT_SECRET": JWT_SECRET, "PG_SECRET": PG_SECRET}

EVENTS = "github_events_dataset"
INTERNAL = "internal_dataset"  # same lake, only the admin profile sees it
REPORTS = "reports_dataset"


# the whole suite logs in from 127.0.0.1, wrong passwords included: the shared servers throttle late
# (the throttle itself is tested with the defaults, tests/test_security_sessions.py)
SUITE_LOGINS = "  logins: {peer_failures: 100000, user_failures: 100000}\n"


# the secure project's server.sql_timeout: short, so the test of a runaway query ends soon, but with room for
# a sandbox worker to start and a small query to answer on a loaded 2-core machine running two test workers
# (3 s was exceeded there by queries that take milliseconds when the machine is idle)
SQL_TIMEOUT = 8


def project_yaml(server_extra: str = "") -> str:
    users = "\n".join(
        f"  {name}: {{profile: {profile}, password_hash: \"{hash_password(PASSWORDS[name], n=1 << 10)}\"}}"
        for name, profile in (("alice", "analysts"), ("bob", "analysts"), ("admin", "admin"), ("rita", "reporters"))
    )
    return f"""# a locked-down project: users, no anonymous access
format_version: 1
project: {{name: secure_project}}
destinations:
  lake: {{type: duckdb, location: _data/lake.duckdb}}
  warehouse: {{type: duckdb, location: _data/warehouse.duckdb}}
  # unused by any dataset: only here so a secret from the environment is in play
  pg: {{type: postgres, credentials: "postgresql://loader:{{env.PG_SECRET}}@127.0.0.1:5432/db"}}
datasets:
  {EVENTS}: {{destination: lake}}
  {INTERNAL}: {{destination: lake}}
  {REPORTS}: {{destination: warehouse, schema_name: out_source}}
profiles:
  analysts:
    datasets:
      {EVENTS}: {{contract: freeze, write: false}}
  reporters:
    datasets:
      {REPORTS}: {{contract: evolve}}
  admin:
    datasets:
      {EVENTS}: {{}}
      {INTERNAL}: {{}}
      {REPORTS}: {{}}
users:
{users}
  bot: {{profile: analysts, token_hash: "{hash_token(BOT_TOKEN)}"}}
server:
  jwt_secret: "{{env.FLIGHT_SHARE_JWT_SECRET}}"
  batch_rows: 64
  sql_max_rows: 50000
  sql_timeout: {SQL_TIMEOUT}
  sql_memory_limit: 512MB
{"" if "logins:" in server_extra else SUITE_LOGINS}{server_extra}"""


def make_data(folder: Path, events: int = 300) -> Path:
    """Load the demo events into both datasets of the lake once; returns the data folder to copy."""
    folder.mkdir(parents=True, exist_ok=True)
    project = folder / "dlt.yml"
    project.write_text(project_yaml())
    cli("demo", "--project", str(project), "--events", str(events), env=ENV)
    cli("demo", "--project", str(project), "--events", "50", "--dataset", INTERNAL, "--seed", "7", env=ENV)
    return folder / "_data"


def secure_project(folder: Path, data: Path, server_extra: str = "") -> Path:
    """A project folder of its own (duckdb files are locked per process) with a copy of the data."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copytree(data, folder / "_data")
    project = folder / "dlt.yml"
    project.write_text(project_yaml(server_extra))
    return project


@dataclass(frozen=True)
class Pki:
    """A throwaway CA with a server certificate for 127.0.0.1/localhost and client certificates."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path  # a client certificate from another CA
    rogue_key: Path


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return path


def _cert(subject: str, key, issuer_cert, issuer_key, ca: bool = False, server: bool = False) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_cert.subject if issuer_cert is not None else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return builder.sign(issuer_key if issuer_key is not None else key, hashes.SHA256())


def make_pki(folder: Path) -> Pki:
    folder.mkdir(parents=True, exist_ok=True)

    def pem(cert: x509.Certificate, name: str) -> Path:
        path = folder / name
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return path

    ca_key = _key()
    ca = _cert("flight-share test CA", ca_key, None, None, ca=True)
    server_key = _key()
    client_key = _key()
    rogue_ca_key = _key()
    rogue_ca = _cert("rogue CA", rogue_ca_key, None, None, ca=True)
    rogue_key = _key()
    return Pki(
        ca=pem(ca, "ca.pem"),
        server_cert=pem(_cert("localhost", server_key, ca, ca_key, server=True), "server.pem"),
        server_key=_write_key(server_key, folder / "server.key"),
        client_cert=pem(_cert("alice-laptop", client_key, ca, ca_key), "client.pem"),
        client_key=_write_key(client_key, folder / "client.key"),
        rogue_cert=pem(_cert("mallory", rogue_key, rogue_ca, rogue_ca_key), "rogue.pem"),
        rogue_key=_write_key(rogue_key, folder / "rogue.key"),
    )
