"""What a parsed statement refers to: its tables (CTE names resolved by scope), the datasets it names, the
functions it calls.

Flight SQL statements are written against the whole project (catalog = project, schema = dataset):
:func:`referenced_datasets` tells which dataset a statement reads, before the allow-list checks it there.
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlglot import exp

from flight_server.domain.errors import InvalidRequest
from flight_server.domain.sql.parse import analysing, parse_one


def function_names(tree: exp.Expression) -> Iterable[str]:
    """Every name each function call of ``tree`` goes by (lower case), as written and as sqlglot knows it."""
    for node in tree.find_all(exp.Func):
        if isinstance(node, exp.Anonymous):
            yield str(node.name).lower()
        else:
            yield node.sql_name().lower()
            for name in getattr(node, "_sql_names", ()) or ():
                yield name.lower()


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


def referenced_datasets(sql: str | exp.Expression, dialect: str = "duckdb", *,
                        user: str | None = None) -> tuple[set[str], list[str]]:
    """The schema (dataset) qualifiers a query's table references name, and its unqualified table names.

    CTE names are not table references. Nothing is checked here beyond parsing: the query still goes
    through :func:`~flight_server.domain.sql.check.check_query` for the dataset chosen.
    """
    with analysing(None, user):
        return _referenced_datasets(sql, dialect)


def _referenced_datasets(sql: str | exp.Expression, dialect: str) -> tuple[set[str], list[str]]:
    tree = sql if isinstance(sql, exp.Expression) else parse_one(sql, dialect, None)
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
