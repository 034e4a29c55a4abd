"""dlt+ project files served as they are: one idiom per file (`check` accepts each and says what it does not
use), and a project in dlt+'s format over data loaded by ordinary dlt pipelines, served and read back."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path
from typing import Any

import dlt
import pyarrow as pa
import pytest

from client import connect
from flight_server.domain.config import ConfigError, check_project, load_project
from flight_server.testing.servers import ServerProcess, cli, wait_until


def project_file(folder: Path, text: str, files: dict[str, str] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, body in (files or {}).items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(textwrap.dedent(body))
    path = folder / "dlt.yml"
    path.write_text(textwrap.dedent(text))
    return path


def load_events(database: Path | Any, dataset: str, pipelines_dir: Path) -> None:
    """What a data engineer's own pipeline does: nested records (a child table) into a duckdb file (or into
    the dlt destination given)."""
    if isinstance(database, Path):
        database.parent.mkdir(parents=True, exist_ok=True)
        database = dlt.destinations.duckdb(str(database))
    pipeline = dlt.pipeline("owner", destination=database, dataset_name=dataset, pipelines_dir=str(pipelines_dir))
    rows = [{"id": i, "name": f"e{i}", "tags": [{"t": "a"}, {"t": "b"}]} for i in range(5)]
    pipeline.run(rows, table_name="events", primary_key="id", write_disposition="merge").raise_on_failed_jobs()


def as_owner(monkeypatch: pytest.MonkeyPatch, root: Path, profile: str = "dev") -> Path:
    """The run context of the owner's pipelines in a dlt+ project run with ``profile``: the project folder as
    the working directory and dlt's ``local_dir`` at ``<project>/_data/<profile>/local``, where dlt+ puts it
    (``DLT_LOCAL_DIR`` is dlt's own setting of it). dlt then resolves relative paths itself."""
    local_dir = root / "_data" / profile / "local"
    local_dir.mkdir(parents=True, exist_ok=True)  # as the run context does when it is plugged in
    monkeypatch.chdir(root)
    monkeypatch.setenv("DLT_LOCAL_DIR", str(local_dir))
    return local_dir


def test_the_project_name_defaults_to_the_folder_and_local_paths_resolve_like_dlt_plus(tmp_path: Path) -> None:
    """No `project` section; duckdb `credentials` as a path: relative to the owner's local_dir, <project>/_data/dev/local."""
    path = project_file(tmp_path / "my-project", """
        destinations:
          warehouse:
            type: duckdb
            credentials: wh.duckdb
        datasets:
          reports: {destination: [warehouse]}
    """)
    project = load_project(path)
    assert project.name == "my_project"
    assert project.destinations["warehouse"].location == str(tmp_path / "my-project" / "_data" / "dev" / "local" / "wh.duckdb")
    # every profile sees every dataset, as dlt+'s catalog does; access, tests and dev exist undeclared
    assert set(project.profiles) == {"access", "tests", "dev"}
    assert project.profile("access").datasets["reports"].contract is None


@pytest.mark.parametrize("credentials, expected", [
    ("{database: '{project_dir}/files/wh.duckdb'}", "files/wh.duckdb"),
    ("'{data_dir}/wh.duckdb'", "_data/dev/wh.duckdb"),
    ("'{local_dir}/x/{name}.duckdb'", "_data/dev/local/x/proj.duckdb"),
])
def test_placeholders_and_the_credentials_mapping(tmp_path: Path, credentials: str, expected: str) -> None:
    path = project_file(tmp_path / "proj", f"""
        destinations:
          warehouse: {{type: duckdb, credentials: {credentials}}}
        datasets:
          reports: {{destination: [warehouse]}}
    """)
    assert load_project(path).destinations["warehouse"].location == str(tmp_path / "proj" / expected)


@pytest.mark.parametrize("extra, files, expected", [
    ("", {}, "_data/dev/local/wh.duckdb"),  # the owner's default profile, dev
    ("profiles: {dev: {destinations: {warehouse: {credentials: mine.duckdb}}}}", {}, "_data/dev/local/mine.duckdb"),
    ("project: {default_profile: prod}\nprofiles: {prod: {destinations: {warehouse: {credentials: p.duckdb}}}}", {},
     "_data/prod/local/p.duckdb"),
    ("", {".dlt/profile-name": "staging\n"}, "_data/staging/local/wh.duckdb"),  # dlt's pinned profile
    # a location the access profile sets itself is read as dlt+ reads it for that profile
    ("profiles: {access: {destinations: {warehouse: {credentials: ro.duckdb}}}}", {}, "_data/access/local/ro.duckdb"),
    ("profiles: {access: {destinations: {warehouse: {credentials: {database: ro.duckdb, read_only: true}}}}}", {},
     "_data/access/local/ro.duckdb"),
    # access changes only a connection setting: the database stays the owner's
    ("profiles: {access: {destinations: {warehouse: {credentials: {read_only: true}}}}}", {}, "_data/dev/local/wh.duckdb"),
])
def test_relative_locations_resolve_where_the_owners_profile_writes(tmp_path: Path, extra: str, files: dict[str, str],
                                                                    expected: str) -> None:
    """A relative duckdb database resolves in the run context of the profile its value comes from: the
    owner's (pinned, else `project.default_profile`, else dev) unless the access profile sets it itself."""
    path = project_file(tmp_path / "p", textwrap.dedent("""
        destinations:
          warehouse: {type: duckdb, credentials: wh.duckdb}
        datasets:
          reports: {destination: [warehouse]}
    """) + extra + "\n", files)
    assert load_project(path).destinations["warehouse"].location == str(tmp_path / "p" / expected)


@pytest.mark.parametrize("bucket_url, expected", [
    ("lake", "{p}/_data/dev/local/lake"), ("./a/../lake", "{p}/_data/dev/local/lake"),
    ("file:lake", "{p}/_data/dev/local/lake"), ("{project_dir}/lake", "{p}/lake"), ("/srv/lake", "/srv/lake"),
    ("file:///srv/lake", "file:///srv/lake"), ("s3://bucket/lake", "s3://bucket/lake"),
])
def test_a_relative_bucket_url_resolves_under_the_owners_local_dir(tmp_path: Path, bucket_url: str, expected: str) -> None:
    path = project_file(tmp_path / "p", f"""
        destinations:
          lake: {{type: delta, bucket_url: '{bucket_url}'}}
        datasets:
          events: {{destination: [lake]}}
    """)
    assert load_project(path).destinations["lake"].location == expected.format(p=tmp_path / "p")


def test_credentials_from_the_settings_files_resolve_where_dlt_put_them(tmp_path: Path) -> None:
    """The database named only in `.dlt/secrets.toml`, relative: the owner's own dlt pipeline (run in the
    project folder, dev's local_dir) reads it there and writes it where the server then finds it."""
    import subprocess
    import sys

    root = tmp_path / "p"
    path = project_file(root, """
        destinations:
          warehouse: {type: duckdb}
        datasets:
          events_data: {destination: [warehouse]}
    """, files={".dlt/secrets.toml": """
        [destination.warehouse]
        credentials = "from_secrets.duckdb"
    """})
    local_dir = root / "_data" / "dev" / "local"
    local_dir.mkdir(parents=True)
    owner = textwrap.dedent(f"""
        import dlt
        pipeline = dlt.pipeline("owner", destination=dlt.destinations.duckdb(destination_name="warehouse"),
                                dataset_name="events_data", pipelines_dir={str(tmp_path / "pipelines")!r})
        pipeline.run([{{"id": 1}}], table_name="events").raise_on_failed_jobs()
    """)
    subprocess.run([sys.executable, "-c", owner], cwd=root, check=True,
                   env={**os.environ, "DLT_LOCAL_DIR": str(local_dir)})
    assert (local_dir / "from_secrets.duckdb").is_file()
    assert load_project(path).destinations["warehouse"].location == str(local_dir / "from_secrets.duckdb")


def test_a_destination_named_by_its_type_and_a_dataset_named_by_a_pipeline(tmp_path: Path) -> None:
    path = project_file(tmp_path / "p", """
        destinations:
          duckdb: {}
        pipelines:
          events_pipeline: {source: events, destination: duckdb, dataset_name: events_data}
        sources:
          events: {type: sources.events.source}
    """)
    project = load_project(path)
    assert project.destinations["duckdb"].type == "duckdb"
    assert project.destinations["duckdb"].location == str(tmp_path / "p" / "_data" / "dev" / "local" / "duckdb.duckdb")
    assert project.datasets["events_data"].destinations == ("duckdb",)
    assert any("sources" in w and "not used by flight-share" in w for w in project.warnings)


def test_profiles_override_destinations_and_contracts(tmp_path: Path) -> None:
    path = project_file(tmp_path / "p", """
        destinations:
          warehouse: {type: duckdb, credentials: dev.duckdb}
        datasets:
          reports: {destination: [warehouse], contract: {tables: evolve, columns: freeze}}
          events: {destination: [warehouse], contract: freeze}
        profiles:
          access:
            destinations:
              warehouse: {credentials: '{project_dir}/prod.duckdb'}
            datasets:
              reports: {contract: {columns: evolve}}
          analysts:
            datasets:
              events: {write: false}
    """)
    project = load_project(path)
    assert project.destinations["warehouse"].location == str(tmp_path / "p" / "prod.duckdb")
    access = project.profile("access").datasets
    assert access["reports"].contract == {"tables": "evolve", "columns": "evolve"}
    assert access["events"].contract == "freeze" and access["events"].write
    analysts = project.profile("analysts").datasets
    assert analysts["reports"].contract == {"tables": "evolve", "columns": "freeze"}
    assert analysts["events"].contract == "freeze" and not analysts["events"].write
    assert set(project.profiles) == {"access", "analysts", "tests", "dev"}


def test_settings_files_fill_in_what_the_project_file_leaves_out(tmp_path: Path) -> None:
    """`.dlt/access.secrets.toml` over `.dlt/secrets.toml`, as dlt+ layers them; their values are masked."""
    path = project_file(tmp_path / "p", """
        destinations:
          warehouse: {type: postgres}
          lake: {type: duckdb}
        datasets:
          reports: {destination: [warehouse]}
          raw: {destination: [lake]}
    """, files={
        ".dlt/secrets.toml": """
            [destination.warehouse]
            credentials = "postgresql://loader:general-secret-77@db:5432/dlt_data"
            [destination.lake]
            credentials = "general.duckdb"
        """,
        ".dlt/access.secrets.toml": """
            [destination.warehouse]
            credentials = "postgresql://reader:access-secret-88@db:5432/dlt_data"
        """,
    })
    project = load_project(path)
    assert project.destinations["warehouse"].credentials == "postgresql://reader:access-secret-88@db:5432/dlt_data"
    assert project.destinations["lake"].location.endswith("/_data/dev/local/general.duckdb")
    assert "postgresql://reader:access-secret-88@db:5432/dlt_data" in project.secrets


def test_check_reports_what_it_cannot_serve_and_warns_about_what_it_does_not_use(tmp_path: Path) -> None:
    path = project_file(tmp_path / "p", """
        project: {name: p, colour: red}
        destinations:
          ice: {type: iceberg, bucket_url: s3://b/ice}
          wh: {type: duckdb, credentials: '{nowhere}/wh.duckdb', create_indexes: true}
          plain: {type: filesystem, bucket_url: files}
        datasets:
          reports: {destination: [wh]}
        runtime: {log_level: INFO}
        surprise: {}
    """)
    _, problems = check_project(path)
    text = [str(p) for p in problems]
    assert any("destinations.ice.type" in t and "'iceberg' is not supported" in t for t in text), text
    assert any("destinations.wh" in t and "unknown placeholder '{nowhere}'" in t for t in text), text
    special = project_file(tmp_path / "q", """
        destinations:
          wh: {type: duckdb, credentials: ':pipeline:'}
        datasets:
          reports: {destination: [wh]}
    """)
    assert [p.key for p in check_project(special)[1]] == ["destinations.wh.credentials"]
    assert not any("destinations.plain" in t for t in text), text  # dlt's plain layout is served (read-only)
    result = cli("check", "--project", str(path), check=False)
    assert result.returncode == 1
    fixed = "".join(line for line in path.read_text().splitlines(keepends=True) if "iceberg" not in line)
    fixed = fixed.replace("{nowhere}", "{project_dir}")
    path.write_text(fixed)
    result = cli("check", "--project", str(path), check=False)
    assert result.returncode == 0, result.stdout
    warnings = [line for line in result.stdout.splitlines() if line.startswith("warning: ")]
    for key in ("project.colour", "destinations.wh.create_indexes", "runtime", "surprise"):
        assert any(f"at '{key}'" in w for w in warnings), (key, warnings)


def test_an_unset_variable_is_a_problem_not_an_empty_string(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FS_TEST_UNSET", raising=False)
    path = project_file(tmp_path / "p", """
        destinations:
          wh: {type: postgres, credentials: 'postgresql://u:{env.FS_TEST_UNSET}@h/db'}
        datasets:
          reports: {destination: [wh]}
    """)
    with pytest.raises(ConfigError, match="environment variable 'FS_TEST_UNSET' is not set"):
        load_project(path)


def test_a_dlt_plus_project_over_an_owners_pipeline_is_served_unchanged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression: relative duckdb `credentials` resolved under the access profile's folder
    (<project>/_data/access/local), while the owner's pipeline, run with the default profile, wrote under
    <project>/_data/dev/local: the dataset showed no tables, without a word. The owner loads here exactly as
    dlt does with the relative path from dlt.yml, in the dev profile's run context."""
    root = tmp_path / "shop"
    path = project_file(root, """
        project: {name: shop}
        destinations:
          warehouse: {type: duckdb, credentials: warehouse.duckdb}
        pipelines:
          events_pipeline: {source: events, destination: warehouse, dataset_name: events_data}
        profiles:
          access:
            datasets:
              events_data: {contract: freeze}
        server:
          anonymous_profile: access
    """)
    local_dir = as_owner(monkeypatch, root)
    load_events(dlt.destinations.duckdb("warehouse.duckdb", destination_name="warehouse"), "events_data",
                tmp_path / "pipelines")
    database = local_dir / "warehouse.duckdb"
    assert database.is_file()  # where dlt itself put it
    monkeypatch.delenv("DLT_LOCAL_DIR")
    assert load_project(path).destinations["warehouse"].location == str(database)
    assert cli("check", "--project", str(path)).returncode == 0
    owner = dlt.dataset(dlt.destinations.duckdb(str(database)), "events_data")
    # what dlt itself reads, to compare with what the server serves
    expected = {t: owner[t].arrow().sort_by("_dlt_id").to_pylist() for t in ("events", "events__tags")}
    with ServerProcess(path) as server, connect(server.url) as catalog:
        assert catalog.project == "shop" and catalog.datasets == ["events_data"]
        dataset = catalog.events_data
        assert sorted(dataset.tables) == ["events", "events__tags"]
        for table in ("events", "events__tags"):
            assert dataset[table].arrow().sort_by("_dlt_id").to_pylist() == expected[table]


def test_check_and_the_server_warn_about_a_dataset_whose_location_holds_no_dlt_data(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression: a dataset whose path holds nothing dlt wrote (a wrong or never-loaded path, a misspelt
    dataset) was served empty without a word. `check` and the server's start warn, naming the dataset and
    the resolved location (a path from the secrets file as ***); datasets with data get no warning."""
    root = tmp_path / "shop"
    path = project_file(root, """
        destinations:
          warehouse: {type: duckdb, credentials: warehouse.duckdb}
          lake: {type: filesystem, bucket_url: lake}
          hidden: {type: duckdb}
        datasets:
          shop_data: {destination: [warehouse]}
          reports: {destination: [warehouse]}
          events_data: {destination: [lake]}
          events: {destination: [lake]}
          secret_place: {destination: [hidden]}
        server: {anonymous_profile: access}
    """, files={".dlt/secrets.toml": """
        [destination.hidden]
        credentials = "hidden-7f3a.duckdb"
    """})
    local_dir = as_owner(monkeypatch, root)
    load_events(dlt.destinations.duckdb("warehouse.duckdb", destination_name="warehouse"), "shop_data",
                tmp_path / "pipelines")
    load_events(dlt.destinations.filesystem("lake", destination_name="lake"), "events_data", tmp_path / "pipelines2")
    monkeypatch.delenv("DLT_LOCAL_DIR")

    result = cli("check", "--project", str(path))
    assert result.returncode == 0 and result.stdout.splitlines()[-1].endswith("5 dataset(s), 3 profile(s)")
    warnings = {line.split(" at 'datasets.", 1)[1].split("'", 1)[0]: line
                for line in result.stdout.splitlines() if line.startswith("warning: ") and " at 'datasets." in line}
    assert sorted(warnings) == ["events", "reports", "secret_place"], result.stdout
    assert f"holds no dlt data at {local_dir / 'warehouse.duckdb'}: no schema 'reports' in it (dlt datasets there: shop_data)" in warnings["reports"]
    assert f"holds no dlt data at {local_dir / 'lake'}: no folder 'events' in it (dlt datasets there: events_data)" in warnings["events"]
    assert f"holds no dlt data at {local_dir}/***: the file does not exist" in warnings["secret_place"]
    assert "7f3a" not in result.stdout + result.stderr

    with ServerProcess(path) as server, connect(server.url) as catalog:
        log = server.output()
        for dataset in ("reports", "events", "secret_place"):
            assert f"dataset '{dataset}' (destination" in log and "holds no dlt data" in log, log
        assert "dataset 'shop_data'" not in log and "dataset 'events_data'" not in log and "7f3a" not in log
        assert catalog.shop_data.events.arrow().num_rows == 5  # a warning, never a failure
    assert not (local_dir / "hidden-7f3a.duckdb").exists()  # looking created nothing


def test_a_sqlite_dataset_through_dlts_sqlalchemy_destination_reads_and_saves(tmp_path: Path) -> None:
    """Any SQL destination dlt reaches, through the generic adapter: here dlt's sqlalchemy destination on
    SQLite, loaded by the owner's pipeline (nested rows, a merge over two loads)."""
    import pandas as pd

    root = tmp_path / "lite"
    database = root / "shop.db"
    root.mkdir()
    url = f"sqlite:///{database}"
    pipeline = dlt.pipeline("owner", destination=dlt.destinations.sqlalchemy(url), dataset_name="shop_data",
                            pipelines_dir=str(tmp_path / "pipelines"))
    for version in (1, 2):
        rows = [{"id": i, "name": f"e{i}-v{version}", "tags": [{"t": "a"}]} for i in range(version * 3)]
        pipeline.run(rows, table_name="events", primary_key="id", write_disposition="merge").raise_on_failed_jobs()
    owner = dlt.dataset(dlt.destinations.sqlalchemy(url), "shop_data", schema="owner")
    expected = {t: sorted(owner[t].arrow().to_pylist(), key=lambda r: r["_dlt_id"]) for t in ("events", "events__tags")}
    assert len(expected["events"]) == 6

    path = project_file(root, """
        destinations:
          lite: {type: sqlalchemy, credentials: 'sqlite:///{project_dir}/shop.db'}
        datasets:
          shop_data: {destination: [lite], contract: {tables: evolve, columns: freeze}}
        server: {anonymous_profile: access}
    """)
    with ServerProcess(path) as server, connect(server.url) as catalog:
        dataset = catalog.shop_data
        assert sorted(dataset.tables) == ["events", "events__tags"]
        for table, rows in expected.items():
            assert sorted(dataset[table].arrow().to_pylist(), key=lambda r: r["_dlt_id"]) == rows
        assert dataset.row_counts() == {"events": 6, "events__tags": 6}
        assert "LOADED" in str(dataset.save(pd.DataFrame({"n": [1, 2]}), table_name="report"))
        assert sorted(catalog.shop_data.report.arrow().column("n").to_pylist()) == [1, 2]
        assert catalog.shop_data.sql("SELECT count(*) AS n FROM events").arrow().to_pylist() == [{"n": 6}]
    # the owner's pipeline still loads into its database afterwards
    pipeline.run([{"id": 99, "name": "later", "tags": []}], table_name="events", primary_key="id",
                 write_disposition="merge").raise_on_failed_jobs()
    assert len(dlt.dataset(dlt.destinations.sqlalchemy(url), "shop_data", schema="owner").events.arrow()) == 7


@pytest.fixture(scope="session")
def duckdb2_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A duckdb file as today's `pip install "dlt[duckdb]"` writes it (duckdb 2: storage version 69)."""
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("duckdb2")
    uv = Path(sys.executable).with_name("uv")
    env = {**os.environ, "VIRTUAL_ENV": str(root / "venv")}
    subprocess.run([str(uv), "venv", "-q", str(root / "venv"), "--python", sys.executable], check=True, env=env)
    subprocess.run([str(uv), "pip", "install", "-q", "duckdb==2.0.1"], check=True, env=env)
    path = root / "new.duckdb"
    code = f"import duckdb; c = duckdb.connect({str(path)!r}); c.sql('CREATE SCHEMA ds; CREATE TABLE ds.t AS SELECT 1 AS a')"
    subprocess.run([str(root / "venv" / "bin" / "python"), "-c", code], check=True)
    return path


def test_one_broken_dataset_never_takes_the_catalog_down(tmp_path: Path, duckdb2_file: Path) -> None:
    from client import ServerUnavailableError

    root = tmp_path / "p"
    (root / "broken.duckdb").parent.mkdir(parents=True)
    (root / "broken.duckdb").write_bytes(b"not a duckdb file" * 1000)
    path = project_file(root, f"""
        destinations:
          good: {{type: duckdb, credentials: '{{project_dir}}/good.duckdb'}}
          broken: {{type: duckdb, credentials: '{{project_dir}}/broken.duckdb'}}
          newer: {{type: duckdb, credentials: '{duckdb2_file}'}}
        datasets:
          healthy: {{destination: [good]}}
          damaged: {{destination: [broken]}}
          events: {{destination: [newer]}}
        server: {{anonymous_profile: access}}
    """)
    load_events(root / "good.duckdb", "healthy", tmp_path / "pipelines")
    with ServerProcess(path) as server, connect(server.url) as catalog:
        assert catalog.datasets == ["healthy", "damaged", "events"]
        listing = str(catalog)
        assert "healthy@good" in listing and "damaged@broken" in listing
        assert catalog.healthy.events.arrow().num_rows == 5
        with pytest.raises(ServerUnavailableError) as err:
            catalog.events.tables
        text = str(err.value)
        assert "newer duckdb" in text and "storage version 69" in text and "64" in text and "68" in text, text
        with pytest.raises(ServerUnavailableError) as err:
            catalog["damaged"]
        # named by its destination, never by where it lives (issue 22 §1)
        assert "destination 'broken'" in str(err.value) and "internal" not in str(err.value).lower()
        assert str(root) not in str(err.value)
        assert catalog.healthy.events.arrow().num_rows == 5  # still healthy after the failures
        # Flight SQL browsing (BI tools, get_objects) lists the healthy datasets' tables too
        import adbc_driver_flightsql.dbapi as flight_sql

        with flight_sql.connect(server.url, autocommit=True) as conn:
            objects = conn.adbc_get_objects(depth="tables").read_all().to_pylist()
            tables = {(s["db_schema_name"], t["table_name"]) for c in objects for s in c["catalog_db_schemas"]
                      for t in (s["db_schema_tables"] or [])}
            assert ("healthy", "events") in tables and {schema for schema, _ in tables} == {"healthy"}
        assert server.alive


def test_the_owners_pipeline_keeps_loading_while_the_server_serves(tmp_path: Path) -> None:
    """Regression: after one request the server held the duckdb file, and the owner's own pipeline.run()
    and dlt.dataset() failed ("Could not set lock on file"). The file is held only during requests; a
    read that meets the owner's load waits for it; new loads show up within seconds."""
    import threading
    import time

    root = tmp_path / "shop"
    path = project_file(root, """
        destinations:
          warehouse: {type: duckdb, credentials: '{project_dir}/shop.duckdb'}
        datasets:
          events_data: {destination: [warehouse]}
        server: {anonymous_profile: access}
    """)
    database = root / "shop.duckdb"
    load_events(database, "events_data", tmp_path / "pipelines")
    owner = dlt.pipeline("owner", destination=dlt.destinations.duckdb(str(database)), dataset_name="events_data",
                         pipelines_dir=str(tmp_path / "pipelines"))
    with ServerProcess(path) as server, connect(server.url) as catalog:
        assert catalog.events_data.events.arrow().num_rows == 5
        # between requests the file is free: the owner loads and reads with dlt as before
        rows = [{"id": i, "name": f"n{i}", "tags": []} for i in range(5, 8)]
        owner.run(rows, table_name="events", primary_key="id", write_disposition="merge").raise_on_failed_jobs()
        assert len(dlt.dataset(dlt.destinations.duckdb(str(database)), "events_data").events.arrow()) == 8
        # the owner's new load, seen by the server within seconds (polled with a bound, not slept)
        wait_until(lambda: catalog.events_data.events.arrow().num_rows == 8, "the owner's load served", every=0.2)

        # reads while the owner's load holds the file wait for it; none fails
        errors: list[BaseException] = []
        counts: list[int] = []
        done = threading.Event()

        def read_loop() -> None:
            with connect(server.url) as reader:
                while not done.is_set():
                    try:
                        counts.append(reader.events_data.events.arrow().num_rows)
                    except BaseException as exc:  # noqa: BLE001 - collected for the assertion
                        errors.append(exc)

        thread = threading.Thread(target=read_loop)
        thread.start()
        try:
            big = [{"id": i, "name": "x" * 50, "tags": [{"t": "z"}]} for i in range(100, 20_100)]
            for _ in range(3):
                for _attempt in range(50):  # the owner's pipeline meets a read now and then: dlt fails fast, it retries
                    try:
                        owner.run(big, table_name="events", primary_key="id", write_disposition="merge").raise_on_failed_jobs()
                        break
                    except Exception as exc:  # noqa: BLE001
                        assert "lock" in str(exc).lower(), exc
                        owner.drop_pending_packages()
                        time.sleep(0.2)
                else:
                    raise AssertionError("the owner's pipeline never got the file")
        finally:
            done.set()
            thread.join(60)
        assert errors == [] and counts and set(counts) <= {8, 20_008}
        assert server.alive


@pytest.mark.parametrize("file_format", ["parquet", "jsonl", "csv"])
def test_dlts_plain_filesystem_layout_is_served_read_only(tmp_path: Path, file_format: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A filesystem destination in dlt's default layout (parquet, jsonl or csv files per table, no table
    format): served the way dlt reads it - every table equal to dlt's own read, SQL and the load history -
    and read-only, since dlt writes such files one by one (no all-or-nothing save is possible).
    Regression: the relative `bucket_url` resolved against the project folder; dlt puts it under its
    local_dir (the owner's <project>/_data/dev/local), where the owner's pipeline wrote it."""
    from client import UnsupportedError

    root = tmp_path / "lake-project"
    path = project_file(root, """
        destinations:
          files: {type: filesystem, bucket_url: lake}
        pipelines:
          events_pipeline: {source: events, destination: files, dataset_name: events_data}
        server: {anonymous_profile: access}
    """)
    lake = as_owner(monkeypatch, root) / "lake"
    pipeline = dlt.pipeline(f"owner_{file_format}", destination=dlt.destinations.filesystem("lake", destination_name="files"),
                            dataset_name="events_data", pipelines_dir=str(tmp_path / "pipelines"))
    for batch in ([{"id": i, "name": f"e{i}", "tags": [{"t": "a"}, {"t": "b"}]} for i in range(5)],
                  [{"id": 9, "name": "x", "tags": []}]):
        pipeline.run(batch, table_name="events", loader_file_format=file_format).raise_on_failed_jobs()
    monkeypatch.delenv("DLT_LOCAL_DIR")
    assert (lake / "events_data" / "_dlt_version").is_dir()  # where dlt itself put it
    assert load_project(path).destinations["files"].location == str(lake)
    owner = dlt.dataset(dlt.destinations.filesystem(str(lake)), "events_data")
    expected = {t: sorted(owner[t].arrow().to_pylist(), key=lambda r: r["_dlt_id"]) for t in ("events", "events__tags")}
    assert cli("check", "--project", str(path), check=False).returncode == 0
    with ServerProcess(path) as server, connect(server.url) as catalog:
        dataset = catalog.events_data
        assert sorted(dataset.tables) == ["events", "events__tags"] and not dataset.info.writable
        for table, rows in expected.items():
            assert sorted(dataset[table].arrow().to_pylist(), key=lambda r: r["_dlt_id"]) == rows
        assert dataset.sql("SELECT count(*) AS n FROM events__tags").arrow().column("n")[0].as_py() == 10
        assert dataset.loads().arrow().num_rows == 2
        with pytest.raises(UnsupportedError, match="served read-only"):
            dataset.save(pa.table({"id": [10]}), table_name="events")
    assert sorted(owner.events.arrow().column("id").to_pylist()) == [0, 1, 2, 3, 4, 9]  # the owner's files as they were
