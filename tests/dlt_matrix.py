"""The generated differential matrix of issue 21: its design (a seeded pairwise covering of dlt's data types,
write dispositions / merge strategies, nesting, input forms, naming conventions and destination kinds),
the data each cell loads, the owner's pipeline runs (run in worker processes: each destination kind's groups
in one task) and the comparisons the test runs. ``tests/test_dlt_matrix.py`` runs it.

``python -m tests.dlt_matrix`` prints the design (cells per destination kind) without running anything.
"""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import itertools
import json
import random
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa

SEED = 21

KINDS = ["duckdb", "sqlite", "postgres", "delta_local", "delta_s3", "fs_parquet", "fs_jsonl", "fs_csv"]
PLAIN_FILES = {"fs_parquet": "parquet", "fs_jsonl": "jsonl", "fs_csv": "csv"}  # served read-only
DELTA_KINDS = ("delta_local", "delta_s3")
TYPES = ["text", "bigint", "double", "bool", "timestamp_ms_naive", "timestamp_us_tz", "date", "time",
         "decimal_10_3", "wei", "binary", "json", "variant"]
DISPOSITIONS = ["append", "replace", "delete-insert", "upsert", "scd2", "insert-only"]
MERGE_STRATEGIES = ("delete-insert", "upsert", "scd2", "insert-only")
NESTINGS = ["flat", "child", "grandchild"]  # grandchild: a list of dicts inside a list of dicts (depth 2)
FORMS = ["dicts", "arrow", "pandas"]
NAMINGS = ["snake_case", "sql_cs_v1", "direct", "duck_case", "sql_ci_v1"]
DIMENSIONS: dict[str, list[str]] = {"kind": KINDS, "type": TYPES, "disposition": DISPOSITIONS, "nesting": NESTINGS,
                                    "form": FORMS, "naming": NAMINGS}

VALUE = "Val X"  # the column under test: a name the naming conventions treat differently
NESTED = "Items"
SUBS = "Subs"
UTC = datetime.UTC
# dlt's own columns (the same under every naming convention used here)
DLT_COLUMNS = ("_dlt_id", "_dlt_load_id", "_dlt_parent_id", "_dlt_root_id", "_dlt_list_idx", "_dlt_valid_from",
               "_dlt_valid_to")


# --- what dlt itself supports (asked from dlt, not typed in) ------------------------------------------------
def _capabilities(kind: str) -> tuple[str, list[str]]:
    """(dlt destination name, merge strategies dlt offers for this kind's tables)."""
    import dlt

    if kind == "duckdb":
        name, dest, table_format = "duckdb", dlt.destinations.duckdb(":memory:"), None
    elif kind == "postgres":
        name, dest, table_format = "postgres", dlt.destinations.postgres("postgresql://u:p@127.0.0.1/d"), None
    elif kind == "sqlite":
        name, dest, table_format = "sqlalchemy", dlt.destinations.sqlalchemy("sqlite:///:memory:"), None
    else:
        name = "filesystem (delta)" if kind in DELTA_KINDS else f"filesystem ({PLAIN_FILES[kind]}, no table format)"
        dest, table_format = dlt.destinations.filesystem("/tmp"), ("delta" if kind in DELTA_KINDS else None)
    caps = dest.capabilities()
    strategies = list(caps.supported_merge_strategies)
    if caps.merge_strategies_selector is not None:
        strategies = list(caps.merge_strategies_selector(strategies, table_schema={"table_format": table_format}))
    return name, strategies


_CAPS: dict[str, tuple[str, list[str]]] = {}


def merge_strategies(kind: str) -> tuple[str, list[str]]:
    if kind not in _CAPS:
        _CAPS[kind] = _capabilities(kind)
    return _CAPS[kind]


#: what dlt itself cannot load (or read back), found by running dlt: (dimension -> values, dlt's reason). A rule
#: applies to a cell holding a value of every dimension it names.
DLT_LIMITS: list[tuple[dict[str, set[str]], str]] = [
    ({"type": {"variant"}, "form": {"arrow", "pandas"}},
     "dlt makes variant columns only from Python objects: an Arrow/pandas column whose type changes between loads "
     "fails the load (Conversion Error)"),
    ({"disposition": {"scd2"}, "form": {"arrow", "pandas"}},
     "dlt's scd2 needs a row hash in `_dlt_id`; its Arrow normalizer adds none by default (UnboundColumnException: "
     "`_dlt_id` ... did not receive any data), and random ids with `add_dlt_id` would retire every row on every load"),
    ({"kind": {"postgres", "fs_csv"}, "form": {"arrow", "pandas"}, "nesting": {"child", "grandchild"}},
     "dlt writes Arrow/pandas data for this destination as CSV, which has no list/struct columns: a list-of-dicts "
     "column fails in dlt's normalize (ArrowInvalid: Unsupported Type: list<struct<...>>)"),
    ({"kind": {"postgres", "fs_csv"}, "form": {"arrow", "pandas"}, "type": {"json"}},
     "dlt writes Arrow/pandas data for this destination as CSV, which has no struct columns: a JSON (struct) "
     "column fails in dlt's normalize (ArrowInvalid: Unsupported Type: struct<...>)"),
    ({"kind": {"postgres"}, "form": {"arrow", "pandas"}, "type": {"binary"}},
     "dlt writes Arrow/pandas data for PostgreSQL as CSV, which cannot carry binary values that are not UTF-8 "
     "(ArrowInvalid: Invalid UTF8 payload)"),
    ({"kind": {"postgres"}, "form": {"dicts"}, "type": {"wei"}},
     "dlt stores wei from Python objects on PostgreSQL as a numeric its own read cannot turn into Arrow "
     "(ArrowInvalid: Decimal precision out of range [1, 76]: 100)"),
    ({"kind": {"fs_csv"}, "type": {"binary"}},
     "dlt's CSV writer cannot write binary values (UnicodeDecodeError: 'utf-8' codec can't decode byte 0xff)"),
    ({"kind": {"sqlite"}, "type": {"timestamp_ms_naive"}},
     "dlt's sqlalchemy destination on SQLite cannot read back a timestamp of precision 3 it stored "
     "(PyToArrowConversionException: Timestamp conversion unsupported by dlt)"),
]


def dlt_unsupported(cell: dict[str, str]) -> str | None:
    """Why dlt itself cannot load this (partial) cell, or None: merge strategies as dlt's destination
    capabilities report them, and :data:`DLT_LIMITS`."""
    kind, disposition = cell.get("kind"), cell.get("disposition")
    if kind and disposition in MERGE_STRATEGIES:
        name, strategies = merge_strategies(kind)
        if disposition not in strategies:
            offered = ", ".join(s for s in strategies if s != "cdc") or "none"
            return f"dlt's {name} destination offers merge strategies: {offered}"
    for rule, reason in DLT_LIMITS:
        if all(cell.get(dim) in values for dim, values in rule.items()):
            return reason
    return None


# --- the pairwise covering design ---------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Cell:
    index: int
    kind: str
    type: str
    disposition: str
    nesting: str
    form: str
    naming: str

    @property
    def resource(self) -> str:
        """The resource (table) name before normalization."""
        return f"Cell{self.index:03d}"

    @property
    def merge(self) -> bool:
        return self.disposition in MERGE_STRATEGIES

    def label(self) -> str:
        return f"{self.resource} {self.type}/{self.disposition}/{self.nesting}/{self.form}/{self.naming}"


def _pair(a: tuple[str, str], b: tuple[str, str]) -> tuple[tuple[str, str], tuple[str, str]]:
    order = list(DIMENSIONS)
    return (a, b) if order.index(a[0]) < order.index(b[0]) else (b, a)


def generate(seed: int = SEED) -> list[Cell]:
    """A greedy (AETG-style) pairwise covering design: every allowed pair of values of two dimensions is in
    some cell, so every value of every dimension appears on every destination kind."""
    rng = random.Random(seed)
    uncovered = set()
    for (a, av), (b, bv) in itertools.combinations(DIMENSIONS.items(), 2):
        for x in av:
            for y in bv:
                if dlt_unsupported({a: x, b: y}) is None:
                    uncovered.add(((a, x), (b, y)))
    rows: list[dict[str, str]] = []
    while uncovered:
        (a, x), (b, y) = rng.choice(sorted(uncovered))
        row = {a: x, b: y}
        rest = [d for d in DIMENSIONS if d not in row]
        rng.shuffle(rest)
        for dim in rest:
            scored = []
            for value in DIMENSIONS[dim]:
                if dlt_unsupported({**row, dim: value}) is not None:
                    continue
                gain = sum(_pair((dim, value), (d, v)) in uncovered for d, v in row.items())
                scored.append((gain, rng.random(), value))
            row[dim] = max(scored)[2]
        for p, q in itertools.combinations(row.items(), 2):
            uncovered.discard(_pair(p, q))
        rows.append(row)
    rows.sort(key=lambda r: (KINDS.index(r["kind"]), NAMINGS.index(r["naming"]), TYPES.index(r["type"])))
    return [Cell(i, **r) for i, r in enumerate(rows)]


def coverage_problems(cells: list[Cell]) -> list[str]:
    """Pairs (and per-kind values) the design misses: empty for a complete design."""
    seen = {_pair(p, q) for c in cells for p, q in itertools.combinations(
        ((d, getattr(c, d)) for d in DIMENSIONS), 2)}
    missing = []
    for (a, av), (b, bv) in itertools.combinations(DIMENSIONS.items(), 2):
        for x in av:
            for y in bv:
                if dlt_unsupported({a: x, b: y}) is None and ((a, x), (b, y)) not in seen:
                    missing.append(f"{a}={x} with {b}={y}")
    return missing


# --- the data of a cell -------------------------------------------------------------------------------
def ids(load: int) -> list[int]:
    """load 1: 0-2; load 2 updates 1-2 and adds 3; load 3 (the owner's run from a fresh folder) adds 100-101."""
    return {1: [0, 1, 2], 2: [1, 2, 3], 3: [100, 101]}[load]


def hints(cell: Cell) -> dict[str, dict[str, Any]]:
    return {
        "timestamp_ms_naive": {VALUE: {"data_type": "timestamp", "precision": 3, "timezone": False}},
        "timestamp_us_tz": {VALUE: {"data_type": "timestamp", "precision": 6, "timezone": True}},
        "decimal_10_3": {VALUE: {"data_type": "decimal", "precision": 10, "scale": 3}},
        "wei": {VALUE: {"data_type": "wei"}},
        "json": {VALUE: {"data_type": "json"}},
    }.get(cell.type, {})


def value(type_: str, i: int, load: int) -> Any:
    base = datetime.datetime(2024, 3, 1, 12, 0, 0)
    if type_ == "text":
        return f"t{i}-{load} é"
    if type_ == "bigint":
        return 2**40 * (i + 1) + load
    if type_ == "double":
        return i * 1.25 + load / 8
    if type_ == "bool":
        return (i + load) % 2 == 0
    if type_ == "timestamp_ms_naive":
        return base + datetime.timedelta(days=i, milliseconds=123 * load)
    if type_ == "timestamp_us_tz":
        return (base + datetime.timedelta(hours=i, microseconds=load * 1001)).replace(tzinfo=UTC)
    if type_ == "date":
        return datetime.date(2024, 1, 1) + datetime.timedelta(days=i * 10 + load)
    if type_ == "time":
        return datetime.time((8 + i) % 24, load, 30, 250000)
    if type_ == "decimal_10_3":
        return decimal.Decimal(f"{1000 + i * 10 + load}.125")  # one magnitude: pandas infers one precision
    if type_ == "wei":
        return decimal.Decimal(2**70 + i * 1000 + load)
    if type_ == "binary":
        return bytes([i, load, 255, 0])
    if type_ == "json":
        return {"a": i, "b": [load, load + 1], "c": {"d": f"x{i}"}}
    if type_ == "variant":  # an int at first; text from the second load on -> `<value>__v_text`
        return i * 10 + load if load == 1 else f"v{i}-{load}"
    raise AssertionError(type_)


def nested(cell: Cell, i: int, load: int) -> list[dict[str, Any]] | None:
    if cell.nesting == "flat":
        return None
    items = []
    for n in range(1 + i % 2):
        item: dict[str, Any] = {"k": n, "Label": f"i{i}-{n}-{load}"}
        if cell.nesting == "grandchild":
            item[SUBS] = [{"z": n * 10 + m} for m in range(2)]
        items.append(item)
    return items


ARROW_TYPES = {"text": pa.string(), "bigint": pa.int64(), "double": pa.float64(), "bool": pa.bool_(),
               "timestamp_ms_naive": pa.timestamp("ms"), "timestamp_us_tz": pa.timestamp("us", tz="UTC"),
               "date": pa.date32(), "time": pa.time64("us"), "decimal_10_3": pa.decimal128(10, 3),
               "wei": pa.decimal128(38, 0), "binary": pa.binary()}


def rows(cell: Cell, load: int) -> Any:
    """The cell's data for one load, in the cell's input form."""
    records = []
    for i in ids(load):
        record: dict[str, Any] = {"id": i, "Name": f"row {i} load {load}", VALUE: value(cell.type, i, load)}
        items = nested(cell, i, load)
        if items is not None:
            record[NESTED] = items
        records.append(record)
    if cell.form == "dicts":
        return records
    if cell.type == "json":
        arrow_value: pa.DataType | None = None  # a struct, inferred; dlt stores it as json
    else:
        arrow_value = ARROW_TYPES[cell.type]
    if cell.form == "arrow":
        columns = {k: [r.get(k) for r in records] for k in records[0]}
        arrays = {k: pa.array(v, arrow_value) if k == VALUE and arrow_value is not None else pa.array(v)
                  for k, v in columns.items()}
        return pa.table(arrays)
    import pandas as pd

    return pd.DataFrame.from_records(records)


def resource(cell: Cell, load: int, table_format: str | None) -> Any:
    import dlt

    kwargs: dict[str, Any] = {"name": cell.resource, "columns": hints(cell) or None, "table_format": table_format}
    if cell.merge:
        kwargs["write_disposition"] = {"disposition": "merge", "strategy": cell.disposition}
        if cell.disposition != "scd2":
            kwargs["primary_key"] = "id"
    else:
        kwargs["write_disposition"] = cell.disposition
    return dlt.resource(rows(cell, load), **kwargs)


# --- the owner's pipeline runs ------------------------------------------------------------------------
def dataset_name(kind: str, naming: str) -> str:
    """One dataset per destination kind and naming convention (the project file names them all)."""
    return f"mx_{kind}_{naming}"


def pipeline_name(kind: str, naming: str) -> str:
    return f"{dataset_name(kind, naming)}_pipeline"


def schema_name(kind: str, naming: str) -> str:
    """dlt names the schema of a pipeline's resources after the pipeline, without the `_pipeline` suffix."""
    return dataset_name(kind, naming)


def error_text(exc: BaseException) -> str:
    """dlt wraps: the innermost cause says what went wrong (one line, bounded)."""
    text = f"{type(exc).__name__}: {exc}"
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
        text = f"{type(exc).__name__}: {exc}"
    return re.sub(r"\s+", " ", text)[:600]


def retry_locked(action: Callable[[], Any], seconds: float = 30) -> Any:
    """duckdb (and SQLite) lock their file per process and queue nobody: while the server or another reader holds
    the file, the owner's pipeline or ``dlt.dataset`` fails to open it and retries (as test_dltplus's owner does),
    up to a deadline."""
    deadline, delay = time.monotonic() + seconds, 0.05
    while True:
        try:
            return action()
        except Exception as exc:  # noqa: BLE001
            text = error_text(exc)
            if not ("Could not set lock" in text or "database is locked" in text) or time.monotonic() > deadline:
                raise
        time.sleep(delay)  # back-off between attempts to open a locked file, not synchronisation
        delay = min(delay * 2, 0.5)


def run_owner(owner: Any, naming: str, cells: list[Cell], load: int, pipelines_dir: Path) -> None:
    """The owner's pipeline (``owner``: tests.test_owner_data.Owner): this naming convention's cells as the
    tables of one run."""
    import dlt

    from flight_server.testing.servers import environment

    file_format = PLAIN_FILES.get(cells[0].kind)

    def attempt() -> None:
        with environment({**owner.env, "SCHEMA__NAMING": naming}):
            pipeline = dlt.pipeline(pipeline_name(cells[0].kind, naming), destination=owner.destination(),
                                    dataset_name=dataset_name(cells[0].kind, naming), pipelines_dir=str(pipelines_dir))
            kwargs = {"loader_file_format": file_format} if file_format else {}
            try:
                pipeline.run([resource(c, load, owner.table_format) for c in cells], **kwargs).raise_on_failed_jobs()
            except Exception:
                pipeline.abort_packages()
                raise

    retry_locked(attempt)


def load_kind(owner: Any, groups: dict[str, list[Cell]], loads: tuple[int, ...],
              folder: Callable[[str], Path]) -> dict[str, dict[str, Any]]:
    """A worker process's task: the loads of every naming group of one destination kind (one kind per task: the
    groups share the kind's database file). Per naming: ``{"error": text or None, "cells": {index: text}}`` - a
    failing group is run again cell by cell (each in a fresh folder) to name the cell that fails."""
    out: dict[str, dict[str, Any]] = {}
    for naming, cells in groups.items():
        result: dict[str, Any] = {"error": None, "cells": {}}
        for load in loads:
            try:
                run_owner(owner, naming, cells, load, folder(naming))
            except Exception as exc:  # noqa: BLE001 - reported for the group
                result["error"] = f"the owner's load {load} failed: {error_text(exc)}"
                break
        if result["error"] is not None and loads == (3,):
            for cell in cells:
                try:
                    run_owner(owner, naming, [cell], 3, folder(f"{naming}_{cell.index}"))
                except Exception as exc:  # noqa: BLE001
                    result["cells"][cell.index] = f"the owner's run failed: {error_text(exc)}"
        out[naming] = result
    return out


class Folders:
    """Picklable ``folder`` for :func:`load_kind`: one pipelines folder per naming (``fresh``: a new one each
    time, as an owner's run from another machine)."""

    def __init__(self, root: Path, tag: str, fresh: bool) -> None:
        self.root, self.tag, self.fresh = root, tag, fresh

    def __call__(self, naming: str) -> Path:
        if not self.fresh:
            return self.root / f"{self.tag}_{naming}"
        return self.root / f"{self.tag}_{naming}_{time.monotonic_ns()}"


# --- comparisons --------------------------------------------------------------------------------------
def _plain(v: Any, is_json: bool) -> Any:
    if is_json and isinstance(v, str):
        try:
            return json.loads(v)
        except ValueError:
            return v
    return v


def sort_rows(table: pa.Table, json_columns: Iterable[str] = (), drop: Iterable[str] = ()) -> list[dict[str, Any]]:
    jc, dropped = set(json_columns), set(drop)
    out = [{k: _plain(v, k in jc) for k, v in r.items() if k not in dropped} for r in table.to_pylist()]
    return sorted(out, key=lambda r: json.dumps(r, sort_keys=True, default=repr))


def _short(v: Any, n: int = 160) -> str:
    text = repr(v)
    return text if len(text) <= n else text[:n] + "..."


@dataclasses.dataclass
class Outcome:
    status: str  # exact | documented | refused | n/a | FAIL
    text: str = ""

    def cell(self) -> str:
        """As shown in the doc's table."""
        if self.status == "exact":
            return "exact"
        if self.status == "FAIL":
            return "**FAIL**: " + self.text.replace("|", "\\|").replace("\n", " ")
        return f"{self.status}: {self.text}".replace("|", "\\|").replace("\n", " ")


def documented_mapping(mappings: dict[tuple[str, str, str], str], kind: str, truth: pa.DataType,
                       served: pa.DataType) -> str | None:
    for (k, t, s), reason in mappings.items():
        if k in (kind, "*") and t == str(truth) and s == str(served):
            return reason
    return None


def compare_read(kind: str, truth: pa.Table, served: pa.Table, json_columns: Iterable[str],
                 not_null: Iterable[str], mappings: dict[tuple[str, str, str], str],
                 not_null_mapping: str | None = None) -> Outcome:
    """The server's read against the destination's own: column names, Arrow types (or a documented mapping),
    NOT NULL of the stored schema (or ``not_null_mapping``: why this destination kind serves it nullable, as dlt's
    own read does), values."""
    problems: list[str] = []
    notes: list[str] = []
    if sorted(truth.column_names) != sorted(served.column_names):
        return Outcome("FAIL", f"columns differ: dlt {sorted(truth.column_names)} served {sorted(served.column_names)}")
    cast_to: dict[str, pa.DataType] = {}
    for name in truth.column_names:
        t, s = truth.schema.field(name).type, served.schema.field(name).type
        if t.equals(s):
            continue
        reason = documented_mapping(mappings, kind, t, s)
        if reason is None:
            problems.append(f"type of '{name}': dlt {t} served {s}")
        else:
            notes.append(f"'{name}' {t} -> {s} ({reason})")
            cast_to[name] = s
    dropped = [n for n in not_null if n in served.column_names and served.schema.field(n).nullable]
    if dropped and not_null_mapping is None:
        problems.append("NOT NULL in the stored schema, served nullable: " + ", ".join(dropped))
    elif dropped:
        if any(not truth.schema.field(n).nullable for n in dropped):
            problems.append("NOT NULL in dlt's own read, served nullable: " + ", ".join(
                n for n in dropped if not truth.schema.field(n).nullable))
        notes.append(f"NOT NULL of {', '.join(dropped)} served nullable ({not_null_mapping})")
    if not problems:
        if cast_to:
            try:
                truth = truth.select(served.column_names).cast(pa.schema(
                    [pa.field(n, cast_to.get(n, truth.schema.field(n).type)) for n in served.column_names]))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                problems.append(f"documented mapping does not hold for the values: {exc}")
        want, got = sort_rows(truth, json_columns), sort_rows(served, json_columns)
        if not problems and want != got:
            diff = next(((w, g) for w, g in zip(want, got) if w != g), None)
            if len(want) != len(got):
                problems.append(f"row count: dlt {len(want)} served {len(got)}")
            elif diff is not None:
                cols = [k for k in diff[0] if diff[0].get(k) != diff[1].get(k)]
                problems.append("values differ in " + ", ".join(
                    f"'{c}': dlt {_short(diff[0].get(c))} served {_short(diff[1].get(c))}" for c in cols[:3]))
    if problems:
        return Outcome("FAIL", "; ".join(problems))
    if notes:
        return Outcome("documented", "; ".join(notes))
    return Outcome("exact")


HINT_KEYS = ("data_type", "nullable", "precision", "scale", "timezone", "primary_key", "merge_key", "unique",
             "row_key", "parent_key", "root_key", "variant", "hard_delete", "dedup_sort", "x-valid-from",
             "x-valid-to", "x-active-record-timestamp", "x-row-version")
TABLE_KEYS = ("write_disposition", "x-merge-strategy", "schema_contract", "parent", "table_format",
              "x-validity-column-names", "x-active-record-timestamp", "x-row-version-column-name")


def schema_snapshot(schema: Any) -> dict[str, Any]:
    """What a save may not change in the owner's stored schema."""
    return {
        "schema_contract": schema.settings.get("schema_contract"),
        "naming": schema._normalizers_config.get("names") if hasattr(schema, "_normalizers_config") else None,
        "tables": {
            name: {**{k: table.get(k) for k in TABLE_KEYS},
                   "columns": {c: {k: col.get(k) for k in HINT_KEYS if col.get(k) is not None}
                               for c, col in table.get("columns", {}).items()}}
            for name, table in schema.tables.items()},
    }


def snapshot_diff(before: dict[str, Any], after: dict[str, Any], limit: int = 4) -> list[str]:
    out: list[str] = []

    def walk(a: Any, b: Any, path: str) -> None:
        if len(out) >= limit:
            return
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b), key=str):
                if k not in b:
                    out.append(f"{path}{k} removed")
                elif k not in a:
                    out.append(f"{path}{k} added ({_short(b[k], 80)})")
                else:
                    walk(a[k], b[k], f"{path}{k}.")
        elif a != b:
            out.append(f"{path.rstrip('.')}: {_short(a, 60)} -> {_short(b, 60)}")

    walk(before, after, "")
    return out


_CELL_NAME = re.compile(r"\b[Cc]ell\d{3}[^\s:'\"`,;).]*")
_PROBLEM = re.compile(r"; (?=[Cc]ell\d{3}|NOT NULL|type of|table |stored schema|row count|values differ|scd2 table)")
_NUMBERS = re.compile(r"\b\d{6,}(\.\d+)?\b")
_DATASET = re.compile(r"\bmx_\w+?_(snake_case|sql_cs_v1|direct|duck_case|sql_ci_v1)\b")
_VALUE = re.compile(r"\b(Val X|val_x|Val_X)")
_LISTS = re.compile(r"\[('[^\]]*)\]")


def causes(text: str) -> list[str]:
    """A failure's problems with cell, dataset and column names, load ids and table lists generalised, so that
    failures with one cause group together."""
    out = []
    for part in _PROBLEM.split(text):
        part = part.split(". Detail: ")[0].split(" gRPC client debug context")[0]
        part = _CELL_NAME.sub("<table>", part)
        part = _DATASET.sub("<dataset>", part)
        part = _VALUE.sub("<Val X>", part)
        part = _LISTS.sub("[...]", part)
        out.append(_NUMBERS.sub("<n>", part))
    return list(dict.fromkeys(out))


def counts(cells: list[Cell]) -> Counter:
    return Counter(c.kind for c in cells)


if __name__ == "__main__":
    design = generate()
    print(f"{len(design)} cells (seed {SEED}); per destination kind: {dict(counts(design))}")
    print("missing pairs:", coverage_problems(design) or "none")
    for c in design:
        print(c.kind, c.label())
