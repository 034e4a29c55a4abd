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
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import dlt
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
# threads that read and save through the server, one destination kind each at a time (the server, the
# destinations and this process work side by side)
CHECKERS = 4

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

#: every outcome of this run: (kind, cell index) -> check -> Outcome
RESULTS: dict[tuple[str, int], dict[str, Outcome]] = defaultdict(dict)
#: wall seconds of each phase of the run (printed; ``-s`` shows them)
PHASES: dict[str, float] = {}


@dataclass
class MatrixOwner:
    """One destination kind: its owner (the shared helper of test_owner_data) and its cells."""

    kind: str
    owner: Owner
    cells: list[Cell] = field(default_factory=list)
    load_errors: dict[str, str] = field(default_factory=dict)  # naming -> why the owner's loads failed

    @property
    def accepts_saves(self) -> bool:
        return self.kind not in mx.PLAIN_FILES

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


def _load_all(pool: ProcessPoolExecutor, owners: dict[str, MatrixOwner], loads: tuple[int, ...],
              folders: Callable[[str], mx.Folders]) -> dict[str, dict[str, dict[str, Any]]]:
    """Every kind's groups through the owner's pipeline, one worker task per kind (the slowest kinds first)."""
    order = sorted(owners, key=lambda k: -len(owners[k].cells) - 100 * (k in ("delta_s3", "postgres")))
    futures = {kind: pool.submit(mx.load_kind, owners[kind].owner, owners[kind].groups(), loads, folders(kind))
               for kind in order}
    return {kind: future.result() for kind, future in futures.items()}


@pytest.fixture(scope="module")
def matrix(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, MatrixOwner]]:
    """The whole matrix, run once: the owners load (workers), one server serves every kind, each group is
    read and saved back, the owners run again from fresh folders (workers), the server sees it. The tests
    below report the outcomes per kind and naming."""
    root = tmp_path_factory.mktemp("matrix")
    started = time.monotonic()
    owners, env = _owners(request, root)
    spawn = multiprocessing.get_context("spawn")  # no fork of a process that holds threads and connections
    with ProcessPoolExecutor(WORKERS, mp_context=spawn) as pool:
        loaded = _load_all(pool, owners, (1, 2), lambda kind: mx.Folders(root, f"owner_{kind}", fresh=False))
        for kind, groups in loaded.items():
            owners[kind].load_errors = {n: r["error"] for n, r in groups.items() if r["error"]}
        PHASES["owner loads 1-2"] = time.monotonic() - started
        with ServerProcess(root / "dlt.yml", env=env) as server:
            PHASES["server start"] = time.monotonic() - started - sum(PHASES.values())
            with ThreadPoolExecutor(CHECKERS) as threads:  # the kinds side by side; each its own connection
                list(threads.map(lambda mo: check_kind(mo, server), owners.values()))
            PHASES["reads and saves"] = time.monotonic() - started - sum(PHASES.values())
            again = _load_all(pool, {k: mo for k, mo in owners.items() if mo.groups()}, (3,),
                              lambda kind: mx.Folders(root, f"fresh_{kind}", fresh=True))
            PHASES["owner run 3"] = time.monotonic() - started - sum(PHASES.values())
            with connect(server.url) as catalog:
                for kind, groups in again.items():
                    for naming, result in groups.items():
                        check_owner_run(owners[kind], catalog, naming, owners[kind].groups()[naming], result)
            PHASES["server sees it"] = time.monotonic() - started - sum(PHASES.values())
            print("\nmatrix phases (s): " + ", ".join(f"{k} {v:.0f}" for k, v in PHASES.items()))
            assert server.alive, server.output()
            yield owners
            assert server.alive, server.output()


# --- checks ------------------------------------------------------------------------------------------------
def check_kind(mo: MatrixOwner, server: ServerProcess) -> None:
    with connect(server.url) as catalog:
        for naming, cells in mo.groups().items():
            check_group(mo, server, catalog, naming, cells)


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
               errors: dict[str, str]) -> dict[str, Outcome]:
    out: dict[str, Outcome] = {}
    problems: list[Outcome] = []
    for table in tables:
        stored = schema.tables.get(table, {})
        try:
            served = dataset[table].arrow()
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


def _business(table: pa.Table, json_columns: list[str]) -> list[dict[str, Any]]:
    return mx.sort_rows(table, json_columns, drop=mx.DLT_COLUMNS)


def save(mo: MatrixOwner, server: ServerProcess, catalog: Any, cell: Cell, table: str, children: list[str]
         ) -> tuple[Outcome, bool]:
    """Save the rows read back into ``table`` (default disposition): the outcome so far, and whether the
    table should now hold the same rows (a merge, a refusal, a failure) rather than its rows twice."""
    name = mo.dataset(cell.naming)
    mark = len(server.log)
    try:
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
    for cell in cells:
        table, children, _ = names[cell.index]
        RESULTS[(mo.kind, cell.index)].update(check_read(mo, dataset, [table, *children], schema, before, errors))
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
        saved[cell.index] = save(mo, server, catalog, cell, table, children)
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


def check_owner_run(mo: MatrixOwner, catalog: Any, naming: str, cells: list[Cell], result: dict[str, Any]) -> None:
    """The owner's next run from a fresh pipelines folder (run by a worker: all cells of the pipeline; on failure
    each cell alone, to name the one that fails), then the server sees the new rows; then the loads check."""
    if naming in mo.load_errors:
        return
    out: dict[int, Outcome] = {}
    pending = list(cells)
    if result["error"] is not None:
        pending = [c for c in cells if c.index not in result["cells"]]
        out = {i: Outcome("FAIL", text) for i, text in result["cells"].items()}
        if not out:  # only all of them together fail
            out = {c.index: Outcome("FAIL", f"the owner's run of all tables failed: {result['error']}") for c in cells}
            pending = []
    new_ids = set(mx.ids(3))
    naming_of = mo.schema(naming).naming
    deadline = time.monotonic() + 15
    seen: dict[int, str] = {}
    while pending:  # the server sees new loads within seconds (it re-reads the stored schema)
        catalog.refresh()
        for cell in pending:
            if seen.get(cell.index) == "ok":
                continue
            table = naming_of.normalize_table_identifier(cell.resource)
            try:
                got = set(catalog[mo.dataset(naming)][table].arrow().column("id").to_pylist())
                seen[cell.index] = "ok" if new_ids <= got else f"the server does not see the new rows (ids {sorted(got)})"
            except Exception as exc:  # noqa: BLE001
                seen[cell.index] = f"read after the owner's run failed: {mx.error_text(exc)}"
        if all(seen.get(c.index) == "ok" for c in pending) or time.monotonic() > deadline:
            break
    for cell in pending:
        out[cell.index] = Outcome("exact") if seen.get(cell.index) == "ok" else Outcome("FAIL", seen.get(cell.index, "?"))
    try:
        loads = check_loads(mo, naming)
    except Exception as exc:  # noqa: BLE001
        loads = Outcome("FAIL", f"reading _dlt_loads / _dlt_version failed: {mx.error_text(exc)}")
    for cell in cells:
        RESULTS[(mo.kind, cell.index)]["owner run"] = out[cell.index]
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
    failures: dict[tuple[str, str], list[str]] = defaultdict(list)
    for kind in mx.KINDS:
        lines += ["", f"## {kind}", "", "| cell | type | disposition | nesting | form | naming | " + " | ".join(CHECKS) + " |",
                  "|" + " --- |" * (6 + len(CHECKS))]
        for cell in (c for c in CELLS if c.kind == kind):
            results = RESULTS[(kind, cell.index)]
            lines.append(f"| {cell.resource} | {cell.type} | {cell.disposition} | {cell.nesting} | {cell.form} | "
                         f"{cell.naming} | " + " | ".join(results[c].cell() for c in CHECKS) + " |")
            for check in CHECKS:
                if results[check].status == "FAIL":
                    for text in mx.causes(results[check].text):
                        failures[(check, text)].append(f"{kind} {cell.resource}")
    total = sum(r[c].status == "FAIL" for r in RESULTS.values() for c in CHECKS)
    lines += ["", f"## Failures by cause ({total} failing checks; one check may show several causes)", ""]
    for (check, text), where in sorted(failures.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        lines.append(f"- **{check}** ×{len(where)}: `{text}` — {', '.join(where)}")
    return "\n".join(lines) + "\n"
