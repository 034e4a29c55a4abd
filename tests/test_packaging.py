"""A data package, built as a wheel and installed into a fresh virtual environment that has only the
client's dependencies (no dlt, no duckdb), runs the seed's steps 2-6 verbatim against a running server.

Slow (a venv with pyarrow and pandas): one venv per test session, shared by the tests here.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from flight_server.cli.demo import CHILD_TABLES, EVENT_TABLES
from flight_server.testing.servers import REPO, ServerProcess, cli
from tests.test_write_path import FROZEN_COLUMN, FROZEN_TABLE

# (slow is set per test by tests/conftest.py: every test here that starts a process or a load)

PACKAGE = "dlt_example_project"
DLT_CLASS = "<class 'dlt.common.schema.exceptions.DataValidationError'>"


def run(args: list[str | Path], env: dict[str, str] | None = None, cwd: Path | None = None,
        timeout: float = 600) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    """The environment of an analyst's shell: nothing of this checkout, no flight-share settings."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV") and not k.startswith(("FLIGHT_SHARE_", "DLT_"))}
    return {**env, "PYTHONNOUSERSITE": "1", "XDG_CONFIG_HOME": str(home / "config"), **extra}


def build_wheel(source: Path, out: Path) -> Path:
    """``pip wheel`` with this interpreter's setuptools (no download of build tools)."""
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", source, "-w", out])
    (wheel,) = out.glob("*.whl")
    return wheel


@pytest.fixture(scope="session")
def client_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """flight-share's wheel, built from a copy of this checkout (its base dependencies: the client's)."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "flight-share"  # a copy: building in the work tree would leave build/ and *.egg-info there
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("client", "flight_server"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    return build_wheel(src, root / "wheels")


NOT_FOR_ANALYSTS = ("dlt", "duckdb", "dlt_plus", "click", "yaml", "grpc", "grpc_tools", "sqlglot", "deltalake")
FOUND = ("import importlib.util as u, sys; "
         f"print([m for m in {NOT_FOR_ANALYSTS!r} if u.find_spec(m) is not None]); "
         "print(sys.flags.no_user_site, sys.prefix != sys.base_prefix)")


def fresh_venv(root: Path, env: dict[str, str]) -> Path:
    run([sys.executable, "-m", "venv", root / "venv"], env=env)
    return root / "venv" / "bin" / "python"


@pytest.fixture(scope="session")
def venv_python(tmp_path_factory: pytest.TempPathFactory, client_wheel: Path) -> Path:
    """A fresh venv (no system site-packages) with pyarrow, pandas and this checkout's client, nothing else."""
    root = tmp_path_factory.mktemp("analyst")
    env = clean_env(root)
    python = fresh_venv(root, env)
    versions = [f"{d}=={importlib.metadata.version(d)}" for d in ("pyarrow", "pandas")]
    run([python, "-m", "pip", "install", "-q", *versions], env=env)
    run([python, "-m", "pip", "install", "-q", "--no-deps", client_wheel], env=env)
    assert run([python, "-c", FOUND], env=env, cwd=root).stdout.split("\n")[:2] == ["[]", "1 True"]
    return python


CLIENT_READS = """\
from client import connect
with connect({url!r}) as catalog:
    df = catalog.github_events_dataset.issues_event.df()
print(type(df).__name__, len(df))
"""


def test_the_client_alone_installs_from_its_package_and_reads(client_wheel: Path, server: ServerProcess,
                                                             tmp_path: Path) -> None:
    """``pip install flight-share`` into an empty venv resolves the client's own ranges (pyproject.toml, not
    the lock) and brings neither dlt, duckdb nor gRPC tooling; ``from client import connect`` reads."""
    env = clean_env(tmp_path)
    python = fresh_venv(tmp_path, env)
    run([python, "-m", "pip", "install", "-q", client_wheel], env=env)
    assert run([python, "-c", FOUND], env=env, cwd=tmp_path).stdout.split("\n")[:2] == ["[]", "1 True"]
    (tmp_path / "reads.py").write_text(CLIENT_READS.format(url=server.url))
    out = run([python, "reads.py"], env=env, cwd=tmp_path).stdout.split()
    assert out[0] == "DataFrame" and int(out[1]) > 0


@pytest.fixture()
def package_server(demo_project: Path, tmp_path: Path) -> Iterator[ServerProcess]:
    """A server over a private copy of the demo project (the seed writes into reports_dataset)."""
    folder = tmp_path / "project"
    shutil.copytree(demo_project.parent, folder, ignore=shutil.ignore_patterns(".flight-share"))
    with ServerProcess(folder / "dlt.yml") as server:
        yield server


SEED = '''\
import importlib.util
assert importlib.util.find_spec("dlt") is None and importlib.util.find_spec("duckdb") is None


def aggregate_issues(df):
    return df.groupby("payload__action").size().reset_index(name="n")


def attempt(step):
    try:
        step()
    except Exception as exc:
        print(f"{type(exc).__name__}: {exc}")

print("== 2")
import dlt_example_project as dlt_project

print("== 3")
my_catalog = dlt_project.catalog() # Access the data catalog created by dlt
print(my_catalog) # Inspect datasets and available tables
print(my_catalog.github_events_dataset) # Access the dataset github_events_dataset from the catalog

print("== 4")
df = my_catalog.github_events_dataset.issues_event.df()
print(type(df).__name__, len(df))

print("== 5")
reports_df = aggregate_issues(df)

print("== 6")
print(my_catalog.reports_dataset.save(reports_df, table_name="aggregated_issues"))
print("== frozen table")
attempt(lambda: print(my_catalog.github_events_dataset.save(reports_df, table_name="aggregated_issues")))
print("== frozen column")
# Access the aggregated_issues table from the reports_dataset in the catalog
reports_df = my_catalog.reports_dataset.aggregated_issues.df()

# Create a new column "id"
reports_df["id"] = 1

# Push back the modified table
attempt(lambda: print(my_catalog.reports_dataset.save(reports_df, table_name="aggregated_issues")))
print("== end")
'''

EXTRAS = '''\
import client, dlt_example_project as p
print([str(pkg) for pkg in client.packages()])
print(p.access_profile())
print(p.config())
print(p.context().run_dir)
print(client.__file__)
for name in ("entities", "runner"):
    try:
        getattr(p, name)()
    except NotImplementedError as exc:
        print(f"{type(exc).__name__}: {exc}")
try:
    p.catalog()
except ConnectionError as exc:
    print(f"{type(exc).__name__}: {exc}")
'''


def sections(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    current = ""
    for line in text.splitlines():
        if line.startswith("== "):
            current = line[3:]
            out[current] = []
        else:
            out.setdefault(current, []).append(line)
    return out


def test_seed_steps_2_to_6_from_an_installed_wheel(venv_python: Path, package_server: ServerProcess,
                                                   tmp_path: Path) -> None:
    project = package_server.project
    cli("package", str(project.parent), "--name", PACKAGE, "--server", package_server.url, "--out", str(tmp_path / "pkg"))
    wheel = build_wheel(tmp_path / "pkg", tmp_path / "dist")
    assert wheel.name == f"{PACKAGE}-0.0.1-py3-none-any.whl"
    env = clean_env(tmp_path)
    run([venv_python, "-m", "pip", "install", "-q", wheel], env=env)  # its one dependency, flight-share, is there

    (tmp_path / "analyst.py").write_text(SEED)
    out = sections(run([venv_python, "analyst.py"], env=env, cwd=tmp_path).stdout)

    data = project.parent / "_data"
    assert out["3"][:3] == [
        "Datasets in project dlt_example_project for profile access:",
        f"github_events_dataset@lake[duckdb:///{str(data / 'lake.duckdb').lstrip('/')}]",
        f"reports_dataset@warehouse[duckdb:///{str(data / 'warehouse.duckdb').lstrip('/')}]",
    ]
    assert re.fullmatch(r"Dataset github_events_dataset tables in logical schema events@v\d+", out["3"][3])
    assert sorted(out["3"][4:]) == sorted(EVENT_TABLES + CHILD_TABLES)
    assert re.fullmatch(r"DataFrame [1-9]\d*", out["4"][0])

    saved = out["6"]
    assert re.fullmatch(r"Pipeline save_aggregated_issues_pipeline load step completed in [\d.]+ seconds", saved[0])
    assert saved[1] == "1 load package(s) were loaded to destination warehouse and into dataset reports_dataset"
    assert saved[2] == "The duckdb destination 'warehouse' stored the data"
    assert re.fullmatch(r"Load package [\d.]+ is LOADED and contains no failed jobs", saved[3])

    for section, inner in (("frozen table", FROZEN_TABLE), ("frozen column", FROZEN_COLUMN)):
        lines = out[section]
        assert re.fullmatch(r"PipelineStepFailed: Pipeline execution failed at stage extract when processing "
                            r"package [\d.]+ with exception:", lines[0]), lines
        assert lines[1:] == ["", DLT_CLASS, inner]
    assert out["end"] == []


def test_installed_package_lists_itself_and_explains_what_it_cannot_do(venv_python: Path, tmp_path: Path,
                                                                        package_server: ServerProcess) -> None:
    project = package_server.project
    cli("package", str(project.parent), "--server", package_server.url, "--out", str(tmp_path / "pkg"), "--version", "1.0.0")
    wheel = build_wheel(tmp_path / "pkg", tmp_path / "dist")
    env = clean_env(tmp_path, DLT_EXAMPLE_PROJECT_URL="grpc://127.0.0.1:1")  # the override wins over the baked address
    run([venv_python, "-m", "pip", "install", "-q", "--force-reinstall", "--no-deps", wheel], env=env)
    (tmp_path / "extras.py").write_text(EXTRAS)
    lines = run([venv_python, "extras.py"], env=env, cwd=tmp_path).stdout.splitlines()
    assert lines[0] == "['dlt_example_project 1.0.0: GitHub events shared with analysts over Arrow Flight']"
    assert lines[1] == "access"
    assert lines[2] == f"Project dlt_example_project (package dlt_example_project) for profile access at {package_server.url}"
    assert lines[4:6] == ["  github_events_dataset@lake (duckdb), read-write, contract: freeze",
                          "  reports_dataset@warehouse (duckdb), read-write, contract: "
                          "{'tables': 'evolve', 'columns': 'freeze', 'data_type': 'freeze'}"]
    venv = venv_python.parent.parent
    assert lines[6].startswith(str(venv)) and lines[6].endswith("/site-packages/dlt_example_project")
    assert lines[7].startswith(str(venv)) and lines[7].endswith("/site-packages/client/__init__.py")
    assert lines[8].startswith("UnsupportedError: dlt_example_project.entities() needs the project itself")
    assert lines[9].startswith("UnsupportedError: dlt_example_project.runner() needs the project itself")
    assert lines[10].startswith("ServerUnavailableError: ") and "127.0.0.1:1" in lines[10]
