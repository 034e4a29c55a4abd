"""Project file loading: typed objects, env substitution, and errors naming file and key path."""

from __future__ import annotations

from pathlib import Path

import pytest

from flight_server.domain.config import ConfigError, check_project, load_project
from flight_server.testing.servers import REPO, cli

BASE = """
format_version: 1
project: {name: p}
destinations:
  lake: {type: duckdb, location: data/lake.duckdb}
datasets:
  ds: {destination: [lake]}
profiles:
  access:
    datasets:
      ds: {contract: freeze}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "dlt.yml"
    path.write_text(text)
    return path


def test_demo_project_loads_with_the_seed_contracts() -> None:
    project = load_project(REPO / "configs" / "demo" / "dlt.yml")
    assert project.name == "dlt_example_project"
    access = project.profile("access").datasets
    assert access["github_events_dataset"].contract == "freeze"
    assert access["reports_dataset"].contract == {"tables": "evolve", "columns": "freeze", "data_type": "freeze"}
    assert project.datasets["github_events_dataset"].destination == "lake"


def test_relative_paths_resolve_against_the_file(tmp_path: Path) -> None:
    project = load_project(write(tmp_path, BASE))
    assert project.destinations["lake"].location == str(tmp_path / "data" / "lake.duckdb")


def test_env_substitution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PG_PASSWORD", "s3cret")
    text = BASE + """
  other:
    datasets: {}
""" 
    text = text.replace("location: data/lake.duckdb}", "location: data/lake.duckdb}\n  pg: {type: postgres, credentials: 'postgresql://u:{env.PG_PASSWORD}@127.0.0.1:5432/db'}")
    project = load_project(write(tmp_path, text))
    assert project.destinations["pg"].credentials == "postgresql://u:s3cret@127.0.0.1:5432/db"
    monkeypatch.delenv("PG_PASSWORD")
    with pytest.raises(ConfigError) as err:
        load_project(tmp_path / "dlt.yml")
    assert err.value.key == "destinations.pg.credentials" and "PG_PASSWORD" in str(err.value)


def test_a_server_built_in_process_masks_the_projects_secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 23: only the CLI registered the environment's secrets for masking; a server built in process (tests,
    an embedding application) put them into errors as they were."""
    from flight_server.domain.catalog import Catalog
    from flight_server.domain.masking import mask
    from flight_server.storage import open_storage

    secret = "in-process-" + tmp_path.name  # unique: the masker is the process's
    monkeypatch.setenv("PG_PASSWORD", secret)
    text = BASE.replace("location: data/lake.duckdb}", "location: data/lake.duckdb}\n  pg: {type: postgres, credentials: "
                        "{host: 127.0.0.1, username: u, password: '{env.PG_PASSWORD}', database: db}}")
    project = load_project(write(tmp_path, text))
    assert secret in project.secrets and mask(f"failed with {secret}") == f"failed with {secret}"
    Catalog(project, open_storage)
    assert mask(f"failed with {secret}") == "failed with ***"


@pytest.mark.parametrize(
    "old, new, key, words",
    [
        ("project: {name: p}", "project: {name: p, colour: red}", "project.colour", "unknown key 'colour'"),
        ("ds: {destination: [lake]}", "ds: {destination: [nowhere]}", "datasets.ds.destination", "destination 'nowhere' is not defined"),
        ("contract: freeze", "contract: melt", "profiles.access.datasets.ds.contract", "contract mode 'melt' is not allowed"),
        ("contract: freeze", "contract: {tables: evolve, columns: thaw}", "profiles.access.datasets.ds.contract.columns", "allowed: evolve, freeze, discard_row, discard_value"),
        ("contract: freeze", "contract: {rows: freeze}", "profiles.access.datasets.ds.contract.rows", "unknown key 'rows'"),
        ("type: duckdb", "type: oracle", "destinations.lake.type", "supported: duckdb, filesystem, postgres"),
        ("      ds: {contract: freeze}", "      nope: {contract: freeze}", "profiles.access.datasets.nope", "dataset 'nope' is not defined"),
        ("project: {name: p}", "project: {name: p}\nserver: {port: 99999}", "server.port", "port number"),
        ("project: {name: p}", "project: {name: p}\nformat_version: 7", "format_version", "upgrade flight-share"),
        ("project: {name: p}", "project: {name: p}\nserver: {memory_limit: lots}", "server.memory_limit", "like '8GB'"),
        ("project: {name: p}", "project: {name: p}\nserver: {memory_limit: 1MiB}", "server.memory_limit", "at least 64MiB"),
        ("project: {name: p}", "project: {name: p}\nserver: {memory_limit: 1GB, cache_bytes: 2000000000}",
         "server.memory_limit", "larger than server.cache_bytes"),
    ],
)
def test_errors_name_file_key_and_what_is_allowed(tmp_path: Path, old: str, new: str, key: str, words: str) -> None:
    assert old in BASE
    path = write(tmp_path, BASE.replace(old, new))
    with pytest.raises(ConfigError) as err:
        load_project(path)
    assert err.value.key == key
    assert str(path) in str(err.value) and words in str(err.value)


def test_memory_limit_reads_sizes_and_bytes(tmp_path: Path) -> None:
    for given, expected in (("512MiB", 512 << 20), ("2GB", 2 * 10**9), ("1.5GiB", 3 << 29), (4_000_000_000, 4_000_000_000)):
        path = write(tmp_path, BASE.replace("project: {name: p}", f"project: {{name: p}}\nserver: {{memory_limit: {given}}}"))
        server = load_project(path).server
        assert server.memory_limit == expected and server.cache_bytes == min(1 << 30, expected // 4)
    assert load_project(write(tmp_path, BASE)).server.memory_limit is None  # serve: half the machine's memory


def test_bad_yaml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_project(write(tmp_path, "project: [unclosed"))
    with pytest.raises(ConfigError, match="cannot read project file"):
        load_project(tmp_path / "missing.yml")


def test_cli_reports_config_errors_in_one_line(tmp_path: Path) -> None:
    path = write(tmp_path, BASE.replace("contract: freeze", "contract: melt"))
    result = cli("serve", "--project", str(path), "--port", "0", check=False, timeout=60)
    assert result.returncode != 0
    assert "profiles.access.datasets.ds.contract" in result.stderr and "Traceback" not in result.stderr


def test_check_project_collects_every_problem_load_project_stops_at_the_first(tmp_path: Path) -> None:
    text = (BASE.replace("project: {name: p}", "project: {name: p, colour: red}")
            .replace("type: duckdb", "type: oracle")
            .replace("contract: freeze", "contract: {columns: thaw, rows: freeze}, write: maybe"))
    path = write(tmp_path, text)
    project, problems = check_project(path)
    assert project is None
    assert [p.key for p in problems] == [
        "project.colour", "destinations.lake.type", "profiles.access.datasets.ds.write",
        "profiles.access.datasets.ds.contract.rows", "profiles.access.datasets.ds.contract.columns",
    ]
    assert all(p.file == str(path) for p in problems)
    with pytest.raises(ConfigError) as err:
        load_project(path)
    assert err.value.key == "project.colour"
    project, problems = check_project(write(tmp_path, BASE))
    assert problems == [] and project is not None and project.name == "p"
    assert check_project(tmp_path / "missing.yml")[1][0].problem.startswith("cannot read project file")
