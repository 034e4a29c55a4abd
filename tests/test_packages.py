"""Data package helpers without a server: where connections come from, the entry-point listing, package config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import client
import client.catalog
from client.catalog import open_catalog
from client.data_packages import PackageConfig, packages, server_side_only
from client.environment import ConnectionSettings, default_token_file, resolve
from client.errors import AuthenticationError, UnsupportedError, UsageError

PKG = "dlt_example_project"


def test_url_comes_from_argument_package_env_baked_generic_env_default() -> None:
    env = {"DLT_EXAMPLE_PROJECT_URL": "grpc://pkg-env:1", "FLIGHT_SHARE_URL": "grpc://generic:2"}
    assert resolve("grpc://arg:0", package=PKG, package_url="grpc://baked:3", environ=env).url == "grpc://arg:0"
    assert resolve(package=PKG, package_url="grpc://baked:3", environ=env).url == "grpc://pkg-env:1"
    assert resolve(package=PKG, package_url="grpc://baked:3", environ={"FLIGHT_SHARE_URL": "grpc://generic:2"}).url == "grpc://baked:3"
    assert resolve(environ={"FLIGHT_SHARE_URL": "grpc://generic:2"}).url == "grpc://generic:2"
    assert resolve(environ={}).url == "grpc://127.0.0.1:8815"


def test_the_first_level_with_credentials_wins_whole(tmp_path: Path) -> None:
    env = {"DLT_EXAMPLE_PROJECT_TOKEN": "pkg-token", "FLIGHT_SHARE_TOKEN": "generic-token",
           "FLIGHT_SHARE_USERNAME": "bob", "FLIGHT_SHARE_PASSWORD": "pw", "XDG_CONFIG_HOME": str(tmp_path)}
    assert resolve(username="alice", password="x", package=PKG, environ=env).credentials == {"username": "alice", "password": "x"}
    assert resolve(package=PKG, environ=env).credentials == {"token": "pkg-token"}
    generic = resolve(environ=env)  # no package: its variables are not looked at
    assert generic.credentials == {"token": "generic-token", "username": "bob", "password": "pw"}
    assert resolve(environ={"FLIGHT_SHARE_PASSWORD": "pw"}).credentials == {}  # a password alone means nothing
    assert "pw" not in repr(generic) and "generic-token" not in repr(generic)


def test_token_files(tmp_path: Path) -> None:
    env = {"XDG_CONFIG_HOME": str(tmp_path)}
    assert resolve(package=PKG, environ=env).credentials == {}
    default = default_token_file(PKG, env)
    assert default == tmp_path / "flight-share" / "tokens" / PKG
    default.parent.mkdir(parents=True)
    default.write_text("\n  tok-from-file  \n")
    settings = resolve(package=PKG, environ=env)
    assert settings.credentials == {"token": "tok-from-file"} and settings.source == str(default)
    other = tmp_path / "other"
    other.write_text("tok2")
    assert resolve(package=PKG, environ={**env, "FLIGHT_SHARE_TOKEN_FILE": str(other)}).credentials == {"token": "tok2"}
    assert resolve(token_file=other, environ={}).credentials == {"token": "tok2"}
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(AuthenticationError, match="is empty"):
        resolve(token_file=tmp_path / "empty", environ={})
    with pytest.raises(AuthenticationError, match="cannot read token file"):
        resolve(token_file=tmp_path / "missing", environ={})


def test_open_catalog_hands_resolved_settings_to_connect(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, dict[str, Any]]] = []

    def fake_connect(url: str, **kwargs: Any) -> str:
        calls.append((url, kwargs))
        return "catalog"

    monkeypatch.setattr(client.catalog, "connect", fake_connect)
    assert open_catalog(ConnectionSettings("grpc://h:1")) == "catalog" and calls[-1] == ("grpc://h:1", {})
    open_catalog(ConnectionSettings("grpc://h:1", {"token": "t"}), tls_root_certs=b"pem")
    assert calls[-1] == ("grpc://h:1", {"token": "t", "tls_root_certs": b"pem"})


def test_connect_arguments_that_do_not_go_together_raise_the_clients_own_error() -> None:
    for kwargs in ({"username": "u"}, {"password": "p"}, {"username": "u", "password": "p", "token": "t"}):
        with pytest.raises(UsageError) as err:
            client.connect("grpc://127.0.0.1:1", **kwargs)
        assert isinstance(err.value, client.FlightShareError) and isinstance(err.value, ValueError)


def test_a_server_field_never_overwrites_the_errors_own_attributes() -> None:
    error = client.InvalidRequestError("the text", message="a field called message", table="t")
    assert str(error) == "the text" and error.message == "the text"
    assert error.fields == {"message": "a field called message", "table": "t"} and error.table == "t"


def test_the_client_has_a_version() -> None:
    assert client.__version__ and client.__version__ != "0+unknown"  # installed (editable) by make


def test_packages_lists_the_dlt_package_entry_point_group(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dist = tmp_path / "my_data_pkg-1.2.3.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my_data_pkg\nVersion: 1.2.3\nSummary: Some shared data\n")
    (dist / "entry_points.txt").write_text("[dlt_package]\ndlt-project = my_data_pkg\n")
    (tmp_path / "my_data_pkg.py").write_text("def catalog():\n    return 'the catalog'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    found = [p for p in client.packages() if p.name == "my_data_pkg"]
    assert len(found) == 1
    (pkg,) = found
    assert (pkg.distribution, pkg.version, pkg.description) == ("my_data_pkg", "1.2.3", "Some shared data")
    assert str(pkg) == "my_data_pkg 1.2.3: Some shared data"
    assert pkg.catalog() == "the catalog"
    assert packages is client.packages


def test_package_config_and_server_side_only() -> None:
    raw = {"format": 1, "name": "p", "package": "p_pkg", "description": "d", "server": "grpc://h:1", "profile": "access",
           "datasets": {"ds": {"destination": "lake", "destination_type": "duckdb", "contract": "freeze", "write": True}}}
    config = PackageConfig.from_dict(raw)
    assert config.datasets["ds"].contract == "freeze"
    assert str(config).splitlines() == ["Project p (package p_pkg) for profile access at grpc://h:1", "d",
                                        "  ds@lake (duckdb), read-write, contract: freeze"]
    with pytest.raises(UnsupportedError, match="newer flight-share"):
        PackageConfig.from_dict({**raw, "format": 99})
    error = server_side_only("entities", "p_pkg")
    assert isinstance(error, NotImplementedError)
    assert "p_pkg.entities() needs the project itself" in str(error) and "p_pkg.catalog()" in str(error)
