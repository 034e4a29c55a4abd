"""The generated differential matrix of issue 21 (design, data and the owner's runs: ``tests/dlt_matrix.py``).

A seeded pairwise covering design over dlt's data types, write dispositions / merge strategies, nesting, input
forms, naming conventions and destination kinds; combinations dlt itself does not offer are left out (asked from
dlt's destination capabilities) and listed as "not supported by dlt". One project file holds every destination
kind and one server process serves it (module-scoped); the cells of one kind and naming convention are the
tables of one pipeline (dataset ``mx_<kind>_<naming>``), loaded twice. The owner's runs go to worker processes,
one task per destination kind, so the kinds load side by side. For every cell:

1. read: the server's ``dataset[table].arrow()`` of the table and its child tables equals the destination's own
   read (``dlt.dataset``, or deltalake for Delta tables) in values and Arrow types (or a mapping in
   ``DOCUMENTED_MAPPINGS``), and the stored schema's NOT NULL columns are served NOT NULL (or the kind is in
   ``DOCUMENTED_NULLABLE``); sql: ``SELECT * FROM "<table>"`` has the same columns.
2. save: the rows read save back under the profile's ``freeze`` contract with the default disposition, and
   change nothing else: the group's tables are read once before its saves and once after them, and every
   table holds what its own save (or none) says - child tables and unsaved tables their rows, merge tables the
   same rows, append tables their rows twice - and the stored dlt schema is unchanged. A refusal is accepted
   only where ``DOCUMENTED_REFUSALS`` says so (and then nothing may have changed); UNAVAILABLE / INTERNAL never.
3. owner run: the owner's pipeline, from a fresh pipelines folder, loads new rows and the server sees them.
4. loads: every ``_dlt_loads`` row has a ``_dlt_version`` row with its schema_version_hash.

``FLIGHT_SHARE_WRITE_MATRIX_DOC=1 .venv/bin/pytest tests/test_dlt_matrix.py`` writes ``docs/dlt-matrix.md``
from the outcomes (only when every destination kind ran).
"""

from __future__ import annotations

import datetime
import multiprocessing
import os
import re
import resource
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dlt
import psutil
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from client import (
    InvalidRequestError,
    ServerError,
    ServerUnavailableError,
    UnsupportedError,
    connect,
)
from flight_server.testing.servers import REPO, ServerProcess
from tests import dlt_matrix as mx
from tests.dlt_matrix import Cell, Outcome
from tests.test_owner_data import Owner, owner_destination

pytestmark = pytest.mark.slow

CELLS = mx.generate()
CHECKS = ("read", "sql", "save", "owner run", "loads")
DOC = REPO / "docs" / "dlt-matrix.md"
# worker processes for the owner's runs: the kinds load side by side (dlt's runs wait on files, PostgreSQL and
# the S3 server as much as they compute)
WORKERS = 3

#: (destination kind or "*", dlt's Arrow type, the served Arrow type) -> why the server's type is right
DOCUMENTED_MAPPINGS: dict[tuple[str, str, str], str] = {
    ("sqlite", "timestamp[us, tz=UTC]", "timestamp[us]"):
        "SQLite holds no time zone: dlt's SQLite capabilities (supports_tz_aware_datetime: false) map a timestamp "
        "with time zone to a naive one holding the UTC wall clock, as dlt's own read does in a process where dlt "
        "has connected to the database; dlt.dataset() in a fresh process types it before that adjustment and labels "
        "the same values UTC (docs/type-mapping.md, note 2)",
}

#: destination kinds whose reads serve a stored NOT NULL column as nullable, and why (docs/type-mapping.md)
DOCUMENTED_NULLABLE: dict[str, str] = {
    kind: "dlt's plain filesystem layout: the files carry no constraint and dlt's own read (duckdb views over "
          "the files) marks every column nullable; the server serves what dlt reads"
    for kind in mx.PLAIN_FILES}

#: a save refused up front, accepted only here: (predicate on the cell and whether its stored table has child
#: tables, error text pattern, why). Anything else refused is a failure.
DOCUMENTED_REFUSALS: list[tuple[Callable[[Cell, bool], bool], str, str]] = [
    (lambda cell, has_children: cell.disposition in ("delete-insert", "upsert") and has_children,
     r"has nested data in child table",
     "a delete-insert or upsert merge of parent rows replaces all their child rows in dlt, and rows read from a "
     "parent carry none: refused before anything is written"),
    (lambda cell, has_children: cell.disposition == "scd2", r"keeps a history of row versions with dlt's scd2",
     "an scd2 table's row versions and their validity come from the owner's loads, and a saved row cannot be "
     "matched to its version (dlt hashes the source row): refused before anything is written"),
]

#: where the served Arrow type (= dlt's own read, checked above) differs from the type dlt declares for the
#: stored column with the destination's capabilities (``columns_to_arrow``), why: (destination kinds, dlt data
#: type) -> the note of docs/type-mapping.md that says so. Observed differences are listed in the document;
#: one without a note here fails the read check.
DECLARED_DIFFERENCES: dict[tuple[frozenset[str], str], str] = {
    (frozenset(mx.DELTA_KINDS), "time"): "note 4: dlt writes `time` into Delta as text",
    (frozenset(mx.DELTA_KINDS), "wei"): "note 4: Delta has no 256-bit decimal: dlt writes `wei` as text, or as the "
                                        "decimal of its precision hint (at most 38 digits)",
    (frozenset(mx.DELTA_KINDS), "timestamp"): "note 4: Delta holds timestamps in microseconds only",
    (frozenset({"duckdb"}), "timestamp"): "note 3: duckdb has no millisecond TIMESTAMP WITH TIME ZONE",
    (frozenset({"postgres"}), "wei"): "note 6: dlt's dataset types PostgreSQL's numeric `wei` decimal(38, 0)",
    (frozenset({"duckdb"}), "wei"): "note 8: dlt creates a `wei` column with a precision hint as DECIMAL(p, 0) in "
                                    "duckdb; its declared mapping ignores the hint, its read gives the column's type",
    (frozenset({"fs_parquet"}), "decimal"): "note 8: dlt writes Arrow/pandas decimals into Parquet as they are (a "
                                            "pandas column's inferred precision) and reads the file as it is",
    (frozenset({"fs_parquet"}), "wei"): "note 7: dlt writes `wei` into Parquet as decimal256 (read through duckdb "
                                        "as double) or as the decimal of its precision hint",
    (frozenset({"fs_jsonl", "fs_csv"}), "wei"): "the table: dlt reads jsonl/csv `wei` through duckdb as a decimal of "
                                                "at most 38 digits (its precision hint, else 38)",
    (frozenset(mx.PLAIN_FILES), "json"): "the table: dlt reads a file's JSON column as the file holds it",
    (frozenset(mx.PLAIN_FILES), "timestamp"): "the table: dlt reads file timestamps through duckdb in microseconds",
}
#: observed: (kind, dlt type, declared Arrow type, served Arrow type) -> the cells' tables
DECLARED: dict[tuple[str, str, str, str], list[str]] = defaultdict(list)

#: every outcome of this run: (kind, cell index) -> check -> Outcome
RESULTS: dict[tuple[str, int], dict[str, Outcome]] = defaultdict(dict)
#: wall seconds of each phase of the run (printed; ``-s`` shows them)
PHASES: dict[str, float] = {}
STARTED = [0.0]


@dataclass
class MatrixOwner:
    """One destination kind: its owner (the shared helper of test_owner_data) and its cells."""

    kind: str
    owner: Owner
    cells: list[Cell] = field(default_factory=list)
    load_errors: dict[str, str] = field(default_factory=dict)  # naming -> why the owner's loads failed
    _caps: Any = None

    @property
    def accepts_saves(self) -> bool:
        return self.kind not in mx.PLAIN_FILES

    def capabilities(self) -> Any:
        """dlt's capabilities of the destination (for SQL destinations adjusted to the database's dialect)."""
        if self._caps is None:
            self._caps = self.owner.destination().capabilities()
        return self._caps

    def groups(self) -> dict[str, list[Cell]]:
        out: dict[str, list[Cell]] = defaultdict(list)
        for cell in self.cells:
            out[cell.naming].append(cell)
        return dict(out)

    def dataset(self, naming: str) -> str:
        return mx.dataset_name(self.kind, naming)

    def ds(self, naming: str) -> Any:
        # the owner's destinations carry their credentials: no environment needed in this process
        return dlt.dataset(self.owner.destination(), self.dataset(naming), schema=mx.schema_name(self.kind, naming))

    def schema(self, naming: str) -> Any:
        return mx.retry_locked(lambda: self.ds(naming).schema)

    def snapshot(self, naming: str) -> tuple[Any, dict[str, pa.Table], dict[str, str]]:
        """The stored schema and every data table as the destination reads it (one dlt dataset; Delta tables
        read by deltalake), and the tables the destination's own read fails on (with the error)."""
        def attempt() -> tuple[Any, dict[str, pa.Table], dict[str, str]]:
            ds = self.ds(naming)
            schema = ds.schema
            tables, errors = {}, {}
            for t in schema.data_table_names():
                try:
                    tables[t] = self.truth(naming, t, ds)
                except Exception as exc:  # noqa: BLE001 - its own cell's read check says so
                    text = mx.error_text(exc)
                    if "Could not set lock" in text:
                        raise
                    errors[t] = text
            return schema, tables, errors

        return mx.retry_locked(attempt)

    def _system_table(self, naming: str, table: str) -> pa.Table:
        """dlt's own records of a Delta dataset (``_dlt_loads``, ``_dlt_version``: JSON lines files), read
        directly (dlt's dataset reads them through duckdb, which needs its httpfs extension for S3)."""
        import gzip

        import fsspec

        options = self.owner.delta_options or {}
        base = options["_base"]
        if base.startswith("s3://"):
            fs = fsspec.filesystem("s3", key=options["AWS_ACCESS_KEY_ID"], secret=options["AWS_SECRET_ACCESS_KEY"],
                                   client_kwargs={"endpoint_url": options["AWS_ENDPOINT_URL"],
                                                  "region_name": options["AWS_REGION"]})
            base = base[len("s3://"):]
        else:
            fs = fsspec.filesystem("file")
        records = []
        for path in sorted(fs.glob(f"{base}/{self.dataset(naming)}/{table}/*")):
            data = fs.cat_file(path)
            if data[:2] == b"\x1f\x8b":
                data = gzip.decompress(data)
            records += [mx.json.loads(line) for line in data.decode().splitlines() if line.strip()]
        return pa.Table.from_pylist(records)

    def truth(self, naming: str, table: str, ds: Any = None) -> pa.Table:
        """The destination's own read: dlt's dataset, or deltalake for Delta tables (dlt reads those through
        duckdb's delta extension, downloaded at run time: not reachable here)."""
        if self.owner.delta_options is not None and table.startswith("_dlt"):
            return self._system_table(naming, table)
        if self.owner.delta_options is not None:
            from deltalake import DeltaTable

            options = {k: v for k, v in self.owner.delta_options.items() if k != "_base"}
            return DeltaTable(f"{self.owner.delta_options['_base']}/{self.dataset(naming)}/{table}",
                              storage_options=options or None).to_pyarrow_table()
        return mx.retry_locked(lambda: (ds if ds is not None else self.ds(naming))[table].arrow())


def _owners(request: pytest.FixtureRequest, root: Path) -> tuple[dict[str, MatrixOwner], dict[str, str]]:
    """Every destination kind's owner (test_owner_data's helper), its cells, the one project file that declares
    them all (a dataset per kind and naming, frozen for the anonymous profile) and the environment it reads."""
    owners: dict[str, MatrixOwner] = {}
    entries, env = [], {}
    for kind in mx.KINDS:
        base = "filesystem" if kind in mx.PLAIN_FILES else kind
        entry, owner = owner_destination(base, request, root, name=f"dest_{kind}", store=f"matrix_{kind}",
                                         lake=f"lake_{kind}", s3_prefix=f"matrix_lake_{kind}")
        entries.append(entry)
        env.update(owner.env)
        owners[kind] = MatrixOwner(kind, owner, [c for c in CELLS if c.kind == kind])
    pipelines = [f"  {mx.pipeline_name(k, n)}: {{source: cells, destination: dest_{k}, "
                 f"dataset_name: {mx.dataset_name(k, n)}}}" for k in mx.KINDS for n in mx.NAMINGS]
    frozen = [f"      {mx.dataset_name(k, n)}: {{contract: freeze}}" for k in mx.KINDS for n in mx.NAMINGS]
    root.mkdir(parents=True, exist_ok=True)
    destinations = "".join("  " + line + "\n" for e in entries for line in e.rstrip("\n").split("\n"))
    (root / "dlt.yml").write_text(
        "project: {name: matrix}\ndestinations:\n" + destinations + "pipelines:\n" + "\n".join(pipelines)
        + "\nprofiles:\n  access:\n    datasets:\n" + "\n".join(frozen) + "\nserver: {anonymous_profile: access}\n")
    return owners, env


@pytest.fixture(scope="module")
def matrix(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, MatrixOwner]]:
    """The whole matrix, run once; the tests below report its outcomes per kind and naming. The server starts
    while the owners load; then each destination kind goes its own way, side by side with the others: its
    owner's loads (a worker process), its reads and saves (a thread), the owner's next run from fresh folders
    (a worker) and whether the server sees it."""
    root = tmp_path_factory.mktemp("matrix")
    started = STARTED[0] = time.monotonic()
    cpu_self, cpu_children = _cpu(resource.RUSAGE_SELF), _cpu(resource.RUSAGE_CHILDREN)
    owners, env = _owners(request, root)
    spawn = multiprocessing.get_context("spawn")  # no fork of a process that holds threads and connections
    with ProcessPoolExecutor(WORKERS, mp_context=spawn) as pool, ThreadPoolExecutor(len(owners)) as threads:
        order = sorted(owners, key=lambda k: -len(owners[k].cells) - 100 * (k in ("delta_s3", "postgres")))
        loads = {kind: pool.submit(mx.load_kind, owners[kind].owner, owners[kind].groups(), (1, 2),
                                   mx.Folders(root, f"owner_{kind}", fresh=False)) for kind in order}
        with ServerProcess(root / "dlt.yml", env=env) as server:
            PHASES["server ready"] = time.monotonic() - started
            runs = [threads.submit(run_kind, owners[kind], loads[kind], server, pool, root) for kind in order]
            for run in runs:
                run.result()
            PHASES["all kinds done"] = time.monotonic() - started
            assert server.alive, server.output()
            server_cpu = sum(psutil.Process(server.proc.pid).cpu_times()[:2])
        pool.shutdown()
        used = {"this process": _cpu(resource.RUSAGE_SELF) - cpu_self,
                "server": server_cpu, "owner workers": _cpu(resource.RUSAGE_CHILDREN) - cpu_children - server_cpu}
        print("\nmatrix, wall seconds from the start: " + ", ".join(f"{k} {v:.0f}" for k, v in PHASES.items())
              + "; CPU seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in used.items()))
    yield owners


def _cpu(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def run_kind(mo: MatrixOwner, loading: Future, server: ServerProcess, pool: ProcessPoolExecutor, root: Path) -> None:
    """One destination kind, after its owner's first two loads: reads and saves, the owner's next run, the
    server sees it."""
    mo.load_errors = {n: r["error"] for n, r in loading.result().items() if r["error"]}
    with connect(server.url) as catalog:
        for naming, cells in mo.groups().items():
            check_group(mo, server, catalog, naming, cells)
        again = pool.submit(mx.load_kind, mo.owner, mo.groups(), (3,), mx.Folders(root, f"fresh_{mo.kind}", fresh=True))
        check_owner_runs(mo, catalog, again.result())
    PHASES[f"{mo.kind} done"] = time.monotonic() - STARTED[0]


def _server_error(server: ServerProcess, mark: int) -> str:
    """The last exception line the server logged since ``mark`` (for INTERNAL errors, whose text is generic)."""
    lines = [line.strip() for line in server.log[mark:] if line.strip()]
    found = [line for line in lines if re.match(r"^[\w.]+(Error|Exception|Failed)\b", line)]
    return f" [server log: {found[-1][:400]}]" if found else ""


def _names(schema: Any, cell: Cell) -> tuple[str, list[str], dict[str, Any]]:
    """The cell's table as stored, its child tables (all depths) and the stored table."""
    table = schema.naming.normalize_table_identifier(cell.resource)
    children: list[str] = []
    frontier = [table]
    while frontier:
        parent = frontier.pop()
        for name, t in schema.tables.items():
            if t.get("parent") == parent:
                children.append(name)
                frontier.append(name)
    return table, children, schema.tables.get(table, {})


def _json_columns(stored: dict[str, Any]) -> list[str]:
    return [c for c, col in stored.get("columns", {}).items() if col.get("data_type") == "json"]


def _not_null(stored: dict[str, Any]) -> list[str]:
    return [c for c, col in stored.get("columns", {}).items() if col.get("nullable") is False]


def check_read(mo: MatrixOwner, dataset: Any, tables: list[str], schema: Any, truths: dict[str, pa.Table],
               errors: dict[str, str], served_reads: dict[str, pa.Table]) -> dict[str, Outcome]:
    """The read and sql checks of a table and its child tables; the server's reads go into ``served_reads``."""
    out: dict[str, Outcome] = {}
    problems: list[Outcome] = []
    for table in tables:
        stored = schema.tables.get(table, {})
        try:
            served = served_reads[table] = dataset[table].arrow()
        except Exception as exc:  # noqa: BLE001
            problems.append(Outcome("FAIL", f"{table}: read failed: {mx.error_text(exc)}"))
            continue
        if table not in truths:
            problems.append(Outcome("FAIL", f"{table}: the destination's own read failed: {errors.get(table, '?')}"))
            continue
        result = mx.compare_read(mo.kind, truths[table], served, _json_columns(stored), _not_null(stored),
                                 DOCUMENTED_MAPPINGS, DOCUMENTED_NULLABLE.get(mo.kind))
        if result.status != "exact":
            problems.append(Outcome(result.status, f"{table}: {result.text}"))
        problems += _declared(mo, table, stored, served)
        if table == tables[0]:
            try:
                sql = dataset.sql(f'SELECT * FROM "{table}"').arrow()
                out["sql"] = (Outcome("exact") if sql.column_names == served.column_names else Outcome(
                    "FAIL", f"SELECT * columns {sql.column_names} != read {served.column_names}"))
            except Exception as exc:  # noqa: BLE001
                out["sql"] = Outcome("FAIL", f"SELECT * FROM \"{table}\" failed: {mx.error_text(exc)}")
    fails = [p for p in problems if p.status == "FAIL"]
    if fails:
        out["read"] = Outcome("FAIL", "; ".join(p.text for p in fails))
    elif problems:
        out["read"] = Outcome("documented", "; ".join(p.text for p in problems))
    else:
        out["read"] = Outcome("exact")
    out.setdefault("sql", Outcome("FAIL", "not run: the table was not read"))
    return out


def _declared(mo: MatrixOwner, table: str, stored: dict[str, Any], served: pa.Table) -> list[Outcome]:
    """Served types that differ from what dlt declares for the stored columns: recorded for the document, and a
    failure where :data:`DECLARED_DIFFERENCES` has no note for it."""
    from dlt.common.libs.pyarrow import columns_to_arrow
    from dlt.common.schema.utils import is_complete_column

    columns = {n: c for n, c in stored.get("columns", {}).items() if is_complete_column(c) and n in served.column_names}
    declared = columns_to_arrow(columns, mo.capabilities(), "UTC")
    out = []
    for name, column in columns.items():
        want, got = declared.field(name).type, served.schema.field(name).type
        if want.equals(got):
            continue
        hints = "".join(f", {k} {column[k]}" for k in ("precision", "scale", "timezone") if k in column)
        dlt_type = f"{column['data_type']}{hints}"
        DECLARED[(mo.kind, dlt_type, str(want), str(got))].append(table)
        if not any(mo.kind in kinds and column["data_type"] == t for kinds, t in DECLARED_DIFFERENCES):
            out.append(Outcome("FAIL", f"{table}: '{name}' (dlt {dlt_type}) is declared {want} and served {got}, "
                                       "with no note in DECLARED_DIFFERENCES"))
    return out


def _business(table: pa.Table, json_columns: list[str]) -> list[dict[str, Any]]:
    return mx.sort_rows(table, json_columns, drop=mx.DLT_COLUMNS)


def save(mo: MatrixOwner, server: ServerProcess, catalog: Any, cell: Cell, table: str, children: list[str],
         read: pa.Table | None) -> tuple[Outcome, bool]:
    """Save the rows read (``read``: the read check's, else read now) back into ``table`` (default disposition):
    the outcome so far, and whether the table should now hold the same rows (a merge, a refusal, a failure)
    rather than its rows twice."""
    name = mo.dataset(cell.naming)
    mark = len(server.log)
    try:
        if read is None:
            read = catalog[name][table].arrow()
        catalog[name].save(read, table_name=table)
    except (InvalidRequestError, UnsupportedError) as exc:
        message = str(exc)
        for applies, pattern, reason in DOCUMENTED_REFUSALS:
            if applies(cell, bool(children)) and re.search(pattern, message) and "Traceback" not in message:
                return Outcome("refused", f"{reason} — \"{message.splitlines()[0][:200]}\""), True
        return Outcome("FAIL", f"refused without a documented reason: {type(exc).__name__}: {message[:400]}"), True
    except (ServerError, ServerUnavailableError) as exc:
        return Outcome("FAIL", f"{type(exc).__name__}: {str(exc)[:400]}{_server_error(server, mark)}"), True
    except Exception as exc:  # noqa: BLE001
        return Outcome("FAIL", f"{mx.error_text(exc)}{_server_error(server, mark)}"), True
    return Outcome("exact"), cell.merge


def _table_problems(cell: Cell, table: str, old: pa.Table, new: pa.Table, jc: list[str], same: bool) -> list[str]:
    """``table`` after the group's saves holds what its own save says (merge or refused: the same rows;
    append: the rows twice; scd2: the same current rows)."""
    if cell.disposition == "scd2":
        def active(t: pa.Table) -> list[dict[str, Any]]:
            if "_dlt_valid_to" not in t.column_names:
                return _business(t, jc)
            return _business(t.filter(pc.is_null(t.column("_dlt_valid_to"))), jc)
        if active(new) != active(old):
            return [f"scd2 table {table}: the current rows changed ({new.num_rows} rows, were {old.num_rows})"]
        return []
    want = _business(old, jc) * (1 if same else 2)
    want.sort(key=lambda r: mx.json.dumps(r, sort_keys=True, default=repr))
    if _business(new, jc) != want:
        return [f"table {table}: {new.num_rows} rows after the save, expected {len(want)} "
                f"({'the same rows' if same else 'the rows twice'})"]
    return []


def check_group(mo: MatrixOwner, server: ServerProcess, catalog: Any, naming: str, cells: list[Cell]) -> None:
    """Read every cell of one group, save each back, then compare the group's tables and stored schema with
    what they were before the saves (one read of the destination before, one after)."""
    if naming in mo.load_errors:
        for cell in cells:
            RESULTS[(mo.kind, cell.index)].update({c: Outcome("FAIL", mo.load_errors[naming]) for c in CHECKS})
        return
    try:
        schema, before, errors = mo.snapshot(naming)
    except Exception as exc:  # noqa: BLE001
        for cell in cells:
            RESULTS[(mo.kind, cell.index)].update(
                {c: Outcome("FAIL", f"the destination's own read failed: {mx.error_text(exc)}") for c in CHECKS[:3]})
        return
    dataset = catalog[mo.dataset(naming)]
    names = {cell.index: _names(schema, cell) for cell in cells}
    served_reads: dict[str, pa.Table] = {}
    for cell in cells:
        table, children, _ = names[cell.index]
        RESULTS[(mo.kind, cell.index)].update(
            check_read(mo, dataset, [table, *children], schema, before, errors, served_reads))
    if not mo.accepts_saves:
        for cell in cells:
            RESULTS[(mo.kind, cell.index)]["save"] = Outcome("n/a", "dlt's plain filesystem layout is served read-only")
        return
    saved: dict[int, tuple[Outcome, bool]] = {}
    for cell in cells:
        table, children, _ = names[cell.index]
        if table not in before:
            RESULTS[(mo.kind, cell.index)]["save"] = Outcome("FAIL", f"not run: the destination's own read of {table} fails")
            continue
        saved[cell.index] = save(mo, server, catalog, cell, table, children, served_reads.get(table))
    try:
        schema_after, after, _ = mo.snapshot(naming)
    except Exception as exc:  # noqa: BLE001
        for index in saved:
            RESULTS[(mo.kind, index)]["save"] = Outcome("FAIL", f"the check's own reads failed: {mx.error_text(exc)}")
        return
    # every table of the group holds what its own save says; each problem goes to the cell whose table it is
    owner_of = {t: cell for cell in cells for t in (names[cell.index][0], *names[cell.index][1])}
    problems: dict[int, list[str]] = defaultdict(list)
    for t, rows in before.items():
        cell = owner_of.get(t)
        index = cell.index if cell is not None else -1
        if t not in after:
            problems[index].append(f"table {t} is gone after the saves")
        elif cell is not None and t == names[cell.index][0] and cell.index in saved:
            problems[index] += _table_problems(cell, t, rows, after[t], _json_columns(names[cell.index][2]),
                                               saved[cell.index][1])
        elif after[t].num_rows != rows.num_rows:
            problems[index].append(f"table {t}: {rows.num_rows} rows before the saves, {after[t].num_rows} after")
        elif mx.sort_rows(after[t]) != mx.sort_rows(rows):
            problems[index].append(f"table {t}: rows changed by the saves")
    for line in mx.snapshot_diff(mx.schema_snapshot(schema), mx.schema_snapshot(schema_after), limit=20):
        table = line.split(".")[1] if line.startswith("tables.") else ""
        cell = owner_of.get(table)
        problems[cell.index if cell is not None else -1].append("stored schema changed: " + line)
    for index, (outcome, _) in saved.items():
        found = problems.get(index, []) + problems.get(-1, [])
        RESULTS[(mo.kind, index)]["save"] = Outcome("FAIL", "; ".join(
            ([outcome.text] if outcome.status == "FAIL" else []) + found)) if found else outcome


def check_owner_runs(mo: MatrixOwner, catalog: Any, results: dict[str, dict[str, Any]]) -> None:
    """The owner's next run from a fresh pipelines folder (run by a worker: all cells of a pipeline; on failure
    each cell alone, to name the one that fails), then the server sees the new rows of every cell of the
    kind (one polling loop: it re-reads a stored schema within seconds); then the loads check per group."""
    groups = {n: cells for n, cells in mo.groups().items() if n not in mo.load_errors}
    out: dict[int, Outcome] = {}
    pending: list[tuple[str, Cell]] = []
    for naming, cells in groups.items():
        result = results[naming]
        if result["error"] is None:
            pending += [(naming, c) for c in cells]
            continue
        out.update({i: Outcome("FAIL", text) for i, text in result["cells"].items()})
        if not result["cells"]:  # only all of them together fail
            out.update({c.index: Outcome("FAIL", f"the owner's run of all tables failed: {result['error']}")
                        for c in cells})
        else:
            pending += [(naming, c) for c in cells if c.index not in result["cells"]]
    new_ids = set(mx.ids(3))
    namings = {n: mo.schema(n).naming for n in {n for n, _ in pending}}
    tables = {c.index: namings[n].normalize_table_identifier(c.resource) for n, c in pending}
    deadline = time.monotonic() + 60  # a bound for a busy machine, not an expected time
    seen: dict[int, str] = {}
    while pending:
        catalog.refresh()
        for naming, cell in pending:
            try:
                got = set(catalog[mo.dataset(naming)][tables[cell.index]].arrow().column("id").to_pylist())
                seen[cell.index] = "ok" if new_ids <= got else f"the server does not see the new rows (ids {sorted(got)})"
            except Exception as exc:  # noqa: BLE001
                seen[cell.index] = f"read after the owner's run failed: {mx.error_text(exc)}"
        pending = [(n, c) for n, c in pending if seen[c.index] != "ok"]
        if time.monotonic() > deadline:
            break
    for index, text in seen.items():
        out[index] = Outcome("exact") if text == "ok" else Outcome("FAIL", text)
    for naming, cells in groups.items():
        try:
            loads = check_loads(mo, naming)
        except Exception as exc:  # noqa: BLE001
            loads = Outcome("FAIL", f"reading _dlt_loads / _dlt_version failed: {mx.error_text(exc)}")
        for cell in cells:
            RESULTS[(mo.kind, cell.index)]["owner run"] = out.get(cell.index, Outcome("FAIL", "not checked"))
            RESULTS[(mo.kind, cell.index)]["loads"] = loads


def check_loads(mo: MatrixOwner, naming: str) -> Outcome:
    ds = mo.ds(naming)
    loads = mo.truth(naming, "_dlt_loads", ds)
    versions = mo.truth(naming, "_dlt_version", ds)
    hashes = set(versions.column("version_hash").to_pylist())
    missing = [r for r in loads.to_pylist() if r["schema_version_hash"] not in hashes]
    if missing:
        return Outcome("FAIL", f"{len(missing)} of {loads.num_rows} _dlt_loads rows have no _dlt_version row "
                               f"(schema {sorted({r['schema_name'] for r in missing})})")
    return Outcome("exact")


def test_the_design_covers_every_pair_dlt_supports() -> None:
    """Every allowed pair of values of two dimensions is in some cell (so every value on every kind)."""
    assert mx.coverage_problems(CELLS) == []
    assert set(mx.counts(CELLS)) == set(mx.KINDS)


@pytest.mark.parametrize("kind,naming", [(k, n) for k in mx.KINDS for n in mx.NAMINGS])
def test_matrix(matrix: dict[str, MatrixOwner], kind: str, naming: str) -> None:
    cells = matrix[kind].groups().get(naming, [])
    assert cells, f"the design has no {naming} cell on {kind}"
    failures = [f"{cell.label()} [{check}]: {RESULTS[(kind, cell.index)].get(check, Outcome('FAIL', 'not run')).text}"
                for cell in cells for check in CHECKS
                if RESULTS[(kind, cell.index)].get(check, Outcome("FAIL")).status == "FAIL"]
    assert not failures, f"{len(failures)} failing checks on {kind}/{naming}:\n" + "\n".join(failures)


# --- the generated document --------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def matrix_doc() -> Iterator[None]:
    yield
    if os.environ.get("FLIGHT_SHARE_WRITE_MATRIX_DOC") == "1" and len(RESULTS) == len(CELLS) and all(
            len(r) == len(CHECKS) for r in RESULTS.values()):
        DOC.write_text(render_doc())


def render_doc() -> str:
    counts = mx.counts(CELLS)
    lines = [
        "# The dlt differential matrix (issue 21)",
        "",
        "Generated by `tests/test_dlt_matrix.py` — do not edit by hand. Regenerate with",
        "`FLIGHT_SHARE_WRITE_MATRIX_DOC=1 .venv/bin/pytest tests/test_dlt_matrix.py` (the file is written only",
        "when every destination kind ran). Every mark below is the outcome the test observed in that run"
        f" ({datetime.date.today().isoformat()}).",
        "",
        f"Design: a greedy pairwise covering (`tests/dlt_matrix.py`, `random.Random({mx.SEED})`): every allowed pair",
        "of values of any two dimensions is in some cell, so every value of every dimension appears on every",
        f"destination kind. **{len(CELLS)} cells**: " + ", ".join(f"{k} {counts[k]}" for k in mx.KINDS) + ".",
        "",
        "Dimensions: " + "; ".join(f"**{d}**: {', '.join(v)}" for d, v in mx.DIMENSIONS.items()) + ".",
        "",
        "Each cell is one table (`Cell<NNN>`, with a column `Val X` of the type under test, `id`, `Name`, and for",
        "`child`/`grandchild` a list of dicts `Items`, whose items hold a list `Subs` for `grandchild`). The cells of",
        "one destination kind and naming convention are the tables of one pipeline (`mx_<kind>_<naming>_pipeline`,",
        "dataset `mx_<kind>_<naming>`, `SCHEMA__NAMING=<naming>`), loaded twice (ids 0-2, then 1-3: merges update,",
        "`variant` turns text). One project file declares every kind; one server process serves it.",
        "",
        "Checks: **read** — the server's `dataset[table].arrow()` of the table and its child tables equals the",
        "destination's own read (`dlt.dataset`, or deltalake for Delta tables) in values and Arrow types, and NOT",
        "NULL columns of the stored schema are served NOT NULL; **sql** — `SELECT * FROM \"<table>\"` has the same",
        "columns; **save** — `dataset.save(read, table_name=table)` (default disposition, profile contract",
        "`freeze`) is accepted and leaves the other tables, the child tables and the stored dlt schema as they were",
        "(merge tables: the same rows; append/replace tables: the rows twice; the group's tables are read before",
        "its saves and after them); a refusal counts only where documented below; **owner run** — the owner's",
        "pipeline from a fresh pipelines folder loads ids 100-101 and the server sees them; **loads** — every",
        "`_dlt_loads` row of the dataset has a `_dlt_version` row with its `schema_version_hash`.",
        "",
        "## Not supported by dlt (left out of the design)",
        "",
    ]
    for kind in mx.KINDS:
        reasons = sorted({r for d in mx.DISPOSITIONS if (r := mx.dlt_unsupported({"kind": kind, "disposition": d}))})
        left = [d for d in mx.DISPOSITIONS if mx.dlt_unsupported({"kind": kind, "disposition": d})]
        if left:
            lines.append(f"- {kind}: {', '.join(left)} — {'; '.join(reasons)}")
    for rule, reason in mx.DLT_LIMITS:
        where = ", ".join(f"{dim} {' / '.join(sorted(values))}" for dim, values in rule.items())
        lines.append(f"- {where} — {reason}")
    lines += ["", "## Documented mappings and refusals", "",
              "The server's type where it differs from dlt's own read, NOT NULL served nullable, and saves refused up",
              "front; each is also in [type-mapping.md](type-mapping.md) or the README's saving section.", ""]
    if DOCUMENTED_MAPPINGS:
        lines += [f"- mapping on {k}: dlt `{t}` served `{s}` — {why}" for (k, t, s), why in DOCUMENTED_MAPPINGS.items()]
    else:
        lines.append("- type mappings: none (every served Arrow type equals dlt's own read)")
    reasons = defaultdict(list)
    for kind, why in DOCUMENTED_NULLABLE.items():
        reasons[why].append(kind)
    lines += [f"- NOT NULL served nullable on {', '.join(kinds)} — {why}" for why, kinds in reasons.items()]
    lines += [f"- refusal: {why}" for _, _, why in DOCUMENTED_REFUSALS]
    lines += ["", "## Served type and dlt's declared type", "",
              "Where the served Arrow type (which equals dlt's own read: the read check) differs from the type dlt",
              "declares for the stored column with the destination's capabilities (`columns_to_arrow`), observed in",
              "this run, with the note of [type-mapping.md](type-mapping.md) that explains it:", ""]
    for (kind, dlt_type, want, got), tables in sorted(DECLARED.items()):
        note = next((n for (kinds, t), n in DECLARED_DIFFERENCES.items()
                     if kind in kinds and dlt_type.split(",")[0] == t), "**no note**")
        lines.append(f"- {kind}: dlt `{dlt_type}` declared `{want}`, served `{got}` — {note} "
                     f"({len(tables)} tables, e.g. {', '.join(sorted(tables)[:3])})")
    if not DECLARED:
        lines.append("- none")
    failures: dict[tuple[str, str], list[str]] = defaultdict(list)
    for kind in mx.KINDS:
        lines += ["", f"## {kind}", "", "| cell | type | disposition | nesting | form | naming | " + " | ".join(CHECKS) + " |",
                  "|" + " --- |" * (6 + len(CHECKS))]
        for cell in (c for c in CELLS if c.kind == kind):
            results = RESULTS[(kind, cell.index)]
            lines.append(f"| {cell.resource} | {cell.type} | {cell.disposition} | {cell.nesting} | {cell.form} | "
                         f"{cell.naming} | " + " | ".join(_shown(results[c]) for c in CHECKS) + " |")
            for check in CHECKS:
                if results[check].status == "FAIL":
                    for text in mx.causes(results[check].text):
                        failures[(check, text)].append(f"{kind} {cell.resource}")
    total = sum(r[c].status == "FAIL" for r in RESULTS.values() for c in CHECKS)
    lines += ["", f"## Failures by cause ({total} failing checks; one check may show several causes)", ""]
    for (check, text), where in sorted(failures.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        lines.append(f"- **{check}** ×{len(where)}: `{text}` — {', '.join(where)}")
    return "\n".join(lines) + "\n"


def _shown(outcome: Outcome) -> str:
    """A table cell: failures in full, documented outcomes by name (their reasons are listed above)."""
    if outcome.status in ("documented", "refused"):
        return f"{outcome.status} (above)"
    if outcome.status == "n/a":
        return "n/a (read-only)"
    return outcome.cell()
