"""The read-only SQL sandbox: one SELECT over one dataset's own tables, run where nothing else is.

Two independent walls:

1. **Parse and allow-list** (sqlglot, which dlt already depends on). A statement is accepted only if
   it is a single query (SELECT / WITH / set operation) whose every table reference names a table of
   the dataset; it is rewritten with each reference qualified to the dataset, so the engine never
   resolves a name the caller chose. Table functions (``read_csv``, ``glob`` ...) are refused.

2. **A locked-down engine in a killable process** (:class:`SqlSandbox`). The query does not run on
   the destination's connection (that one keeps external access: dlt loads files through it), nor in
   the server process at all: duckdb folds constant expressions while it binds and plans
   (``range(1e8)``, ``repeat(...)``), outside its ``memory_limit`` and before ``interrupt()`` can act,
   and a single scalar call (``levenshtein`` of long strings) never looks at interrupts. So each
   query -- its bind for GetFlightInfo / GetSchema as much as its run for DoGet -- goes to a worker
   process (:mod:`flight_server.domain.sql_worker`) from a warm pool: duckdb already imported, an OS memory
   limit (``RLIMIT_DATA``: ``server.sql_memory_limit`` plus a fixed margin), an empty environment,
   no files. There an in-memory duckdb, opened once per worker with ``enable_external_access=false``,
   ``lock_configuration=true``, no temp directory (nothing spills; duckdb allows its temp directory
   even with external access off), no extension installing/loading, no Python replacement scans
   and ``memory_limit``, runs each query on its own cursor inside one transaction that is rolled
   back at its end, holding nothing but one view per table the query names (so the next query, maybe
   another user's, finds the database as the worker started it). Each view is an Arrow
   stream the server opens from the storage adapter's own ``reader()`` only when duckdb scans it,
   projected to the columns the query uses, and sends down a pipe; the result comes back as an
   Arrow IPC stream. The server owns the clock: at ``server.sql_timeout``, or when the caller
   cancels or goes away while waiting, it kills the worker (SIGKILL: whatever phase it is in) and a
   fresh one replaces it. Even a query that slipped past wall 1 could not write the data (the
   worker has only read streams), reach files or the network, see another dataset or dlt's
   internal tables (they are not there), change its own limits, or take the server's memory.

Flight SQL statements are written against the whole project (catalog = project, schema = dataset):
:func:`referenced_datasets` tells which dataset a statement reads, and ``check_query(...,
catalog=project)`` also accepts ``project.dataset.table``.

Limits: ``server.sql_max_rows`` (more rows fail the query), ``server.sql_timeout`` (each call: the
bind of GetFlightInfo / GetSchema; the run of DoGet to its last batch; counted from when the query has its
worker) and ``server.sql_memory_limit`` (per query; at most :data:`SANDBOX_WORKERS` queries run at once).
The workers and the parser are shared fairly (:mod:`flight_server.domain.fair`, issue 22): one user holds at
most ``server.sql_per_user`` workers and one analysis at once; waiting queries are served round-robin by
user and wait at most ``server.sql_timeout``, then are refused "busy" (UNAVAILABLE), never "exceeded the
time limit". A
row-wise query (:func:`row_wise_table`) may run as several independent queries, one per partition of its
table (``SqlSandbox.run(..., partition=...)``, Flight SQL's partitioned results): the limits hold per partition.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol

import pyarrow as pa
import pyarrow.ipc
import sqlglot
from sqlglot import exp
from sqlglot.optimizer.qualify import qualify
from sqlglot.optimizer.scope import traverse_scope

from flight_server.domain.config import ServerConfig, size_bytes
from flight_server.domain.errors import (
    Cancelled,
    InvalidRequest,
    NotFound,
    SqlLimitExceeded,
    SqlSyntaxError,
    Unavailable,
)
from flight_server.domain.fair import FairShare
from flight_server.domain.masking import mask
from flight_server.domain.pushdown import NOTHING, Pushdown, pushdown
from flight_server.domain.sql_worker import END, MARK, pipe, recv_frame, send_frame
from flight_server.domain.storage import Storage

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
    # the worker's transaction counter: a worker serves many users' queries in turn (review finding)
    "txid_current",
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
    # filters and row limits the storage adapter may apply while streaming a table (domain/pushdown.py)
    pushdown: Pushdown = NOTHING


# Parsing runs in the server process (the allow-list decides what reaches a worker at all). Its time is
# bounded by MAX_QUERY_CHARS (~2 s at most for 100,000 characters); its memory (sqlglot's tree, up to
# ~100 MB for the longest query) by letting only this many analyses run at once - and, so that one user's
# long queries cannot keep another's ``SELECT 1`` waiting (issue 22), at most one of them per user, the
# waiting ones served round-robin by user (domain/fair.py), a few waiting per user at most.
MAX_CONCURRENT_ANALYSES = 2
ANALYSES_PER_USER = 1
ANALYSES_WAITING_PER_USER = 4
_ANALYSIS_WAIT_SECONDS = 30.0
_ANALYSES = FairShare(MAX_CONCURRENT_ANALYSES, ANALYSES_PER_USER, ANALYSES_WAITING_PER_USER,
                      "query analysis", "analyses per user", "query analyses")


@contextlib.contextmanager
def _analysing(dataset: str | None, user: str | None) -> Iterator[None]:
    key = user or ""
    _ANALYSES.acquire(key, _ANALYSIS_WAIT_SECONDS, dataset=dataset)
    try:
        yield
    finally:
        _ANALYSES.release(key)


def _parse_one(sql: str, dialect: str, dataset: str | None) -> exp.Expression:
    if len(sql) > MAX_QUERY_CHARS:
        raise InvalidRequest(f"query is {len(sql):,} characters; at most {MAX_QUERY_CHARS:,} allowed", dataset=dataset)
    try:
        statements = [s for s in sqlglot.parse(sql, read=dialect) if s is not None]
    except sqlglot.errors.ParseError as exc:
        error = exc.errors[0] if exc.errors else {}
        raise SqlSyntaxError(syntax_error(exc), dataset=dataset, line=error.get("line"), column=error.get("col"),
                             near=str(error.get("highlight") or "")[:80]) from None
    except sqlglot.errors.TokenError as exc:
        raise SqlSyntaxError(_token_error(exc), dataset=dataset) from None
    except RecursionError:
        raise InvalidRequest("query is nested too deeply", dataset=dataset) from None
    if len(statements) != 1:
        raise InvalidRequest(f"exactly one SQL statement is allowed, got {len(statements)}", dataset=dataset)
    tree = statements[0]
    # What runs is generated from this tree, so it must hold nothing the checks do not see: sqlglot keeps
    # comments and writes a ``--`` comment back as ``/* ... */``, and ``-- */ PAYLOAD /*`` then becomes live
    # SQL in the text the engine runs (issue 22). Comments are dropped here, once, for every later use.
    for node in tree.walk():
        node.comments = None
    return tree


# sqlglot's own descriptions, in SQL terms; "Required keyword: 'expression' missing for <class
# 'sqlglot.expressions.Mul'>" names the parser's classes, not anything the user wrote
_SYNTAX_HINTS: tuple[tuple[str, str], ...] = (
    ("Required keyword", "something is missing here (an operand, a name or a clause's body)"),
    ("Expecting )", "a ')' is missing"),
    ("Expected table name", "a table name is missing"),
    ("Invalid expression / Unexpected token", "unexpected word or symbol"),
)


def syntax_error(exc: "sqlglot.errors.ParseError") -> str:
    """``syntax error near '*' at line 1, column 10: ...`` from sqlglot's structured error."""
    error = exc.errors[0] if exc.errors else {}
    near = str(error.get("highlight") or "").strip()[:80]
    where = f" near '{near}'" if near else " at the end of the query"
    if error.get("line"):
        where += f" at line {error['line']}, column {error.get('col', 0)}"
    description = str(error.get("description") or "")
    before = str(error.get("start_context") or "").split()
    if near and before and description.startswith("Invalid expression / Unexpected token"):
        # the word before is often the mistake ("SELECT * FORM t": FORM reads as an alias, t is unexpected)
        where += f" (after '{before[-1][-40:]}')"
    hint = next((text for prefix, text in _SYNTAX_HINTS if description.startswith(prefix)), None)
    if hint is None:
        hint = description if description and "<class" not in description and "sqlglot" not in description else ""
    return f"syntax error{where}" + (f": {hint}" if hint else "")


# duckdb names the part of itself that failed ("Binder Error: ..."): the rest is the SQL-level reason
_ENGINE_PREFIX = re.compile(r"^(?:Binder|Catalog|Conversion|Parser|Invalid Input|Out of Range|Type Mismatch|"
                            r"Not implemented|Constraint|Dependency|Invalid Type|Serialization) Error: ")


def engine_error_text(message: str) -> str:
    """duckdb's error in SQL terms: its first line, without the name of the engine's component."""
    first = message.strip().splitlines()[0] if message.strip() else message
    return _ENGINE_PREFIX.sub("", first).rstrip("!")


def _token_error(exc: "sqlglot.errors.TokenError") -> str:
    # sqlglot says "Error tokenizing '<the text up to the problem>'": keep only the end of that text
    text = str(exc)
    context = text.split("Error tokenizing '", 1)[-1].rstrip("'")[-40:]
    return f"syntax error near '{context}': an unterminated quote, quoted name or comment"


def table_references(tree: exp.Expression) -> list[exp.Table]:
    """The table references of a query: every ``exp.Table`` except those that name a CTE *in scope*.

    Resolved by scope, so a CTE defined in one subquery does not hide a table of the same name
    elsewhere (``SELECT * FROM (WITH pg_settings AS (...) SELECT ...) t, pg_settings`` must check the
    outer ``pg_settings``). Anything not placed for certain stays a table reference and meets the
    allow-list: a doubt refuses, it never admits.

    Not sqlglot's ``traverse_scope``: it copies every enclosing scope's sources into each scope, which
    for a query of 4,000 CTEs took 1.2 s and 470 MB. Walking up from each table to the ``WITH``
    clauses around it costs the nesting depth (bounded: deeper queries are refused as too nested).
    """
    names: dict[int, dict[str, int]] = {}  # id(WITH) -> CTE name -> position of its first definition
    return [t for t in tree.find_all(exp.Table) if not _names_cte_in_scope(t, names)]


def _cte_names(with_: exp.With, cache: dict[int, dict[str, int]]) -> dict[str, int]:
    names = cache.get(id(with_))
    if names is None:
        names = cache[id(with_)] = {}
        for i, cte in enumerate(with_.expressions):
            names.setdefault(cte.alias_or_name, i)
    return names


def _names_cte_in_scope(table: exp.Table, cache: dict[int, dict[str, int]]) -> bool:
    if table.args.get("db") is not None or table.args.get("catalog") is not None \
            or not isinstance(table.this, exp.Identifier):
        return False
    name = table.name
    child: exp.Expression = table
    node = table.parent
    while node is not None:
        if isinstance(node, exp.With):
            # inside the body of one CTE: the CTEs before it are visible (and itself, if RECURSIVE)
            position = _cte_names(node, cache).get(name)
            index = child.index if isinstance(child, exp.CTE) else None
            if position is not None and index is not None and (
                    position < index or (position == index and node.args.get("recursive"))):
                return True
        else:
            with_ = node.args.get("with_")
            # the body of a query with a WITH clause: all of its CTEs are visible
            if isinstance(with_, exp.With) and child is not with_ and name in _cte_names(with_, cache):
                return True
        child, node = node, node.parent
    return False


def parse_statement(sql: str, dialect: str = "duckdb", *, user: str | None = None) -> exp.Expression:
    """The one statement of ``sql``, parsed once per request: :func:`referenced_datasets`,
    :func:`parameter_count` and :func:`check_query` take the tree too (parsing is the costly part of
    analysing a long statement, and runs in the server process). ``user``: the caller, for the fair share
    of the parser (one analysis per user at a time)."""
    with _analysing(None, user):
        return _parse_one(sql, dialect, None)


def referenced_datasets(sql: "str | exp.Expression", dialect: str = "duckdb", *,
                        user: str | None = None) -> tuple[set[str], list[str]]:
    """The schema (dataset) qualifiers a query's table references name, and its unqualified table names.

    CTE names are not table references. Nothing is checked here beyond parsing: the query still goes
    through :func:`check_query` for the dataset chosen.
    """
    with _analysing(None, user):
        return _referenced_datasets(sql, dialect)


#: bound values a prepared statement may carry (they travel inside its handle): rows and Arrow IPC bytes
MAX_PARAMETER_ROWS = 1_000
MAX_PARAMETER_BYTES = 1 << 20
_NUMBERED = re.compile(r"^\$(\d+)$")


def parameter_count(sql: "str | exp.Expression", dialect: str = "duckdb", *, user: str | None = None) -> int:
    """How many values a statement binds: its ``?`` placeholders, or the highest ``$n``.

    Named parameters (``$name``) and a mix of ``?`` and ``$n`` are refused (values bind by position).
    """
    if isinstance(sql, exp.Expression):
        tree = sql
    else:
        with _analysing(None, user):
            tree = _parse_one(sql, dialect, None)
    marks = [node.sql(dialect) for node in tree.find_all(exp.Placeholder, exp.Parameter)]
    numbered = [int(m.group(1)) for m in map(_NUMBERED.match, marks) if m]
    anonymous = sum(1 for mark in marks if mark == "?")
    if len(numbered) + anonymous != len(marks):
        named = next(mark for mark in marks if mark != "?" and not _NUMBERED.match(mark))
        raise InvalidRequest(f"parameter {named[:40]} is not supported; write parameters as ? or $1, $2, ...")
    if numbered and anonymous:
        raise InvalidRequest("write parameters either all as ? or all as $1, $2, ..., not both")
    return max(numbered) if numbered else anonymous


def check_parameters(values: pa.Table, count: int) -> pa.Table:
    """Bound values for a statement with ``count`` parameters: one column per parameter, one row per execution."""
    if values.num_columns != count:
        raise InvalidRequest(f"the statement has {count} parameter(s); {values.num_columns} value(s) were bound")
    if values.num_rows == 0:
        raise InvalidRequest("no values were bound: bind one row of values per execution")
    if values.num_rows > MAX_PARAMETER_ROWS:
        raise InvalidRequest(f"{values.num_rows:,} rows of values were bound; at most {MAX_PARAMETER_ROWS:,} "
                             "executions per statement")
    if values.nbytes > MAX_PARAMETER_BYTES:
        raise InvalidRequest(f"the bound values take {values.nbytes:,} bytes; at most {MAX_PARAMETER_BYTES:,} allowed")
    for position, field in enumerate(values.schema, 1):
        odd = _unbindable(field.type)
        if odd is not None:
            raise InvalidRequest(f"parameter ${position} ({field.name!r}) has type {field.type}"
                                 f"{'' if odd == field.type else f' ({odd} inside)'}, which cannot be bound as it is; "
                                 "bind numbers, strings, booleans, binary, decimals of up to 38 digits, dates, times, "
                                 "timestamps, or lists/structs of them")
        try:  # the worker binds them as Python values: a value Python cannot hold is refused here, in plain words
            values.column(position - 1).to_pylist()
        except (ValueError, OverflowError, pa.ArrowException, LookupError) as exc:
            why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if isinstance(exc, LookupError):  # zoneinfo's: the timestamp's time zone is not one it knows
                why = f"unknown time zone {why}"
            raise InvalidRequest(f"parameter ${position} ({field.name!r}, {field.type}) has a value that cannot be "
                                 f"bound: {why}") from None
    return values


def _unbindable(dtype: pa.DataType) -> pa.DataType | None:
    """The (nested) type duckdb would not get back as sent (a map turns into pairs, a 40-digit decimal into
    a double), or that cannot be bound at all; None: fine. A union's members are checked like any child."""
    if (pa.types.is_dictionary(dtype) or isinstance(dtype, pa.ExtensionType) or pa.types.is_map(dtype)
            or pa.types.is_run_end_encoded(dtype) or (pa.types.is_decimal(dtype) and dtype.precision > 38)):
        return dtype
    # a union binds as its values (flightsql-dbapi sends every parameter as a dense union of scalar types)
    if pa.types.is_nested(dtype):
        for i in range(dtype.num_fields):
            inner = _unbindable(dtype.field(i).type)
            if inner is not None:
                return inner
    return None


def parameter_schema(count: int) -> pa.Schema:
    """The parameters of a statement as Flight SQL describes them: ``$1``... of unknown (null) type."""
    return pa.schema([pa.field(f"${i}", pa.null()) for i in range(1, count + 1)])


def _referenced_datasets(sql: "str | exp.Expression", dialect: str) -> tuple[set[str], list[str]]:
    tree = sql if isinstance(sql, exp.Expression) else _parse_one(sql, dialect, None)
    datasets: set[str] = set()
    unqualified: list[str] = []
    try:
        tables = table_references(tree)
    except RecursionError:
        raise InvalidRequest("query is nested too deeply") from None
    for table in tables:
        schema = table.args.get("db")
        if schema is not None:
            datasets.add(schema.name)
        elif isinstance(table.this, exp.Identifier):
            unqualified.append(table.name)
    return datasets, unqualified


def check_query(sql: "str | exp.Expression", dataset: str, tables: Mapping[str, Iterable[str] | None],
                dialect: str = "duckdb", catalog: str | None = None, *, user: str | None = None) -> CheckedQuery:
    """Check a query against the allow-list; ``tables`` maps each table of the dataset to its columns.

    ``sql``: the text, or its tree from :func:`parse_statement` (which this rewrites: pass it last).
    ``catalog``: a catalog qualifier the caller may write (``catalog.dataset.table``); any other is refused.
    ``user``: the caller, for the fair share of the parser (:data:`ANALYSES_PER_USER`).
    """
    with _analysing(dataset, user):
        try:
            return _check_query(sql, dataset, tables, dialect, catalog)
        except RecursionError:
            raise InvalidRequest("query is nested too deeply", dataset=dataset) from None


def _check_query(sql: "str | exp.Expression", dataset: str, tables: Mapping[str, Iterable[str] | None], dialect: str,
                 catalog: str | None) -> CheckedQuery:
    allowed = set(tables)
    tree = sql if isinstance(sql, exp.Expression) else _parse_one(sql, dialect, dataset)
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
    for table in table_references(tree):
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
    try:
        pushed = pushdown(tree, tables)
    except Exception:  # noqa: BLE001 - only an optimisation: any doubt, the adapter streams everything
        pushed = NOTHING
    return CheckedQuery(tree.sql(dialect), dataset, _used_columns(tree, dataset, used, tables, dialect), pushed)


def case_sensitive(dialect: str) -> str:
    """``dialect`` with names resolved as written: dlt's naming conventions ``sql_cs_v1``, ``direct`` and
    ``duck_case`` store ``Customers.FullName``, and sqlglot's duckdb dialect would fold it to
    ``fullname`` (which then names no stored column, or the wrong one of ``FullName`` and ``fullname``).
    A name written in another case than stored does not resolve here: callers then keep every column
    (the sandbox) or the sandbox (the warehouse), and duckdb resolves it as it does."""
    return f"{dialect}, normalization_strategy = case_sensitive"


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
        qualified = qualify(tree.copy(), schema=schema, dialect=case_sensitive(dialect), validate_qualify_columns=True,
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


# --- which queries may run as several endpoints (Flight SQL's partitioned results) ------------------------

# duckdb's aggregate functions (``duckdb_functions()``, function_type 'aggregate', duckdb 1.5) and its
# macros that call one: any of them makes a query's answer depend on rows of other partitions.
# tests/test_sql_partitions.py checks this list against the duckdb that is installed.
DUCKDB_AGGREGATES = frozenset("""
    any_value approx_count_distinct approx_quantile approx_top_k arbitrary arg_max arg_max_null
    arg_max_nulls_last arg_min arg_min_null arg_min_nulls_last argmax argmin array_agg avg bit_and bit_or
    bit_xor bitstring_agg bool_and bool_or corr count count_if count_star countif covar_pop covar_samp
    cume_dist dense_rank entropy favg fill first first_value fsum group_concat histogram histogram_exact
    kahan_sum kurtosis kurtosis_pop lag last last_value lead list listagg mad max max_by mean median min
    min_by mode nth_value ntile percent_rank product quantile quantile_cont quantile_disc rank rank_dense
    regr_avgx regr_avgy regr_count regr_intercept regr_r2 regr_slope regr_sxx regr_sxy regr_syy
    reservoir_quantile row_number sem skewness stddev stddev_pop stddev_samp string_agg sum sum_no_overflow
    sumkahan var_pop var_samp variance
    geomean geometric_mean json_group_array json_group_object json_group_structure weighted_avg wavg
""".split())
# set-returning calls in a select list (their output rows are not one per input row): left to one stream
_GENERATORS = frozenset({"unnest", "explode", "posexplode", "generate_subscripts", "json_each", "json_tree"})
# the parts of a SELECT a row-wise query may have (anything else set: one endpoint)
_ROW_WISE_SELECT_ARGS = frozenset({"expressions", "from_", "where"})
_ROW_WISE_TABLE_ARGS = frozenset({"this", "db", "catalog", "alias"})


def row_wise_table(tree: exp.Expression) -> str | None:
    """The one table a query reads row by row, or None.

    A query is row-wise when its answer over a table is the union of its answers over any split of
    the table's rows: a plain ``SELECT <expressions> FROM <one table> [WHERE <condition>]`` with no
    GROUP BY / HAVING / aggregate / window / QUALIFY / DISTINCT / ORDER BY / LIMIT / OFFSET / sample /
    set operation / CTE / join / pivot, no nested SELECT anywhere (a scalar subquery would read the
    whole table in every part), and no set-returning call (``unnest``). Row-wise functions are fine.
    Such a query may run as several endpoints, each over one partition of the table (Flight SQL's
    ``adbc_execute_partitions``). Conservative: any doubt answers None (one endpoint, as before).

    ``tree``: a statement's tree, checked or not (a checked tree names ``"dataset"."table"``).
    """
    try:
        return _row_wise_table(tree)
    except RecursionError:
        return None


def _row_wise_table(tree: exp.Expression) -> str | None:
    if type(tree) is not exp.Select:
        return None
    if any(value not in (None, False, [], "") for key, value in tree.args.items() if key not in _ROW_WISE_SELECT_ARGS):
        return None
    source = tree.args.get("from_")
    if not isinstance(source, exp.From) or type(source.this) is not exp.Table:
        return None
    table = source.this
    if not isinstance(table.this, exp.Identifier):
        return None
    if any(value not in (None, False, [], "") for key, value in table.args.items() if key not in _ROW_WISE_TABLE_ARGS):
        return None
    alias = table.args.get("alias")
    if alias is not None and (not isinstance(alias, exp.TableAlias) or alias.args.get("columns")):
        return None  # a column list renames by position: fine in itself, but nothing gains from allowing it
    if not tree.expressions:
        return None
    for node in tree.walk():
        if node is tree:
            continue
        if isinstance(node, (exp.Query, exp.Subquery, exp.Exists, exp.AggFunc, exp.Window, exp.UDTF, exp.Table,
                             exp.WindowSpec, exp.With, exp.CTE, exp.Lateral, exp.Join, exp.TableSample)) \
                and node is not table:
            return None
    for name in _function_names(tree):
        if name in DUCKDB_AGGREGATES or name in _GENERATORS:
            return None
    return table.name


# --- the locked-down engine: warm worker processes (flight_server/domain/sql_worker.py) ------------------------

#: queries that run at once, each in its own worker process (more wait for a free one); the server's memory
#: for SQL is bounded by this many times server.sql_memory_limit
SANDBOX_WORKERS = 4
#: the default of server.sql_per_user: the workers one user may hold at once (issue 22: one user's four slow
#: queries held every worker, and everyone else's ``SELECT 1`` failed); the others stay for other users
SQL_PER_USER = -(-SANDBOX_WORKERS // 2)
#: a user's queries that may wait for a worker at once (each holds a server thread); more are refused "busy"
SQL_WAITING_PER_USER = 8
#: idle workers kept started (duckdb imported) so a query does not wait for a process to start; a worker
#: whose query ended cleanly goes back to the idle ones (at most SANDBOX_WORKERS of them)
WARM_WORKERS = 2
#: result schemas remembered by SqlSandbox.schema (least recently used go first)
SCHEMA_MEMO_ENTRIES = 1024
SCHEMA_MEMO_MAX_FIELDS = 256  # wider results are bound again each time (the memo stays a few MB at most)
#: a worker is replaced after this many queries (each query runs in its own transaction, rolled back;
#: this only bounds drift)
MAX_QUERIES_PER_WORKER = 500
#: a worker that holds more than this after its query (allocators keep freed memory) is replaced, so idle
#: workers hold little: the server's SQL memory stays within SANDBOX_WORKERS x (limit + margin + this)
IDLE_WORKER_RSS = 256 << 20
# how often a waiting call checks its deadline and whether its caller cancelled
_POLL_SECONDS = 0.05
#: a result stream whose client reads nothing for this long (at most half server.sql_timeout) is ended and its
#: worker freed: a client that opens streams and goes idle must not hold the workers every user shares
SQL_IDLE_SECONDS = 15.0
_BOOT = ("import sys; sys.path.insert(0, sys.argv[1]); from flight_server.domain.sql_worker import main; "
         "main(sys.argv[2:])")
_ROOT = str(Path(__file__).resolve().parents[2])  # the folder that holds flight_server/

log = logging.getLogger("flight_share.server")
_POOLS: dict[tuple[int, int, int], "WorkerPool"] = {}
_POOLS_LOCK = threading.Lock()



class _Spawner:
    """Starts every worker from one thread that lives as long as the server process.

    Workers ask the kernel for SIGKILL when their parent goes (``PR_SET_PDEATHSIG``), and Linux sends
    it when the *thread* that forked them ends: a worker forked by a short-lived thread would die
    with that thread.
    """

    def __init__(self) -> None:
        self._requests: "queue.Queue[tuple[list[str], int, Future[subprocess.Popen]]]" = queue.Queue()
        threading.Thread(target=self._run, name="sql-worker-spawner", daemon=True).start()

    def _run(self) -> None:
        while True:
            args, fd, answer = self._requests.get()
            try:
                answer.set_result(subprocess.Popen(
                    args, pass_fds=[fd], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL, cwd="/", env={"PATH": os.defpath, "LANG": "C.UTF-8"}))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                answer.set_exception(exc)

    def popen(self, args: list[str], fd: int) -> subprocess.Popen:
        answer: "Future[subprocess.Popen]" = Future()
        self._requests.put((args, fd, answer))
        return answer.result()


_SPAWNER: _Spawner | None = None


def _spawner() -> _Spawner:
    global _SPAWNER
    with _POOLS_LOCK:
        if _SPAWNER is None:
            _SPAWNER = _Spawner()
        return _SPAWNER


class _Worker:
    """One sandbox worker process and the thread that serves its requests for table data."""

    def __init__(self, memory_bytes: int, threads: int) -> None:
        ours, theirs = socket.socketpair()
        try:
            self.proc = _spawner().popen(
                [sys.executable, "-c", _BOOT, _ROOT, str(theirs.fileno()), str(memory_bytes), str(threads)],
                theirs.fileno())
        finally:
            theirs.close()
        self.sock = ours
        self.ready = threading.Event()
        self.dead = False
        self.was_ready = False
        self.queries = 0
        self.job: _Job | None = None
        self.user: str | None = None  # whose query holds it (its pool slot is that user's)
        threading.Thread(target=self._serve, name=f"sql-worker-{self.proc.pid}", daemon=True).start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _serve(self) -> None:
        try:
            while True:
                message, fds = recv_frame(self.sock)
                if "ready" in message:
                    self.was_ready = True
                    self.ready.set()
                    continue
                job = self.job
                if "open" in message and fds and job is not None:
                    threading.Thread(target=job.feed, args=(int(message["open"]), fds[0]), daemon=True).start()
                    fds = fds[1:]
                for fd in fds:
                    os.close(fd)
        except (EOFError, OSError, ValueError):
            pass
        finally:
            self.dead = True
            self.ready.set()
            self.kill()
            code = self.proc.wait()
            self.sock.close()
            if not self.was_ready:
                log.error("a SQL sandbox worker exited before it was ready (%s)", _exit_text(code))

    def kill(self) -> None:
        """End the process now (whatever it is doing: binding, planning, executing, streaming)."""
        self.dead = True
        if self.proc.returncode is None:
            try:
                self.proc.kill()
            except ProcessLookupError:
                pass
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class WorkerPool:
    """Warm sandbox workers: at most :data:`SANDBOX_WORKERS` busy, :data:`WARM_WORKERS` kept idle.

    The busy ones are shared fairly (:class:`~flight_server.domain.fair.FairShare`): one user holds at most
    ``per_user`` at once, and a freed worker goes to the next user in turn, not to the user with most
    queries waiting."""

    def __init__(self, memory_bytes: int, threads: int, size: int = SANDBOX_WORKERS, warm: int = WARM_WORKERS,
                 per_user: int = SQL_PER_USER) -> None:
        self.memory_bytes, self.threads, self.warm = memory_bytes, threads, warm
        self._slots = FairShare(size, per_user, SQL_WAITING_PER_USER, "SQL query", "server.sql_per_user",
                                "SQL queries")
        self._lock = threading.Lock()
        self._idle: list[_Worker] = []
        self._starting = 0
        self.closed = False

    def fill(self) -> None:
        """Start workers in the background until :data:`WARM_WORKERS` are idle or starting."""
        with self._lock:
            missing = self.warm - len(self._idle) - self._starting
            self._starting += max(missing, 0)
        for _ in range(max(missing, 0)):
            threading.Thread(target=self._start_one, daemon=True).start()

    def _start_one(self) -> None:
        worker = None
        try:
            worker = _Worker(self.memory_bytes, self.threads)
            worker.ready.wait(60)
        except OSError:
            log.exception("could not start a SQL sandbox worker")
        finally:
            with self._lock:
                self._starting -= 1
                if worker is not None and not worker.dead and worker.ready.is_set() and not self.closed:
                    self._idle.append(worker)
                    worker = None
            if worker is not None:
                worker.kill()

    def stats(self) -> dict[str, int]:
        """Queries running in a worker, queries waiting for one, users doing either."""
        return self._slots.stats()

    def acquire(self, user: str, wait: float, cancelled: Callable[[], bool] | None = None,
                dataset: str | None = None) -> _Worker:
        """A ready worker for one query of ``user``, after waiting at most ``wait`` s for a free one (and for
        it to start); the wait is not the query's time: its clock starts once it has the worker."""
        self._slots.acquire(user, wait, cancelled, dataset)
        deadline = time.monotonic() + wait
        try:
            for _attempt in range(3):  # an idle worker may have died since (the kernel, a crash): take another
                worker = self._take_idle() or _Worker(self.memory_bytes, self.threads)  # none warm: start one
                self.fill()
                if not worker.ready.wait(max(deadline - time.monotonic(), 0)):
                    worker.kill()
                    raise Unavailable(f"busy: no SQL sandbox process could be started within {wait:g} s; retry",
                                      dataset=dataset)
                if not worker.dead:
                    worker.user = user
                    return worker
            raise Unavailable("the SQL sandbox could not start; see the server log")
        except BaseException:
            self._slots.release(user)
            raise

    def _take_idle(self) -> _Worker | None:
        with self._lock:
            while self._idle:
                worker = self._idle.pop()
                if not worker.dead:
                    return worker
                worker.kill()
        return None

    def release(self, worker: _Worker, reuse: bool) -> None:
        worker.job = None
        user, worker.user = worker.user, None
        worker.queries += 1
        keep = reuse and not worker.dead and not self.closed and worker.queries < MAX_QUERIES_PER_WORKER \
            and _rss(worker.pid) <= IDLE_WORKER_RSS
        if keep:
            with self._lock:
                keep = len(self._idle) < SANDBOX_WORKERS
                if keep:
                    self._idle.append(worker)
        if not keep:
            worker.kill()
        if user is not None:
            self._slots.release(user)
        if not keep and not self.closed:
            self.fill()

    def close(self) -> None:
        self.closed = True
        with self._lock:
            idle, self._idle = self._idle, []
        for worker in idle:
            worker.kill()




def _pool(memory_bytes: int, threads: int, per_user: int = SQL_PER_USER) -> WorkerPool:
    """One pool per limit per process (tests make many sandboxes with the same settings)."""
    with _POOLS_LOCK:
        pool = _POOLS.get((memory_bytes, threads, per_user))
        if pool is None or pool.closed:
            pool = _POOLS[(memory_bytes, threads, per_user)] = WorkerPool(memory_bytes, threads, per_user=per_user)
        return pool


class _Job:
    """One query on one worker: its deadline, its caller's cancellation, the table data it asks for."""

    def __init__(self, sandbox: "SqlSandbox", storage: "Storage", query: CheckedQuery, op: str,
                 cancelled: Callable[[], bool] | None, parameters: pa.Table | None = None,
                 partition: "TablePartition | None" = None, user: str | None = None) -> None:
        self.sandbox, self.storage, self.query, self.op = sandbox, storage, query, op
        self.parameters = parameters
        self.partition = partition
        self.cancelled = cancelled
        self.idle_limit = min(SQL_IDLE_SECONDS, sandbox.timeout / 2)
        self.last_read = time.monotonic()  # when the caller last asked for a batch (see _watch)
        self.lock = threading.Lock()
        self.waiting = False  # the caller's thread is blocked on the worker (only then is its context polled)
        self.outcome: str | None = None  # "timeout" | "cancelled": why the server ended the worker
        self.source_error: BaseException | None = None
        self.done = False
        self.tables = sorted(query.tables.items())
        self.columns = [sandbox._columns(storage, t, c) for t, c in self.tables]
        self.pool = sandbox.pool
        # waiting for a worker is bounded by the same number of seconds, but is not the query's time: a query
        # that waited (others' queries held the workers) is refused "busy", never "exceeded the time limit"
        self.worker = self.pool.acquire(user or "", sandbox.timeout, cancelled, query.dataset)
        self.deadline = time.monotonic() + sandbox.timeout  # the query's own time starts with its worker
        self.last_read = time.monotonic()
        self.worker.job = self
        try:
            self.reader = self._send()
        except BaseException:
            self.finish(clean=False)
            raise

    def _send(self) -> pa.RecordBatchReader:
        schemas = [base64.b64encode(self.storage.arrow_schema(t, cols).serialize().to_pybytes()).decode()
                   for (t, _), cols in zip(self.tables, self.columns)]
        request = {"op": self.op, "sql": self.query.sql, "dataset": self.query.dataset,
                   "tables": [[t, s] for (t, _), s in zip(self.tables, schemas)],
                   "max_rows": self.sandbox.max_rows, "batch_rows": self.sandbox.batch_rows}
        if self.parameters is not None:
            sink = pa.BufferOutputStream()
            with pa.ipc.new_stream(sink, self.parameters.schema) as writer:
                writer.write_table(self.parameters)
            request["parameters"] = base64.b64encode(sink.getvalue().to_pybytes()).decode()
        r, w = pipe()
        try:
            send_frame(self.worker.sock, request, [w])
        except OSError:
            os.close(r)
            raise
        finally:
            os.close(w)
        self.result = os.fdopen(r, "rb")
        threading.Thread(target=self._watch, daemon=True).start()
        return self.wait(lambda: pa.ipc.open_stream(pa.PythonFile(self.result, mode="r")))

    def _watch(self) -> None:
        """Ends the worker at the deadline, when the caller cancels while it waits for the worker, or when
        the caller stops reading the result (issue 22: four half-read streams held every worker for as long
        as their client liked). A worker ended while its caller is away is given back to the pool at once -
        the slot is free for others - and the caller's next read gets the reason."""
        while True:
            time.sleep(_POLL_SECONDS)
            with self.lock:
                if self.done:
                    return
                now = time.monotonic()
                if now >= self.deadline:
                    self.outcome = "timeout"
                elif self.waiting and self.cancelled is not None and self.cancelled():
                    # polled only while the caller's thread is blocked in wait(): its call is still on
                    self.outcome = "cancelled"
                elif not self.waiting and now - self.last_read >= self.idle_limit:
                    self.outcome = "idle"
                if self.outcome:
                    self.worker.kill()
                    away = not self.waiting
                    break
        if away:  # nobody is reading: free the slot now (finish() is idempotent)
            self.finish(clean=False)

    def wait(self, step: Callable[[], Any]) -> Any:
        """Run a blocking read from the worker with the caller's cancellation watched."""
        with self.lock:
            if self.done and self.outcome is not None:  # ended (and given back) while the caller was away
                raise self._ended()
            self.waiting = True
        try:
            return step()
        except (pa.ArrowException, OSError, ValueError):
            raise self._ended() from None
        finally:
            with self.lock:
                self.waiting = False
                self.last_read = time.monotonic()

    def next_batch(self) -> pa.RecordBatch | None:
        """The next result batch; None at the end; the query's error if it failed."""
        try:
            batch, metadata = self.wait(self.reader.read_next_batch_with_custom_metadata)
        except StopIteration:
            raise self._ended() from None
        if metadata is not None and metadata.get(MARK.encode()) is not None:
            if metadata.get(MARK.encode()) == END.encode():
                return None
            raise self._error(metadata.get(b"kind", b"").decode(), metadata.get(b"message", b"").decode())
        return batch

    def _ended(self) -> BaseException:
        """Why the result stream stopped without its end mark: the server ended the worker, or it died."""
        self.worker.kill()
        self.worker.proc.wait()
        timeout = self.sandbox.timeout
        if self.outcome == "timeout":
            return SqlLimitExceeded.time_limit(timeout, self.query.dataset)
        if self.outcome == "cancelled":
            return Cancelled("the query was cancelled by its caller", dataset=self.query.dataset)
        if self.outcome == "idle":
            return SqlLimitExceeded(
                f"the query's result was not read for {self.idle_limit:g} s, so the query was ended and its "
                "sandbox given to others; read a result as it arrives (or aggregate, or add a LIMIT)",
                dataset=self.query.dataset, limit="idle result stream", value=self.idle_limit)
        if self.source_error is not None:
            return self.source_error
        # killed by the kernel (the memory limit) or crashed under it
        return SqlLimitExceeded(f"{_MEMORY_TEXT} (the query's sandbox process ended with "
                                f"{_exit_text(self.worker.proc.returncode)})", dataset=self.query.dataset,
                                limit="server.sql_memory_limit", value=self.sandbox.memory_limit)

    def _error(self, kind: str, message: str) -> BaseException:
        if self.source_error is not None:
            return self.source_error
        dataset = self.query.dataset
        if kind == "memory":
            return SqlLimitExceeded(_MEMORY_TEXT, dataset=dataset, limit="server.sql_memory_limit",
                                    value=self.sandbox.memory_limit)
        if kind == "interrupt":
            return SqlLimitExceeded.time_limit(self.sandbox.timeout, dataset)
        if kind == "permission":
            return InvalidRequest("query tried to reach outside the dataset (files, network or settings)", dataset=dataset)
        if kind == "rows":
            return SqlLimitExceeded(message, dataset=dataset, limit="server.sql_max_rows", value=self.sandbox.max_rows)
        if kind == "refused":
            return InvalidRequest(message, dataset=dataset)
        if kind in ("sql", "source"):
            return InvalidRequest(f"SQL error: {engine_error_text(mask(message))[:500]}", dataset=dataset)
        log.error("SQL sandbox worker failed: %s", mask(message))
        return Unavailable("the SQL sandbox failed; see the server log", dataset=dataset)

    def feed(self, index: int, fd: int) -> None:
        """Stream table ``index`` (projected) into the pipe the worker sent; ends when the worker stops reading."""
        sink = os.fdopen(fd, "wb")
        reader = None
        try:
            table, _ = self.tables[index]
            pushed = self.query.pushdown
            args = (self.storage, table, self.columns[index], pushed.limits.get(table), pushed.filters.get(table))
            if self.partition is not None and self.partition.table == table:
                # only then: a source written for five arguments keeps working for whole tables
                reader = self.sandbox.source(*args, partition=self.partition.spec)
            else:
                reader = self.sandbox.source(*args)
            with pa.ipc.new_stream(pa.PythonFile(sink, mode="w"), reader.schema) as writer:
                for batch in reader:
                    writer.write_batch(batch)
        except (BrokenPipeError, ConnectionError):
            pass  # the worker finished with the table early (a LIMIT) or was ended
        except (IndexError, ValueError):
            pass
        except BaseException as exc:  # noqa: BLE001 - reported as the query's error
            if not self.worker.dead and not isinstance(exc, (OSError, pa.ArrowException)):
                self.source_error = exc
        finally:
            if reader is not None:
                try:
                    reader.close()
                except Exception:  # noqa: BLE001
                    pass
            try:
                sink.close()
            except OSError:
                pass

    def finish(self, clean: bool) -> None:
        """Give the worker back (a cleanly ended query) or end it (anything else)."""
        with self.lock:
            if self.done:
                return
            self.done = True
        result = getattr(self, "result", None)
        if result is not None:
            try:
                result.close()
            except OSError:
                pass
        self.pool.release(self.worker, reuse=clean and self.outcome is None)


#: a table's stream for a query: (storage, table, columns or None, row limit or None, pushed filters or None),
#: and ``partition=<spec>`` (keyword) when the query runs over one partition of that table
#: (``Storage.partitions``; the caller made sure the spec is one the server planned)
Source = Callable[..., pa.RecordBatchReader]


@dataclass(frozen=True)
class TablePartition:
    """One partition of the table a row-wise query reads (:func:`row_wise_table`): the query runs over
    those rows only. ``spec`` is a :class:`~flight_server.domain.storage.Partition`'s spec, as the storage
    adapter planned it: never one a client wrote (the transport seals it into the ticket)."""

    table: str
    spec: Mapping[str, Any]

_MEMORY_TEXT = "query needs more memory than the sandbox allows (server.sql_memory_limit)"


def _refuse_case_twins(storage: "Storage", table: str, names: list[str]) -> None:
    """duckdb resolves names without regard to case, so a table whose columns differ only in case
    (``FullName`` and ``fullname``, possible under dlt's case-sensitive naming conventions on PostgreSQL,
    SQLite, Delta...) cannot be queried with both: duckdb would rename one (``fullname_1``) or read
    the other. Such a query is refused; the table's read serves both under their stored names."""
    seen: dict[str, str] = {}
    for name in names:
        twin = seen.setdefault(name.lower(), name)
        if twin != name:
            raise InvalidRequest(
                f"columns '{twin}' and '{name}' of table '{table}' differ only in letter case, which the SQL "
                f"engine (duckdb) cannot tell apart; select the other columns by name, or read the table "
                f"itself (it serves both)", dataset=storage.dataset.name, table=table)


def _rss(pid: int) -> int:
    """Resident memory of a process (Linux ``/proc``); huge when unknown, so the worker is not kept."""
    try:
        with open(f"/proc/{pid}/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 1 << 62


def _exit_text(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


class SqlEngine(Protocol):
    """What the surfaces use to run checked SQL: the sandbox, or the router that sends some queries to the
    warehouse (:class:`flight_server.domain.warehouse.WarehouseRouter`)."""

    @property
    def timeout(self) -> float: ...

    @property
    def max_rows(self) -> int: ...

    def schema(self, storage: Storage, query: CheckedQuery, cancelled: Callable[[], bool] | None = None,
               parameters: pa.Table | None = None, *, user: str | None = None) -> pa.Schema: ...

    def run(self, storage: Storage, query: CheckedQuery, cancelled: Callable[[], bool] | None = None,
            parameters: pa.Table | None = None, *, partition: TablePartition | None = None,
            user: str | None = None) -> pa.RecordBatchReader: ...

    def stats(self) -> dict[str, int]: ...

    def close(self) -> None: ...


class SqlSandbox:
    """Runs checked queries in warm, killable, memory-limited worker processes (see module doc)."""

    def __init__(self, max_rows: int = 10_000_000, timeout: float = 120.0, memory_limit: str = "2GB",
                 batch_rows: int = 122_880, threads: int | None = None, source: Source | None = None,
                 per_user: int = SQL_PER_USER) -> None:
        self.max_rows = max_rows
        # where a query's tables come from: the adapter's reader, or the server's hot-table cache
        # (TableCache.sql_reader), with the columns the query uses and its pushed-down filters and limit
        self.source: Source = source or (lambda storage, table, columns, limit, where, partition=None:
                                         storage.reader(table, columns, limit, partition=partition, where=where))
        self.timeout = timeout
        self.batch_rows = batch_rows
        self.memory_limit = memory_limit
        self.memory_bytes = size_bytes(memory_limit)
        self.pool = _pool(self.memory_bytes, threads or 0, per_user)
        self._schemas: "OrderedDict[bytes, pa.Schema]" = OrderedDict()  # result schemas, see schema()
        self._schemas_lock = threading.Lock()

    @classmethod
    def from_config(cls, server: "ServerConfig", source: Source | None = None) -> "SqlSandbox":
        sandbox = cls(server.sql_max_rows, server.sql_timeout, server.sql_memory_limit, server.batch_rows,
                      source=source, per_user=server.sql_per_user or SQL_PER_USER)
        sandbox.pool.fill()  # warm before the first query
        return sandbox

    def close(self) -> None:
        self.pool.close()

    def stats(self) -> dict[str, int]:
        """Queries running and waiting in the sandbox (reported by ``health``)."""
        return self.pool.stats()

    @staticmethod
    def _columns(storage: "Storage", table: str, columns: frozenset[str] | None) -> list[str] | None:
        names = storage.arrow_schema(table).names
        if columns is not None:
            # a query using no column (count(*)) still needs rows: stream the first column only
            names = [n for n in names if n in columns] or names[:1]
        _refuse_case_twins(storage, table, names)
        return names if columns is not None else None

    def schema(self, storage: "Storage", query: CheckedQuery, cancelled: Callable[[], bool] | None = None,
               parameters: pa.Table | None = None, *, user: str | None = None) -> pa.Schema:
        """The result schema, from binding the query in a worker (no table data is read).

        ``parameters``: bound values (:func:`check_parameters`); the first row is bound. A result schema
        without bound values depends only on the query and the Arrow schemas of what it reads, so it is
        remembered under those (a Flight SQL client asks twice per statement: CreatePreparedStatement,
        then GetFlightInfo); a table whose columns change is another key.
        """
        if parameters is not None:  # duckdb types a bound value by its value (1 INTEGER, 2**40 BIGINT): no memo
            return self._bind_schema(storage, query, cancelled, parameters, user)
        digest = hashlib.sha256()  # the key: a digest (a memo of 100,000-character queries would hold them all)
        for part in (query.sql, query.dataset):
            digest.update(part.encode() + b"\0")
        for t, c in sorted(query.tables.items()):
            digest.update(t.encode() + b"\0" + storage.arrow_schema(t, self._columns(storage, t, c)).serialize().to_pybytes())
        key = digest.digest()
        with self._schemas_lock:
            known = self._schemas.get(key)
            if known is not None:
                self._schemas.move_to_end(key)
                return known
        schema = self._bind_schema(storage, query, cancelled, None, user)
        if len(schema) > SCHEMA_MEMO_MAX_FIELDS:
            return schema
        with self._schemas_lock:
            self._schemas[key] = schema
            while len(self._schemas) > SCHEMA_MEMO_ENTRIES:
                self._schemas.popitem(last=False)
        return schema

    def _bind_schema(self, storage: "Storage", query: CheckedQuery, cancelled: Callable[[], bool] | None,
                     parameters: pa.Table | None, user: str | None = None) -> pa.Schema:
        job = _Job(self, storage, query, "schema", cancelled, parameters, user=user)
        clean = False
        try:
            schema = job.reader.schema
            while job.next_batch() is not None:
                pass
            clean = True
        finally:
            job.finish(clean)
        return schema

    def run(self, storage: "Storage", query: CheckedQuery,
            cancelled: Callable[[], bool] | None = None, parameters: pa.Table | None = None, *,
            partition: TablePartition | None = None, user: str | None = None) -> pa.RecordBatchReader:
        """A streaming reader of the result; the limits hold while it binds, runs and is read.

        ``user``: the caller, whose fair share of the workers the query takes (``server.sql_per_user``).

        ``cancelled``: the caller's ``context.is_cancelled``; polled only while the caller waits for
        the worker (so never after its call ended). ``parameters``: bound values, one row per
        execution (:func:`check_parameters`); the results of all rows, in row order, make one result.
        ``partition``: run a row-wise query (:func:`row_wise_table`) over one partition of its table
        only. Each partition is a query of its own: ``server.sql_timeout``, ``sql_memory_limit`` and
        ``sql_max_rows`` hold per partition.
        """
        if partition is not None and partition.table not in query.tables:
            raise InvalidRequest(f"a partition of table '{partition.table}' does not belong to this query",
                                 dataset=query.dataset)
        job = _Job(self, storage, query, "run", cancelled, parameters, partition, user)
        try:
            # the first batch (or the error of a query that fails to bind) before the stream starts:
            # an error then leaves as the call's status, not in the middle of a stream
            first = job.next_batch()
        except BaseException:
            job.finish(False)
            raise
        return pa.RecordBatchReader.from_batches(job.reader.schema, self._limited(job, first))

    def _limited(self, job: _Job, first: pa.RecordBatch | None) -> Iterator[pa.RecordBatch]:
        rows = 0
        clean = False
        batch = first
        try:
            while True:
                if batch is None:
                    clean = True
                    return
                rows += batch.num_rows
                if rows > self.max_rows:  # the worker stops first; this is the second wall
                    raise SqlLimitExceeded(
                        f"query result exceeds the limit of {self.max_rows:,} rows (server.sql_max_rows); "
                        "aggregate or add a LIMIT", dataset=job.query.dataset, limit="server.sql_max_rows",
                        value=self.max_rows)
                yield batch
                batch = job.next_batch()  # errors leave as raised; the transport maps them (audit.counted)
        finally:
            job.finish(clean)
