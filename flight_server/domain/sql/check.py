"""The allow-list (the sandbox's first wall): one SELECT over one dataset's own tables, rewritten so the
engine never resolves a name the caller chose.

A statement is accepted only if it is a single query (SELECT / WITH / set operation) whose every table
reference names a table of the dataset; it is rewritten with each reference qualified to the dataset.
Table functions (``read_csv``, ``glob`` ...) and functions that reach files, the network, settings or the
environment are refused. ``check_query(..., catalog=project)`` also accepts ``project.dataset.table``
(Flight SQL's catalog). The checked query carries the columns each table contributes and what may be
pushed down to the storage adapter: both only optimisations, which fall back to everything when in doubt.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from sqlglot import exp
from sqlglot.optimizer.qualify import qualify
from sqlglot.optimizer.scope import traverse_scope

from flight_server.domain.errors import InvalidRequest, NotFound
from flight_server.domain.pushdown import NOTHING, Pushdown, pushdown
from flight_server.domain.sql.parse import analysing, parse_one
from flight_server.domain.sql.references import function_names, table_references

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


@dataclass(frozen=True)
class CheckedQuery:
    """A query that passed the allow-list: its SQL with tables qualified, and what it reads."""

    sql: str
    dataset: str
    # table -> columns the query uses (None: all of them)
    tables: Mapping[str, frozenset[str] | None]
    # filters and row limits the storage adapter may apply while streaming a table (domain/pushdown.py)
    pushdown: Pushdown = NOTHING


def check_query(sql: str | exp.Expression, dataset: str, tables: Mapping[str, Iterable[str] | None],
                dialect: str = "duckdb", catalog: str | None = None, *, user: str | None = None) -> CheckedQuery:
    """Check a query against the allow-list; ``tables`` maps each table of the dataset to its columns.

    ``sql``: the text, or its tree from :func:`~flight_server.domain.sql.parse.parse_statement` (which this
    rewrites: pass it last).
    ``catalog``: a catalog qualifier the caller may write (``catalog.dataset.table``); any other is refused.
    ``user``: the caller, for the fair share of the parser (:data:`~flight_server.domain.sql.parse.ANALYSES_PER_USER`).
    """
    with analysing(dataset, user):
        try:
            return _check_query(sql, dataset, tables, dialect, catalog)
        except RecursionError:
            raise InvalidRequest("query is nested too deeply", dataset=dataset) from None


def _check_query(sql: str | exp.Expression, dataset: str, tables: Mapping[str, Iterable[str] | None], dialect: str,
                 catalog: str | None) -> CheckedQuery:
    allowed = set(tables)
    tree = sql if isinstance(sql, exp.Expression) else parse_one(sql, dialect, dataset)
    if not isinstance(tree, _QUERY_TYPES):
        raise InvalidRequest(
            f"only SELECT queries are allowed, got {tree.key.upper()}", dataset=dataset
        )
    forbidden = next(iter(tree.find_all(*_FORBIDDEN_NODES)), None)
    if forbidden is not None:
        raise InvalidRequest(f"only SELECT queries are allowed; found {forbidden.key.upper()}", dataset=dataset)
    for name in function_names(tree):
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
    if sum(1 for _ in zip(tree.walk(), range(_MAX_PRUNE_NODES + 1), strict=False)) > _MAX_PRUNE_NODES:
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
