"""Every ``flight-share`` command through its real entry point (a subprocess), against real servers."""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from client import connect
from flight_server.cli import main
from flight_server.testing.servers import REPO, ServerProcess, cli, make_project
from tests.test_write_path import FROZEN_COLUMN, FROZEN_TABLE

COMMANDS = ("catalog", "show", "head", "row-counts", "sql", "save", "serve", "demo", "check", "package")
AGGREGATE = "SELECT payload__action, count(*) AS n FROM issues_event GROUP BY 1 ORDER BY 1"


def fs(server: ServerProcess, *args: str, check: bool = False) -> subprocess.CompletedProcess:
    """``flight-share ARGS`` with the server's address in FLIGHT_SHARE_URL."""
    return cli(*args, env={"FLIGHT_SHARE_URL": server.url}, check=check, timeout=120)


def assert_one_line_error(result: subprocess.CompletedProcess, code: int, *words: str) -> None:
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    for word in words:
        assert word in lines[0]


@pytest.fixture(scope="module")
def write_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server for saves: the demo's two datasets and contracts, plus open_dataset without a contract."""
    project = make_project(tmp_path_factory.mktemp("cli-write"), REPO / "tests" / "write_project.yml", events=300)
    with ServerProcess(project) as proc:
        yield proc


def test_help_lists_every_command_by_section_and_each_has_help() -> None:
    top = cli("--help").stdout
    assert top.startswith("Usage: flight-share [OPTIONS] COMMAND [ARGS]...")
    data, server = top.index("Read and write data"), top.index("Serve a project")
    for name in COMMANDS:
        assert f"\n  {name} " in top
        where = top.index(f"\n  {name} ")
        assert (data < where < server) == (name in COMMANDS[:6])
        # each command's own help in-process (the same click objects; a subprocess each costs a second)
        result = CliRunner().invoke(main, [name, "--help"], prog_name="flight-share")
        assert result.exit_code == 0 and result.output.startswith(f"Usage: flight-share {name} "), result.output
    assert "Exit codes:" in top


def test_client_commands_do_not_import_dlt_or_duckdb() -> None:
    code = "import sys, flight_server.cli; print(sorted(m for m in ('dlt', 'duckdb') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    # the client-side commands live with the client: nothing of the server is imported for them
    code = ("import sys, client.cli.data; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('flight_server', 'dlt', 'duckdb', 'yaml')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_catalog_prints_the_seed_listing(server: ServerProcess, demo_project: Path) -> None:
    result = fs(server, "catalog", check=True)
    data = demo_project.parent / "_data"
    assert result.stdout.splitlines() == [
        "Datasets in project dlt_example_project for profile access:",
        f"github_events_dataset@lake[duckdb:///{str(data / 'lake.duckdb').lstrip('/')}]",
        f"reports_dataset@warehouse[duckdb:///{str(data / 'warehouse.duckdb').lstrip('/')}]",
    ]
    assert result.stderr == ""
    # --url wins over the environment
    assert cli("catalog", "--url", server.url, env={"FLIGHT_SHARE_URL": "grpc://127.0.0.1:1"}).returncode == 0


def test_show_dataset_and_table(server: ServerProcess) -> None:
    with connect(server.url) as catalog:
        ds = catalog.github_events_dataset
        counts = ds.row_counts()
        schema = ds.issues_event.schema
    lines = fs(server, "show", "github_events_dataset", check=True).stdout.splitlines()
    assert lines[0].startswith("Dataset github_events_dataset tables in logical schema events@v")
    assert lines[1].startswith("lake (duckdb) duckdb:///") and lines[1].endswith("read-write for profile access")
    assert lines[3].split() == ["table_name", "columns", "row_count"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[5:-1]}
    assert list(rows) == list(counts)
    assert rows["issues_event"] == [str(len(schema)), str(counts["issues_event"])]
    assert lines[-1] == f"({len(counts)} rows)"

    lines = fs(server, "show", "github_events_dataset", "issues_event", check=True).stdout.splitlines()
    assert lines[0] == f"Table github_events_dataset.issues_event: {len(schema)} columns, {counts['issues_event']} rows"
    assert lines[2].split() == ["column", "type", "nullable"]
    assert [line.split()[0] for line in lines[4:-1]] == schema.names
    assert re.search(r"\ncreated_at +timestamp\[us, tz=UTC\] +True\n", "\n".join(lines))


def test_head_limit_columns_and_formats(server: ServerProcess) -> None:
    with connect(server.url) as catalog:
        expected = catalog.github_events_dataset.issues_event.select("id", "payload__action").limit(3).arrow()
    lines = fs(server, "head", "github_events_dataset", "issues_event", "-n", "3", "-c", "id,payload__action",
               check=True).stdout.splitlines()
    assert lines[0].split() == ["id", "payload__action"]
    assert [line.split() for line in lines[2:5]] == [[r["id"], r["payload__action"]] for r in expected.to_pylist()]
    assert lines[-1] == "(3 rows)"
    csv = fs(server, "head", "github_events_dataset", "issues_event", "--limit", "3", "--columns", "id",
             "--columns", "payload__action", "--format", "csv", check=True).stdout
    assert csv.splitlines() == ['"id","payload__action"'] + [f'"{r["id"]}","{r["payload__action"]}"' for r in expected.to_pylist()]
    default = fs(server, "head", "github_events_dataset", "push_event", check=True).stdout.splitlines()
    assert default[-1] == "(10 rows)"


def test_row_counts(server: ServerProcess) -> None:
    with connect(server.url) as catalog:
        counts = catalog.github_events_dataset.row_counts()
    lines = fs(server, "row-counts", "github_events_dataset", check=True).stdout.splitlines()
    assert lines[0].split() == ["table_name", "row_count"]
    assert {line.split()[0]: int(line.split()[1]) for line in lines[2:-1]} == counts


def test_sql_as_table_csv_json_and_parquet(server: ServerProcess, tmp_path: Path) -> None:
    with connect(server.url) as catalog:
        expected = catalog.github_events_dataset.sql(AGGREGATE).arrow()
    pairs = [(r["payload__action"], r["n"]) for r in expected.to_pylist()]

    lines = fs(server, "sql", "github_events_dataset", AGGREGATE, check=True).stdout.splitlines()
    assert lines[0].split() == ["payload__action", "n"]
    assert [tuple(line.split()) for line in lines[2:-1]] == [(a, str(n)) for a, n in pairs]

    csv = fs(server, "sql", "github_events_dataset", AGGREGATE, "--format", "csv", check=True).stdout
    assert csv.splitlines() == ['"payload__action","n"'] + [f'"{a}",{n}' for a, n in pairs]

    jsonl = fs(server, "sql", "github_events_dataset", AGGREGATE, "-f", "json", check=True).stdout
    assert [json.loads(line) for line in jsonl.splitlines()] == expected.to_pylist()

    out = tmp_path / "result.parquet"
    result = fs(server, "sql", "github_events_dataset", AGGREGATE, "--output", str(out), check=True)
    assert result.stdout.strip() == f"wrote {len(pairs)} rows to {out} (parquet)"
    assert pq.read_table(out).equals(expected)

    everything = tmp_path / "push.jsonl"
    fs(server, "sql", "github_events_dataset", "SELECT * FROM push_event", "-o", str(everything), check=True)
    with connect(server.url) as catalog:
        assert len(everything.read_text().splitlines()) == catalog.github_events_dataset.push_event.row_count()

    refused = fs(server, "sql", "github_events_dataset", AGGREGATE, "--format", "parquet")
    assert refused.returncode == 1 and "parquet is binary: pass --output FILE" in refused.stderr
    unknown = fs(server, "sql", "github_events_dataset", AGGREGATE, "-o", str(tmp_path / "x.txt"))
    assert unknown.returncode == 1 and "pass --format" in unknown.stderr


def test_errors_are_one_line_with_an_exit_code(server: ServerProcess) -> None:
    assert_one_line_error(fs(server, "show", "nope"), 3, "Dataset 'nope' not found", "datasets: github_events_dataset")
    assert_one_line_error(fs(server, "head", "github_events_dataset", "nope"), 3, "Table 'nope' not found")
    assert_one_line_error(fs(server, "head", "github_events_dataset", "issues_event", "-c", "nope"), 3, "nope")
    assert_one_line_error(fs(server, "sql", "github_events_dataset", "DROP TABLE issues_event"), 1, "SELECT")
    down = cli("catalog", "--url", "grpc://127.0.0.1:1", check=False)
    assert_one_line_error(down, 5, "cannot reach the flight-share server at grpc://127.0.0.1:1")
    # TLS asked of a plain server: one line, not gRPC C-core's and absl's log lines before it (issue 22)
    mismatch = cli("catalog", "--url", server.url.replace("grpc://", "grpc+tls://"), check=False)
    assert_one_line_error(mismatch, 5, "cannot reach the flight-share server at grpc+tls://")
    usage = cli("head", "github_events_dataset", check=False)
    assert usage.returncode == 2 and "Missing argument 'TABLE'" in usage.stderr
    debug = cli("--debug", "catalog", "--url", "grpc://127.0.0.1:1", check=False)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "ServerUnavailableError" in debug.stderr


def test_save_runs_the_seed_workflow_under_the_contract(write_server: ServerProcess, tmp_path: Path) -> None:
    """Aggregate to CSV, save it to reports (ok), to events (frozen table), with an id column (frozen column)."""
    report = tmp_path / "aggregated_issues.csv"
    fs(write_server, "sql", "github_events_dataset", AGGREGATE, "-o", str(report), check=True)

    ok = fs(write_server, "save", "reports_dataset", "aggregated_issues", str(report), check=True)
    lines = ok.stdout.splitlines()
    assert lines[0].startswith("Pipeline save_aggregated_issues_pipeline load step completed in ")
    assert lines[1] == "1 load package(s) were loaded to destination warehouse and into dataset reports_dataset"
    assert lines[3].startswith("Load package ") and lines[3].endswith(" is LOADED and contains no failed jobs")
    assert ok.stderr == ""

    frozen = fs(write_server, "save", "github_events_dataset", "aggregated_issues", str(report))
    assert frozen.returncode == 4 and frozen.stdout == "" and "Traceback" not in frozen.stderr
    assert frozen.stderr.startswith("PipelineStepFailed: Pipeline execution failed at stage extract when processing package ")
    assert frozen.stderr.endswith(f" with exception:\n\n<class 'dlt.common.schema.exceptions.DataValidationError'>\n{FROZEN_TABLE}\n")

    with_id = tmp_path / "with_id.json"
    fs(write_server, "sql", "reports_dataset", "SELECT *, 1 AS id FROM aggregated_issues", "-o", str(with_id), check=True)
    column = fs(write_server, "save", "reports_dataset", "aggregated_issues", str(with_id))
    assert column.returncode == 4
    assert column.stderr.endswith(f"<class 'dlt.common.schema.exceptions.DataValidationError'>\n{FROZEN_COLUMN}\n")

    with connect(write_server.url) as catalog:
        saved = catalog.reports_dataset.aggregated_issues.arrow()
    assert saved.column_names[:2] == ["payload__action", "n"] and "id" not in saved.column_names
    assert saved.schema.field("n").type == pa.int64()


def test_save_parquet_json_array_and_merge(write_server: ServerProcess, tmp_path: Path) -> None:
    table = pa.table({"day": ["mon", "tue"], "v": pa.array([1.5, 2.5])})
    pq.write_table(table, tmp_path / "daily.parquet")
    fs(write_server, "save", "open_dataset", "daily", str(tmp_path / "daily.parquet"), check=True)
    (tmp_path / "update.json").write_text(json.dumps([{"day": "tue", "v": 20.5}, {"day": "wed", "v": 3.5}]))
    merged = fs(write_server, "save", "open_dataset", "daily", str(tmp_path / "update.json"),
                "-w", "merge", "--primary-key", "day")
    assert merged.returncode == 0, merged.stderr
    with connect(write_server.url) as catalog:
        rows = catalog.open_dataset.daily.select("day", "v").arrow().sort_by("day").to_pylist()
    assert rows == [{"day": "mon", "v": 1.5}, {"day": "tue", "v": 20.5}, {"day": "wed", "v": 3.5}]
    missing = fs(write_server, "save", "open_dataset", "daily", str(tmp_path / "nope.csv"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    nokey = fs(write_server, "save", "open_dataset", "daily", str(tmp_path / "update.json"), "-w", "merge")
    assert_one_line_error(nokey, 1, "primary_key")


def test_a_bad_value_deep_in_a_csv_stores_nothing(write_server: ServerProcess, tmp_path: Path) -> None:
    """Regression: the upload streamed the rows before the bad one and the server stored them."""
    bad = tmp_path / "bad.csv"
    bad.write_text("k,n\n" + "".join(f"a{i},{i}\n" for i in range(200_000)) + "zz,notanumber\n")
    result = fs(write_server, "save", "open_dataset", "half", str(bad))
    assert_one_line_error(result, 1, str(bad), "invalid value 'notanumber'")
    with connect(write_server.url) as catalog:
        assert "half" not in catalog.open_dataset.tables
    (tmp_path / "bad.json").write_text('[{"k": 1}, ')
    assert_one_line_error(fs(write_server, "save", "open_dataset", "half", str(tmp_path / "bad.json")), 1,
                          "not valid JSON")


def _run_on_terminal(args: list[str], env: dict[str, str]) -> tuple[int, str, str]:
    """Run the command with stderr on a pseudo-terminal; returns (exit code, stdout, what the terminal showed)."""
    main, child = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "flight_server.cli", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=child, env={**os.environ, **env})
    os.close(child)
    shown = b""
    while True:
        try:
            chunk = os.read(main, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        shown += chunk
    stdout = proc.stdout.read() if proc.stdout else b""
    proc.wait(60)
    os.close(main)
    return proc.returncode, stdout.decode(), shown.decode()


def test_progress_on_a_terminal_and_quiet_when_piped(write_server: ServerProcess, tmp_path: Path) -> None:
    n = 50_000
    pq.write_table(pa.table({"i": pa.array(range(n), pa.int64())}), tmp_path / "big.parquet")
    env = {"FLIGHT_SHARE_URL": write_server.url}
    code, stdout, shown = _run_on_terminal(["save", "reports_dataset", "big", str(tmp_path / "big.parquet")], env)
    assert code == 0 and stdout.startswith("Pipeline save_big_pipeline")
    assert f"{n:,}/{n:,} rows" in shown and "100%" in shown and "/s" in shown and "B" in shown

    code, stdout, shown = _run_on_terminal(
        ["sql", "reports_dataset", "SELECT * FROM big", "-o", str(tmp_path / "big.csv")], env)
    assert code == 0 and f"{n:,} rows" in shown and "rows/s" in shown
    assert stdout.strip() == f"wrote {n:,} rows to {tmp_path / 'big.csv'} (csv)"

    piped = cli("sql", "reports_dataset", "SELECT * FROM big", "-o", str(tmp_path / "again.csv"), env=env)
    assert piped.stderr == ""
    saved = cli("save", "reports_dataset", "big", str(tmp_path / "big.parquet"), env=env)
    assert saved.stderr == ""
    forced = cli("save", "reports_dataset", "big", str(tmp_path / "big.parquet"), "--progress", env=env)
    assert forced.stderr.count("\n") == 1 and "\r" not in forced.stderr and f"{n:,}/{n:,} rows" in forced.stderr


BROKEN = """\
format_version: 1
project: {name: p, colour: red}
destinations:
  lake: {type: oracle}
  fs: {type: filesystem}
datasets:
  ds: {destination: [lake]}
  ds2: {destination: [nowhere]}
profiles:
  access:
    datasets:
      ds: {contract: melt}
      ds2: {contract: {columns: thaw}, write: maybe}
      ghost: {}
server: {port: 99999, profile: nobody}
"""


def test_check_reports_every_problem(tmp_path: Path) -> None:
    ok = cli("check", "--project", str(REPO / "configs" / "demo"))
    assert ok.stdout.strip().endswith("dlt.yml: ok: project dlt_example_project, 2 destination(s), 2 dataset(s), 1 profile(s)")

    (tmp_path / "dlt.yml").write_text(BROKEN)
    result = cli("check", "--project", str(tmp_path / "dlt.yml"), check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    keys = [line.split(" at '", 1)[1].split("'", 1)[0] for line in result.stdout.splitlines()]
    assert keys == [
        "project.colour", "destinations.lake.type", "destinations.fs.bucket_url",
        "datasets.ds2.destination",
        "profiles.access.datasets.ds.contract", "profiles.access.datasets.ds2.write",
        "profiles.access.datasets.ds2.contract.columns", "profiles.access.datasets.ghost", "server.port",
        "server.profile",
    ]
    assert all(line.startswith(str(tmp_path / "dlt.yml")) for line in result.stdout.splitlines())
    assert result.stderr.strip() == f"10 problems in {tmp_path / 'dlt.yml'}"
    # serve still stops at the first problem
    serve = cli("serve", "--project", str(tmp_path / "dlt.yml"), "--port", "0", check=False, timeout=60)
    assert serve.returncode == 1 and serve.stderr.count("\n") == 1 and "project.colour" in serve.stderr


def test_package_writes_an_installable_package_without_secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = make_project(tmp_path / "project", events=0)
    text = source.read_text().replace("type: duckdb\n    location: _data/warehouse.duckdb",
                                      "type: postgres\n    credentials: 'postgresql://loader:{env.WH_PASSWORD}@db.internal:5432/dlt_data'")
    source.write_text(text)
    out = tmp_path / "pkg"
    result = cli("package", str(source.parent), "--name", "dlt_example_project", "--server", "grpc+tls://data.example.com:443",
                 "--out", str(out), env={"WH_PASSWORD": "s3cret"})
    assert f"wrote data package dlt_example_project 0.0.1 to {out}" in result.stdout
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == [".gitignore", "README.md", "dlt_example_project/__init__.py", "dlt_example_project/_project.py",
                     "pyproject.toml"]
    everything = "\n".join(p.read_text() for p in out.rglob("*") if p.is_file())
    for secret in ("s3cret", "loader", "db.internal", "WH_PASSWORD", "_data/", str(tmp_path)):
        assert secret not in everything
    pyproject = (out / "pyproject.toml").read_text()
    assert '[project.entry-points.dlt_package]\ndlt-project = "dlt_example_project"' in pyproject
    assert 'description = "GitHub events shared with analysts over Arrow Flight"' in pyproject
    assert '"flight-share' in pyproject and "dlt>" not in pyproject and "duckdb" not in pyproject
    init = (out / "dlt_example_project" / "__init__.py").read_text()
    for function in ("access_profile", "context", "config", "entities", "runner", "catalog"):
        assert f"def {function}(" in init
    assert "grpc+tls://data.example.com:443" in (out / "dlt_example_project" / "_project.py").read_text()

    again = cli("package", str(source.parent), "--out", str(out), check=False, env={"WH_PASSWORD": "x"})
    assert again.returncode == 2 and "not empty" in again.stderr and "--force" in again.stderr
    assert cli("package", str(source.parent), "--out", str(out), "--force", env={"WH_PASSWORD": "x"}).returncode == 0
    bad = cli("package", str(source.parent), "--name", "my-package", "--out", str(tmp_path / "x"), check=False,
              env={"WH_PASSWORD": "x"})
    assert bad.returncode == 2 and "not an importable Python name" in bad.stderr
    broken = cli("package", str(source.parent), "--out", str(tmp_path / "y"), check=False)
    assert broken.returncode == 1 and "WH_PASSWORD" in broken.stderr and "Traceback" not in broken.stderr


def test_check_masks_every_value_taken_from_the_environment(tmp_path: Path) -> None:
    """Regression: ``check`` printed substituted values of non-secret keys (a location, a URL with a
    password in it); every value read from the environment is ``***`` in its problems."""
    text = (REPO / "configs" / "demo" / "dlt.yml").read_text()
    text = text.replace("server:\n", "server:\n  locations: ['{env.REPLICA}', 'grpc://{env.HOST_ONLY}']\n", 1)
    (tmp_path / "dlt.yml").write_text(text)
    for value in ("grpc://data.example.com:8815/opensesame-7f3a", "warehouse-token-7f3a"):
        result = cli("check", "--project", str(tmp_path / "dlt.yml"), check=False,
                     env={"REPLICA": value, "HOST_ONLY": "h"})
        assert result.returncode == 1 and "server.locations[0]" in result.stdout, result.stdout
        assert value not in result.stdout + result.stderr and "7f3a" not in result.stdout + result.stderr
        assert "'***' is not a Flight location" in result.stdout


def test_check_warns_about_a_duckdb_dataset_dlt_never_loaded(tmp_path: Path) -> None:
    """Regression: a dataset in a duckdb file that holds no dlt data was served empty without a word. A
    schema dlt never wrote (no `_dlt_version`) and one with dlt's tables only are warnings, not problems."""
    import duckdb

    database = tmp_path / "data" / "lake.duckdb"
    database.parent.mkdir()
    with duckdb.connect(str(database)) as conn:
        conn.execute("CREATE SCHEMA handmade; CREATE TABLE handmade.t AS SELECT 1 AS a")
        conn.execute("CREATE SCHEMA fresh; CREATE TABLE fresh._dlt_version (version BIGINT)")
    (tmp_path / "dlt.yml").write_text("""
format_version: 1
project: {name: p}
destinations:
  lake: {type: duckdb, location: data/lake.duckdb}
datasets:
  handmade: {destination: [lake]}
  fresh: {destination: [lake]}
profiles:
  access:
    datasets: {handmade: {}, fresh: {}}
""")
    result = cli("check", "--project", str(tmp_path / "dlt.yml"))
    lines = result.stdout.splitlines()
    assert result.returncode == 0 and lines[-1].endswith("ok: project p, 1 destination(s), 2 dataset(s), 1 profile(s)")
    assert any(f"'datasets.handmade': dataset 'handmade' (destination 'lake') holds no dlt data at {database}: "
               "the schema 'handmade' has no _dlt_version (not loaded by dlt)" in line for line in lines), lines
    assert any("'datasets.fresh'" in line and "no tables loaded into 'fresh' yet" in line for line in lines), lines
