"""The install is reproducible: one pinned uv everywhere, and a lock that covers every extra."""

from __future__ import annotations

import re
import tomllib

from flight_server.testing.servers import REPO


def _lock() -> dict:
    return tomllib.loads((REPO / "uv.lock").read_text())


def test_uv_is_pinned_once_in_effect() -> None:
    """The Makefile bootstraps the uv that the `dev` group locks (else `uv sync` would swap it mid-install)."""
    (makefile,) = re.findall(r"^UV_VERSION := (\S+)$", (REPO / "Makefile").read_text(), re.M)
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert f"uv=={makefile}" in project["dependency-groups"]["dev"]
    (locked,) = [p["version"] for p in _lock()["package"] if p["name"] == "uv"]
    assert locked == makefile


def test_the_lock_pins_every_extra_with_hashes() -> None:
    lock = _lock()
    packages = {p["name"]: p for p in lock["package"]}
    me = packages["flight-share"]
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert set(me["optional-dependencies"]) == set(project["project"]["optional-dependencies"])
    for name in ("dlt", "duckdb", "pyarrow", "boto3", "botocore", "s3fs", "sqlglot", "adbc-driver-flightsql"):
        assert name in packages, name
    # the known-bad combinations the ranges exclude
    assert packages["duckdb"]["version"].startswith("1.")
    assert packages["sqlglot"]["version"].startswith("29.")
    assert int(packages["botocore"]["version"].split(".")[1]) < 44
    for package in lock["package"]:
        for file in package.get("wheels", []) + ([package["sdist"]] if "sdist" in package else []):
            assert file["hash"].startswith("sha256:"), package["name"]
