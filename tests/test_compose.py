"""docker-compose.yml: validated with Debian's docker-compose (no container engine runs in CI), and its
flight-share health check run for real against a server."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from flight_server.testing.servers import REPO, ServerProcess
from flight_server.testing.services import free_port

COMPOSE = REPO / "docker-compose.yml"
SECRETS = {"MINIO_ROOT_USER": "compose-user", "MINIO_ROOT_PASSWORD": "compose-secret-1", "POSTGRES_PASSWORD": "compose-secret-2"}


def docker_compose(*args: str, env: dict[str, str] | None = None, file: Path = COMPOSE) -> subprocess.CompletedProcess:
    binary = shutil.which("docker-compose")
    assert binary, "docker-compose is not installed: `make install-test` installs Debian's docker-compose package"
    clean = {k: v for k, v in os.environ.items() if k not in SECRETS and k not in ("S3_BUCKET", "DEMO_EVENTS")}
    return subprocess.run([binary, "-f", str(file), *args], capture_output=True, text=True, timeout=120,
                          env={**clean, **(env or {})}, cwd=file.parent)


def makefile_uv_version() -> str:
    (version,) = re.findall(r"^UV_VERSION := (\S+)$", (REPO / "Makefile").read_text(), re.M)
    return version


def rendered() -> dict:
    result = docker_compose("config", env=SECRETS)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def test_the_compose_file_validates() -> None:
    result = docker_compose("config", "-q", env=SECRETS)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""


def test_secrets_are_required_from_the_environment_and_not_written_in_the_file() -> None:
    result = docker_compose("config", "-q")
    assert result.returncode != 0
    assert "set MINIO_ROOT_USER" in result.stderr or "set POSTGRES_PASSWORD" in result.stderr
    text = COMPOSE.read_text()
    for secret in SECRETS.values():
        assert secret not in text
    secret_keys = re.findall(r"^\s*(\w*(?:PASSWORD|SECRET_ACCESS_KEY|ACCESS_KEY_ID|ROOT_USER)): *(.*)$", text, re.M)
    assert len(secret_keys) >= 6
    for key, value in secret_keys:
        assert value.startswith("${"), f"{key} in docker-compose.yml is not taken from the environment"


def test_services_health_checks_and_the_s3_postgres_project() -> None:
    config = rendered()
    services = config["services"]
    assert set(services) == {"flight-share", "minio", "minio-bucket", "postgres"}
    for name in ("flight-share", "minio", "postgres"):
        assert services[name]["healthcheck"]["test"], name
    server = services["flight-share"]
    assert server["depends_on"] == {"minio-bucket": {"condition": "service_completed_successfully"},
                                    "postgres": {"condition": "service_healthy"}}
    assert services["minio-bucket"]["depends_on"] == {"minio": {"condition": "service_healthy"}}
    command = " ".join(server["command"])
    assert "flight-share serve --project configs/s3_postgres/dlt.yml" in command
    assert "flight-share demo --project configs/s3_postgres/dlt.yml" in command
    # installed from the lock, with the uv version the Makefile pins, into the container's own venv
    assert f"pip install -q uv=={makefile_uv_version()} && uv sync --locked --extra server" in command
    assert server["environment"]["UV_PROJECT_ENVIRONMENT"] == "/opt/venv"
    assert server["environment"]["PATH"].startswith("/opt/venv/bin:")
    # every {env.NAME} the project file reads is set for the server, pointing at the compose services
    project = yaml.safe_dump(yaml.safe_load((REPO / "configs" / "s3_postgres" / "dlt.yml").read_text()))  # no comments
    needed = set(re.findall(r"\{env\.([A-Za-z_][A-Za-z0-9_]*)\}", project))
    environment = server["environment"]
    assert needed <= set(environment), needed - set(environment)
    assert environment["S3_ENDPOINT_URL"] == "http://minio:9000" and environment["PG_HOST"] == "postgres"
    assert environment["AWS_SECRET_ACCESS_KEY"] == SECRETS["MINIO_ROOT_PASSWORD"]
    assert environment["PG_PASSWORD"] == SECRETS["POSTGRES_PASSWORD"]
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"] == SECRETS["POSTGRES_PASSWORD"]
    assert services["postgres"]["environment"]["POSTGRES_USER"] == environment["PG_USER"]
    assert services["postgres"]["environment"]["POSTGRES_DB"] == environment["PG_DATABASE"]


def test_an_invalid_compose_file_is_rejected(tmp_path: Path) -> None:
    broken = tmp_path / "docker-compose.yml"
    broken.write_text("services:\n  x:\n    image: python:3.11-slim\n    healthcheck: {test: [CMD, 'true'], retries: many}\n")
    result = docker_compose("config", "-q", file=broken)
    assert result.returncode != 0 and "healthcheck.retries" in result.stderr
    broken.write_text("services:\n  x:\n    image: python:3.11-slim\n    depends_on: {y: {condition: service_healthy}}\n")
    result = docker_compose("config", "-q", file=broken)
    assert result.returncode != 0 and "depends on service 'y' which is undefined" in result.stderr


def _health_check(port: int) -> subprocess.CompletedProcess:
    """The flight-share service's health check command, run here against 127.0.0.1:PORT."""
    test = rendered()["services"]["flight-share"]["healthcheck"]["test"]
    assert test[0] == "CMD"
    argv = [a.replace("127.0.0.1:8815", f"127.0.0.1:{port}") for a in test[1:]]
    assert argv[0] == "python", shlex.join(argv)  # the container's PATH puts its locked venv first
    return subprocess.run([sys.executable, *argv[1:]], capture_output=True, text=True, timeout=60)


def test_the_health_check_passes_on_a_serving_server_and_fails_without_one(server: ServerProcess) -> None:
    ok = _health_check(server.port)
    assert ok.returncode == 0, ok.stderr
    down = _health_check(free_port())
    assert down.returncode != 0
