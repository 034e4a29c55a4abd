"""The read-only SQL sandbox: one SELECT over one dataset's own tables.

Parsing uses sqlglot (which dlt already depends on). A statement is accepted only if it is a single
query (SELECT / WITH / set operation) whose every table reference names a table of the dataset; it
is rewritten with each reference qualified to the dataset, so the engine never resolves a name the
caller chose. Table functions (``read_csv``, ``glob`` ...) are not table references and are refused.

Flight SQL statements are written against the whole project (catalog = project, schema = dataset):
:func:`referenced_datasets` tells which dataset a statement reads, and ``sandbox_query(...,
catalog=project)`` also accepts ``project.dataset.table``.
"""

from __future__ import annotations

from typing import Iterable

import sqlglot
from sqlglot import exp

from flight_server.errors import InvalidRequest, NotFound

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


def _parse_one(sql: str, dialect: str, dataset: str | None) -> exp.Expression:
    try:
        statements = [s for s in sqlglot.parse(sql, read=dialect) if s is not None]
    except sqlglot.errors.ParseError as exc:
        raise InvalidRequest(f"SQL does not parse: {str(exc).splitlines()[0]}", dataset=dataset) from None
    if len(statements) != 1:
        raise InvalidRequest(f"exactly one SQL statement is allowed, got {len(statements)}", dataset=dataset)
    return statements[0]


def referenced_datasets(sql: str, dialect: str = "duckdb") -> tuple[set[str], list[str]]:
    """The schema (dataset) qualifiers a query's table references name, and its unqualified table names.

    CTE names are not table references. Nothing is checked here beyond parsing: the query still goes
    through :func:`sandbox_query` for the dataset chosen.
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
    """Check a query and return it with every table qualified to ``dataset``.

    ``catalog``: a catalog qualifier the caller may write (``catalog.dataset.table``); any other is refused.
    """
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
    return tree.sql(dialect)
