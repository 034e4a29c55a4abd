"""What a checked SQL query lets the storage adapter skip: simple filters and a row limit per table.

The sandbox still runs the whole query over what the adapter streams, so a pushed filter only has to keep
*at least* the rows the query keeps: it is an optimisation, never the query's meaning. That is why only
the plainest shapes are taken (sqlglot's tree, no engine involved):

- a single SELECT over exactly one table, with no join, subquery, CTE or set operation;
- from its WHERE, the AND-ed conjuncts of the forms ``col <op> literal`` (``= < <= > >=``, either side),
  ``col BETWEEN lit AND lit``, ``col IN (lit, ...)``, ``col IS [NOT] NULL``, a bare boolean ``col`` or
  ``NOT col`` - numbers, strings and booleans only (no casts, no parameters, no functions);
- a LIMIT (plus OFFSET) only when every conjunct was taken, nothing reorders or combines rows (no ORDER
  BY, GROUP BY, HAVING, DISTINCT, aggregate, window or QUALIFY) and the select list is plain columns and
  literals (a set-returning call makes more or fewer rows than it reads); never with a table sample.

Each adapter then applies what it can do exactly for the column's type (:func:`usable`) and ignores the
rest: duckdb and PostgreSQL as a WHERE clause of their own SELECT (zone maps / the warehouse's plan),
Delta as a pyarrow dataset filter (files and row groups skipped by their statistics).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
from sqlglot import exp

from flight_server.domain.identifiers import literal

OPS = {exp.EQ: "=", exp.GT: ">", exp.GTE: ">=", exp.LT: "<", exp.LTE: "<="}
FLIPPED = {"=": "=", ">": "<", ">=": "<=", "<": ">", "<=": ">="}
MAX_IN_VALUES = 1000  # a longer IN list is left to the sandbox


@dataclass(frozen=True)
class Predicate:
    """``column op values``: op is one of ``= < <= > >= in between is_null not_null``."""

    column: str
    op: str
    values: tuple[Any, ...] = ()


@dataclass(frozen=True)
class Pushdown:
    """Per table of the query: the conjuncts an adapter may apply, and the rows it may stop after."""

    filters: Mapping[str, tuple[Predicate, ...]] = field(default_factory=dict)
    limits: Mapping[str, int] = field(default_factory=dict)


NOTHING = Pushdown()


def pushdown(tree: exp.Expression, tables: Mapping[str, Iterable[str] | None]) -> Pushdown:
    """The filters and limit of a checked query (its tables already qualified); :data:`NOTHING` when unsure."""
    if (not isinstance(tree, exp.Select) or tree.args.get("joins") or tree.args.get("laterals")
            or tree.args.get("with") or tree.args.get("with_")):  # (sqlglot 29 keeps WITH under "with_")
        return NOTHING
    references = list(tree.find_all(exp.Table))
    if len(references) != 1 or tree.find(exp.Subquery, exp.Union, exp.Except, exp.Intersect, exp.TableSample,
                                         exp.With, exp.Pivot) is not None:
        return NOTHING  # (an UNPIVOT's WHERE filters its output columns, not the table's)
    alias = references[0].args.get("alias")
    if alias is not None and alias.columns:
        return NOTHING  # t AS x(a, b) renames the table's columns by position
    table = references[0].name
    names = list(tables.get(table) or ())
    lowered = [c.lower() for c in names]
    # a name as stored, else (duckdb resolves without regard to case) the one stored name it folds to
    known = {**{c.lower(): c for c in names if lowered.count(c.lower()) == 1}, **{c: c for c in names}}
    if not known:
        return NOTHING
    where = tree.args.get("where")
    conjuncts = list(_conjuncts(where.this)) if where is not None else []
    taken = [p for p in (_predicate(c, known) for c in conjuncts) if p is not None]
    filters = {table: tuple(taken)} if taken else {}
    limit = _limit(tree) if len(taken) == len(conjuncts) else None
    return Pushdown(filters, {table: limit} if limit is not None else {})


def _conjuncts(node: exp.Expression) -> Iterable[exp.Expression]:
    node = node.unnest() if isinstance(node, exp.Paren) else node
    if isinstance(node, exp.And):
        yield from _conjuncts(node.left)
        yield from _conjuncts(node.right)
    else:
        yield node


def _column(node: exp.Expression, known: Mapping[str, str]) -> str | None:
    if isinstance(node, exp.Column) and not node.args.get("db") and isinstance(node.this, exp.Identifier):
        return known.get(node.name, known.get(node.name.lower()))
    return None


_NO_VALUE = object()


def _value(node: exp.Expression) -> Any:
    """A plain literal's Python value (numbers, strings, booleans), else _NO_VALUE."""
    negative = False
    if isinstance(node, exp.Neg):
        negative, node = True, node.this
    if isinstance(node, exp.Boolean) and not negative:
        return bool(node.this)
    if not isinstance(node, exp.Literal):
        return _NO_VALUE
    if node.is_string:
        return _NO_VALUE if negative else node.this
    text = node.this
    try:
        number: Any = int(text) if text.lstrip("+-").isdigit() else float(text)
    except ValueError:
        return _NO_VALUE
    if isinstance(number, float) and not (number == number and abs(number) != float("inf")):
        return _NO_VALUE
    return -number if negative else number


def _predicate(node: exp.Expression, known: Mapping[str, str]) -> Predicate | None:
    node = node.unnest() if isinstance(node, exp.Paren) else node
    if isinstance(node, exp.Binary) and type(node) in OPS:
        op = OPS[type(node)]
        left, right = _column(node.left, known), _column(node.right, known)
        if left and not right and (value := _value(node.right)) is not _NO_VALUE:
            return Predicate(left, op, (value,))
        if right and not left and (value := _value(node.left)) is not _NO_VALUE:
            return Predicate(right, FLIPPED[op], (value,))
        return None
    if isinstance(node, exp.Between):
        if node.args.get("symmetric"):
            return None
        column, low, high = _column(node.this, known), _value(node.args["low"]), _value(node.args["high"])
        if column and low is not _NO_VALUE and high is not _NO_VALUE:
            return Predicate(column, "between", (low, high))
        return None
    if isinstance(node, exp.In) and not node.args.get("query") and not node.args.get("unnest"):
        column = _column(node.this, known)
        values = [_value(v) for v in node.expressions]
        if column and values and len(values) <= MAX_IN_VALUES and all(v is not _NO_VALUE for v in values):
            return Predicate(column, "in", tuple(values))
        return None
    if isinstance(node, exp.Is) and isinstance(node.expression, exp.Null):
        column = _column(node.this, known)
        return Predicate(column, "is_null") if column else None
    if isinstance(node, exp.Not):
        inner = node.this.unnest() if isinstance(node.this, exp.Paren) else node.this
        if isinstance(inner, exp.Is) and isinstance(inner.expression, exp.Null):
            column = _column(inner.this, known)
            return Predicate(column, "not_null") if column else None
        column = _column(inner, known)
        return Predicate(column, "=", (False,)) if column else None
    column = _column(node, known)
    return Predicate(column, "=", (True,)) if column else None  # a bare boolean column


def _limit(tree: exp.Select) -> int | None:
    limit = tree.args.get("limit")
    if limit is None:
        return None
    if any(tree.args.get(k) for k in ("order", "group", "having", "distinct", "qualify")):
        return None
    if tree.find(exp.AggFunc, exp.Window) is not None:
        return None
    # only plain columns and literals: a set-returning call (unnest..., also inside * REPLACE (...)) makes more
    # or fewer rows than it reads
    for projection in tree.expressions:
        inner = projection.this if isinstance(projection, exp.Alias) else projection
        if not isinstance(inner, (exp.Column, exp.Star, exp.Literal)) or inner.find(exp.Func) is not None:
            return None
        star = inner if isinstance(inner, exp.Star) else inner.this if isinstance(inner.this, exp.Star) else None
        if star is not None and star.args.get("replace"):
            return None
    if not isinstance(limit, exp.Limit) or limit.args.get("limit_options"):
        return None  # LIMIT 10 PERCENT, WITH TIES, FETCH ...: not a row count
    rows = _value(limit.expression)
    offset_node = tree.args.get("offset")
    offset = _value(offset_node.expression) if offset_node is not None else 0
    if not isinstance(rows, int) or not isinstance(offset, int) or isinstance(rows, bool) or rows < 0 or offset < 0:
        return None
    return rows + offset


def usable(predicate: Predicate, dtype: pa.DataType) -> bool:
    """Whether a predicate means the same for a column of ``dtype`` in every engine: integers against
    integers, floats against numbers, booleans against booleans, strings only for (in)equality - string
    order depends on a warehouse's collation - and NULL tests on anything."""
    if predicate.op in ("is_null", "not_null"):
        return True
    values = predicate.values
    if pa.types.is_boolean(dtype):
        return predicate.op in ("=", "in") and all(isinstance(v, bool) for v in values)
    if any(isinstance(v, bool) for v in values):
        return False
    if pa.types.is_integer(dtype):
        return all(isinstance(v, int) and -(2**63) <= v < 2**63 for v in values)
    if pa.types.is_floating(dtype):
        return all(isinstance(v, (int, float)) and abs(v) < 2**53 for v in values)
    if pa.types.is_string(dtype) or pa.types.is_large_string(dtype):
        return predicate.op in ("=", "in") and all(isinstance(v, str) for v in values)
    return False


def dlt_types(columns: Mapping[str, Any]) -> dict[str, Any]:
    """Column -> stored dlt data type, from a table's stored columns."""
    return {name: column.get("data_type") for name, column in columns.items()}


def applicable(predicates: Iterable[Predicate] | None, schema: pa.Schema, dlt_types: Mapping[str, Any],
               floats: bool = True) -> tuple[list[Predicate], bool]:
    """The predicates an adapter applies for a table of ``schema``, and whether that is all of them (only
    then may it also apply the query's row limit). ``dlt_types``: each column's stored dlt type - strings are
    compared only in ``text`` columns (a ``json`` column reads as text but the engine compares JSON).
    ``floats``: False where the adapter cannot apply float comparisons exactly (Delta: an infinity in a file
    turns its statistics into nulls, and pyarrow would skip the file)."""
    given = list(predicates or ())
    names = set(schema.names)

    def fits(p: Predicate) -> bool:
        if p.column not in names:
            return False
        dtype = schema.field(p.column).type
        if pa.types.is_floating(dtype) and not floats and p.op not in ("is_null", "not_null"):
            return False
        if (pa.types.is_string(dtype) or pa.types.is_large_string(dtype)) and dlt_types.get(p.column) != "text" \
                and p.op not in ("is_null", "not_null"):
            return False
        return usable(p, dtype)

    kept = [p for p in given if fits(p)]
    return kept, len(kept) == len(given)


def _literal(value: Any) -> str:
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, (int, float)):
        return repr(value)
    return literal(str(value))


def where_sql(predicates: Iterable[Predicate], quote: Any) -> str | None:
    """The predicates as one SQL condition (duckdb and PostgreSQL read it alike); ``quote``: the identifier quoting."""
    parts = []
    for p in predicates:
        column = quote(p.column)
        if p.op == "is_null":
            parts.append(f"{column} IS NULL")
        elif p.op == "not_null":
            parts.append(f"{column} IS NOT NULL")
        elif p.op == "between":
            parts.append(f"{column} BETWEEN {_literal(p.values[0])} AND {_literal(p.values[1])}")
        elif p.op == "in":
            parts.append(f"{column} IN ({', '.join(_literal(v) for v in p.values)})")
        else:
            parts.append(f"{column} {p.op} {_literal(p.values[0])}")
    return " AND ".join(f"({part})" for part in parts) or None


def arrow_filter(predicates: Iterable[Predicate]) -> Any:
    """The predicates as one pyarrow dataset expression (None: none)."""
    import pyarrow.compute as pc

    expression = None
    for p in predicates:
        field_ = pc.field(p.column)
        if p.op == "is_null":
            part = field_.is_null()
        elif p.op == "not_null":
            part = field_.is_valid()
        elif p.op == "between":
            part = (field_ >= p.values[0]) & (field_ <= p.values[1])
        elif p.op == "in":
            part = field_.isin(list(p.values))
        else:
            part = {"=": field_ == p.values[0], ">": field_ > p.values[0], ">=": field_ >= p.values[0],
                    "<": field_ < p.values[0], "<=": field_ <= p.values[0]}[p.op]
        expression = part if expression is None else expression & part
    return expression
