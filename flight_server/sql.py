"""The read-only SQL sandbox: one SELECT over one dataset's own tables, run where nothing else is.

Two independent walls:

1. **Parse and allow-list** (sqlglot, which dlt already depends on). A statement is accepted only if
   it is a single query (SELECT / WITH / set operation) whose every table reference names a table of
   the dataset; it is rewritten with each reference qualified to the dataset, so the engine never
   resolves a name the caller chose. Table functions (``read_csv``, ``glob`` ...) are refused.

2. **A locked-down engine** (:class:`SqlSandbox`). The query does not run on the destination's
   connection: duckdb allows one configuration per database file per process, and the server's
   shared connection must keep external access because dlt loads files through it, so
   ``enable_external_access=false`` cannot be set there. Instead each query gets a fresh in-memory
   duckdb opened with ``enable_external_access=false``, ``lock_configuration=true``, no extension
   installing/loading, no Python replacement scans and a memory limit. It holds nothing but one view
   per table the query names, each an Arrow C stream opened from the storage adapter's own
   ``reader()`` only when duckdb scans it (``__arrow_c_stream__``; a table scanned twice opens two
   streams), projected to the columns the query uses. Nothing is materialised; the result streams
   out as an Arrow reader. Even a query that slipped past wall 1 could not write the data (the
   sandbox has only read streams), reach files or the network, see another dataset or dlt's
   internal tables (they are not there), or change its own limits. The same path works for every
   destination kind that can produce a reader.

Flight SQL statements are written against the whole project (catalog = project, schema = dataset):
:func:`referenced_datasets` tells which dataset a statement reads, and ``check_query(...,
catalog=project)`` also accepts ``project.dataset.table``.

Limits: ``server.sql_max_rows`` (more rows fail the query), ``server.sql_timeout`` (``interrupt()``
from a timer, covering execution and streaming) and ``server.sql_memory_limit``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping

import duckdb
import pyarrow as pa
import sqlglot
from sqlglot import exp
from sqlglot.optimizer.qualify import qualify
from sqlglot.optimizer.scope import traverse_scope

from flight_server.errors import InvalidRequest, NotFound
from flight_server.masking import mask

if TYPE_CHECKING:
    from flight_server.config import ServerConfig
    from flight_server.storage import Storage

# parsing and analysing cost CPU in proportion to the text: real queries are far shorter than this
MAX_QUERY_CHARS = 100_000
_MAX_PRUNE_NODES = 2_000
_QUERY_TYPES = (exp.Select, exp.Union, exp.Intersect, exp.Except)
_FORBIDDEN_NODES = (exp.Insert, exp.Update, exp.Delete, exp.Create, exp.Drop, exp.Alter, exp.Command, exp.Into)
# functions that reach files, the network, settings or the environment
_FORBIDDEN_FUNCTIONS = {
    "read_csv", "read_csv_auto", "read_parquet", "read_json", "read_json_auto", "read_ndjson", "read_text",
    "read_blob", "parquet_scan", "glob", "getenv", "current_setting", "delta_scan", "iceberg_scan",
    "sniff_csv", "query", "query_table", "duckdb_settings", "duckdb_extensions", "duckdb_secrets",
    "pg_read_file", "pg_ls_dir", "lo_import", "lo_export", "dblink", "postgres_scan", "sqlite_scan",
}


def _function_names(tree: exp.Expression) -> Iterable[str]:
    for node in tree.find_all(exp.Func):
        if isinstance(node, exp.Anonymous):
            yield str(node.name).lower()
        else:
            yield node.sql_name().lower()
            for name in getattr(node, "_sql_names", ()) or ():
                yield name.lower()


@dataclass(frozen=True)
class CheckedQuery:
    """A query that passed the allow-list: its SQL with tables qualified, and what it reads."""

    sql: str
    dataset: str
    # table -> columns the query uses (None: all of them)
    tables: Mapping[str, frozenset[str] | None]


def _parse_one(sql: str, dialect: str, dataset: str | None) -> exp.Expression:
    if len(sql) > MAX_QUERY_CHARS:
        raise InvalidRequest(f"query is {len(sql):,} characters; at most {MAX_QUERY_CHARS:,} allowed", dataset=dataset)
    try:
        statements = [s for s in sqlglot.parse(sql, read=dialect) if s is not None]
    except sqlglot.errors.ParseError as exc:
        raise InvalidRequest(f"SQL does not parse: {str(exc).splitlines()[0]}", dataset=dataset) from None
    except RecursionError:
        raise InvalidRequest("query is nested too deeply", dataset=dataset) from None
    if len(statements) != 1:
        raise InvalidRequest(f"exactly one SQL statement is allowed, got {len(statements)}", dataset=dataset)
    return statements[0]


def referenced_datasets(sql: str, dialect: str = "duckdb") -> tuple[set[str], list[str]]:
    """The schema (dataset) qualifiers a query's table references name, and its unqualified table names.

    CTE names are not table references. Nothing is checked here beyond parsing: the query still goes
    through :func:`check_query` for the dataset chosen.
    """
    tree = _parse_one(sql, dialect, None)
    ctes = {cte.alias_or_name for cte in tree.find_all(exp.CTE)}
    datasets: set[str] = set()
    unqualified: list[str] = []
    for table in tree.find_all(exp.Table):
        schema = table.args.get("db")
        if schema is not None:
            datasets.add(schema.name)
        elif isinstance(table.this, exp.Identifier) and table.name not in ctes:
            unqualified.append(table.name)
    return datasets, unqualified


def sandbox_query(sql: str, dataset: str, tables: Iterable[str], dialect: str = "duckdb",
                  catalog: str | None = None) -> str:
    """Check a query and return it with every table qualified to ``dataset``."""
    return check_query(sql, dataset, {t: None for t in tables}, dialect, catalog).sql


def check_query(sql: str, dataset: str, tables: Mapping[str, Iterable[str] | None], dialect: str = "duckdb",
                catalog: str | None = None) -> CheckedQuery:
    """Check a query against the allow-list; ``tables`` maps each table of the dataset to its columns.

    ``catalog``: a catalog qualifier the caller may write (``catalog.dataset.table``); any other is refused.
    """
    try:
        return _check_query(sql, dataset, tables, dialect, catalog)
    except RecursionError:
        raise InvalidRequest("query is nested too deeply", dataset=dataset) from None


def _check_query(sql: str, dataset: str, tables: Mapping[str, Iterable[str] | None], dialect: str,
                 catalog: str | None) -> CheckedQuery:
    allowed = set(tables)
    tree = _parse_one(sql, dialect, dataset)
    if not isinstance(tree, _QUERY_TYPES):
        raise InvalidRequest(
            f"only SELECT queries are allowed, got {tree.key.upper()}", dataset=dataset
        )
    forbidden = next(iter(tree.find_all(*_FORBIDDEN_NODES)), None)
    if forbidden is not None:
        raise InvalidRequest(f"only SELECT queries are allowed; found {forbidden.key.upper()}", dataset=dataset)
    for name in _function_names(tree):
        if name in _FORBIDDEN_FUNCTIONS:
            raise InvalidRequest(f"function '{name}' is not allowed in a query", dataset=dataset)
    ctes = {cte.alias_or_name for cte in tree.find_all(exp.CTE)}
    for table in tree.find_all(exp.Table):
        if not isinstance(table.this, exp.Identifier):
            raise InvalidRequest(
                f"table expression '{table.sql(dialect)}' is not allowed; query tables of dataset '{dataset}' by name",
                dataset=dataset,
            )
        if catalog is not None and table.args.get("catalog") is not None and table.catalog == catalog:
            table.set("catalog", None)
        if table.args.get("catalog") is not None:
            raise InvalidRequest(f"table '{table.sql(dialect)}' must not name a catalog", dataset=dataset)
        schema = table.args.get("db")
        name = table.name
        if schema is None and name in ctes:
            continue
        if schema is not None and schema.name != dataset:
            raise NotFound(f"Table '{table.sql(dialect)}' is outside dataset '{dataset}'", dataset=dataset, table=name)
        if name not in allowed:
            raise NotFound(
                f"Table '{name}' not found in dataset '{dataset}'; tables: {', '.join(sorted(allowed)) or '(none)'}",
                dataset=dataset,
                table=name,
            )
        table.set("db", exp.to_identifier(dataset, quoted=True))
        table.set("this", exp.to_identifier(name, quoted=True))
    used = {t.name for t in tree.find_all(exp.Table) if t.args.get("db") is not None}
    return CheckedQuery(tree.sql(dialect), dataset, _used_columns(tree, dataset, used, tables, dialect))


def _used_columns(tree: exp.Expression, dataset: str, used: set[str],
                  tables: Mapping[str, Iterable[str] | None], dialect: str) -> dict[str, frozenset[str] | None]:
    """Columns each table contributes, found with sqlglot's qualifier; all columns when in doubt.

    Only an optimisation (the sandbox streams fewer columns): anything this analysis cannot resolve
    for certain falls back to every column, and a column it wrongly left out fails the query at
    bind time instead of changing its result.
    """
    everything: dict[str, frozenset[str] | None] = {t: None for t in used}
    if not used or any(tables.get(t) is None for t in used):
        return everything
    # sqlglot's qualifier is super-linear in the size of the query: big queries simply read every column
    if sum(1 for _ in zip(tree.walk(), range(_MAX_PRUNE_NODES + 1))) > _MAX_PRUNE_NODES:
        return everything
    # a star selects by the view's columns, so a pruned view would change what it expands to
    if any(not isinstance(star.parent, exp.Count) for star in tree.find_all(exp.Star)):
        return everything
    schema = {dataset: {t: {c: "UNKNOWN" for c in tables[t]} for t in used}}  # type: ignore[union-attr]
    try:
        qualified = qualify(tree.copy(), schema=schema, dialect=dialect, validate_qualify_columns=True,
                            quote_identifiers=False)
        # leftover stars (other than count(*)) and COLUMNS(...) select columns by pattern: no pruning
        for star in qualified.find_all(exp.Star):
            if not isinstance(star.parent, exp.Count):
                return everything
        for func in qualified.find_all(exp.Func):
            if func.sql_name().upper() == "COLUMNS" or (isinstance(func, exp.Anonymous) and str(func.name).upper() == "COLUMNS"):
                return everything
        found: dict[str, set[str]] = {t: set() for t in used}
        for scope in traverse_scope(qualified):
            for column in scope.columns:
                source = scope.sources.get(column.table)
                if isinstance(source, exp.Table):
                    found.setdefault(source.name, set()).add(column.name)
                elif source is None:
                    return everything  # e.g. a correlated reference: keep it simple
    except Exception:  # noqa: BLE001 - any doubt: stream every column
        return everything
    return {t: frozenset(cols) for t, cols in found.items() if t in used}


class _TableSource:
    """A table as an Arrow stream that is opened each time duckdb scans it (PyCapsule protocol)."""

    def __init__(self, storage: "Storage", table: str, columns: list[str] | None) -> None:
        self.storage = storage
        self.table = table
        self.columns = columns

    def __arrow_c_schema__(self) -> Any:
        return self.storage.arrow_schema(self.table, self.columns).__arrow_c_schema__()

    def __arrow_c_stream__(self, requested_schema: Any = None) -> Any:
        return self.storage.reader(self.table, self.columns, None).__arrow_c_stream__(requested_schema)


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class SqlSandbox:
    """Runs checked queries on fresh, locked-down in-memory duckdb connections (see module doc)."""

    def __init__(self, max_rows: int = 10_000_000, timeout: float = 120.0, memory_limit: str = "2GB",
                 batch_rows: int = 122_880, threads: int | None = None) -> None:
        self.max_rows = max_rows
        self.timeout = timeout
        self.batch_rows = batch_rows
        self.config: dict[str, Any] = {
            "enable_external_access": False,  # no files, no network, no ATTACH of files, no INSTALL
            "autoinstall_known_extensions": False,
            "autoload_known_extensions": False,
            "allow_community_extensions": False,
            "allow_unsigned_extensions": False,
            "python_enable_replacements": False,  # a name never resolves to a Python variable
            "memory_limit": memory_limit,
            "lock_configuration": True,  # nothing above can be SET back by a query
        }
        if threads:
            self.config["threads"] = threads

    @classmethod
    def from_config(cls, server: "ServerConfig") -> "SqlSandbox":
        return cls(server.sql_max_rows, server.sql_timeout, server.sql_memory_limit, server.batch_rows)

    def _connect(self, storage: "Storage", query: CheckedQuery) -> duckdb.DuckDBPyConnection:
        con = duckdb.connect(":memory:", config=self.config)
        try:
            con.execute(f"CREATE SCHEMA {_quote(query.dataset)}")
            for i, (table, columns) in enumerate(sorted(query.tables.items())):
                names = self._columns(storage, table, columns)
                source = f"__flight_share_source_{i}"
                con.register(source, _TableSource(storage, table, names))
                con.execute(f"CREATE VIEW {_quote(query.dataset)}.{_quote(table)} AS SELECT * FROM {source}")
        except BaseException:
            con.close()
            raise
        return con

    @staticmethod
    def _columns(storage: "Storage", table: str, columns: frozenset[str] | None) -> list[str] | None:
        if columns is None:
            return None
        names = [n for n in storage.arrow_schema(table).names if n in columns]
        # a query using no column (count(*)) still needs rows: stream the first column only
        return names or storage.arrow_schema(table).names[:1]

    def _bind(self, con: duckdb.DuckDBPyConnection, query: CheckedQuery) -> duckdb.DuckDBPyRelation:
        try:
            rel = con.sql(query.sql)
        except duckdb.Error as exc:
            raise _sql_error(exc, query) from None
        if rel is None:  # a statement, not a query (only reachable if the allow-list were bypassed)
            raise InvalidRequest("only SELECT queries are allowed", dataset=query.dataset)
        return rel

    def schema(self, storage: "Storage", query: CheckedQuery) -> pa.Schema:
        """The result schema, from binding the query (no table data is read)."""
        con = self._connect(storage, query)
        try:
            rel = self._bind(con, query)
            try:
                return rel.limit(0).to_arrow_table().schema
            except duckdb.Error as exc:
                raise _sql_error(exc, query) from None
        finally:
            con.close()

    def run(self, storage: "Storage", query: CheckedQuery) -> pa.RecordBatchReader:
        """A streaming reader of the result; limits apply while it is read."""
        con = self._connect(storage, query)
        state = {"timed_out": False}

        def on_timeout() -> None:
            state["timed_out"] = True
            con.interrupt()

        timer = threading.Timer(self.timeout, on_timeout)
        timer.daemon = True
        timer.start()
        try:
            rel = self._bind(con, query)
            reader = rel.to_arrow_reader(self.batch_rows)
        except BaseException as exc:
            timer.cancel()
            con.close()
            if isinstance(exc, duckdb.Error):
                raise _sql_error(exc, query, state["timed_out"], self.timeout) from None
            raise
        return pa.RecordBatchReader.from_batches(reader.schema, self._limited(con, timer, reader, query, state))

    def _limited(self, con: duckdb.DuckDBPyConnection, timer: threading.Timer, reader: pa.RecordBatchReader,
                 query: CheckedQuery, state: dict[str, bool]) -> Iterator[pa.RecordBatch]:
        rows = 0
        try:
            while True:
                try:
                    batch = reader.read_next_batch()
                except StopIteration:
                    return
                except (pa.ArrowException, duckdb.Error, OSError) as exc:
                    raise _wire(_sql_error(exc, query, state["timed_out"], self.timeout)) from None
                rows += batch.num_rows
                if rows > self.max_rows:
                    raise _wire(InvalidRequest(
                        f"query result exceeds the limit of {self.max_rows:,} rows (server.sql_max_rows); "
                        "aggregate or add a LIMIT", dataset=query.dataset))
                yield batch
        finally:
            timer.cancel()
            reader.close()
            con.close()


def _wire(exc: InvalidRequest) -> BaseException:
    # raised inside a stream: pyarrow maps only Python built-ins to statuses there
    from flight_server.errors import to_flight_error

    return to_flight_error(exc)


_ERROR_KINDS: tuple[tuple[type[BaseException], str], ...] = (
    (duckdb.OutOfMemoryException, "query needs more memory than the sandbox allows (server.sql_memory_limit)"),
    (duckdb.PermissionException, "query tried to reach outside the dataset (files, network or settings)"),
)


def _sql_error(exc: BaseException, query: CheckedQuery, timed_out: bool = False, timeout: float = 0) -> InvalidRequest:
    """A clear user-facing error for something the engine refused."""
    if timed_out or isinstance(exc, duckdb.InterruptException):
        return InvalidRequest(f"query exceeded the time limit of {timeout:g} s (server.sql_timeout)", dataset=query.dataset)
    for kind, text in _ERROR_KINDS:
        if isinstance(exc, kind):
            return InvalidRequest(text, dataset=query.dataset)
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "Out of Memory" in first:
        return InvalidRequest(_ERROR_KINDS[0][1], dataset=query.dataset)
    return InvalidRequest(f"SQL error: {mask(first)[:500]}", dataset=query.dataset)
