"""Bound values of a prepared statement: how many a statement takes, and which values may be bound.

Values bind by position (``?`` or ``$1``, ``$2``...) and never become SQL text: the worker hands them to
duckdb as Python values. They travel inside the statement's handle, so their size is bounded.
"""

from __future__ import annotations

import re

import pyarrow as pa
from sqlglot import exp

from flight_server.domain.errors import InvalidRequest
from flight_server.domain.sql.parse import analysing, parse_one

#: bound values a prepared statement may carry (they travel inside its handle): rows and Arrow IPC bytes
MAX_PARAMETER_ROWS = 1_000
MAX_PARAMETER_BYTES = 1 << 20
_NUMBERED = re.compile(r"^\$(\d+)$")


def parameter_count(sql: str | exp.Expression, dialect: str = "duckdb", *, user: str | None = None) -> int:
    """How many values a statement binds: its ``?`` placeholders, or the highest ``$n``.

    Named parameters (``$name``) and a mix of ``?`` and ``$n`` are refused (values bind by position).
    """
    if isinstance(sql, exp.Expression):
        tree = sql
    else:
        with analysing(None, user):
            tree = parse_one(sql, dialect, None)
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
