"""SQL where the data lives: a checked query runs inside the warehouse when it safely can.

The sandbox (:mod:`flight_server.domain.sql`) runs every query in a locked-down duckdb worker fed by
Arrow streams of the tables it names, so a GROUP BY over a 50M-row PostgreSQL table moves every row of
its columns into the server. For a PostgreSQL dataset the :class:`WarehouseRouter` instead sends the
whole query to PostgreSQL -- only the result rows leave it -- when :func:`plan` can show that
PostgreSQL gives the very answer the sandbox would give. Everything else goes to the sandbox unchanged.

What may be sent is an **allow-list of sqlglot expression classes** (exact classes, never subclasses:
an ``exp.Anonymous`` function, any function not on the list, a bound parameter, a window, ``* EXCLUDE``,
a set-returning or volatile function never matches), over columns of plain types only (bigint/double/
text/bool/timestamp/date: json, decimal and wei columns, which the adapter reads as text and casts,
stay in the sandbox). Every column must resolve (sqlglot's qualifier, validated) to a column of a
table of the dataset or of a CTE/subquery over them, so a system column (``ctid``, ``xmin``) or a name
that only PostgreSQL would resolve never reaches it.

Where the engines differ, the SQL sent spells duckdb's meaning out:

- ``a / b`` is float division in duckdb (IEEE: ``x/0`` is ``±inf``, ``0/0`` NaN); PostgreSQL divides
  integers as integers and raises on zero, so both operands are cast to ``double precision`` and a zero
  divisor is answered as IEEE would;
- text compares and sorts by code point in duckdb: every text column of a table is read ``COLLATE "C"``
  (byte order of UTF-8 = code point order), whatever the database's collation;
- ``LIKE`` has no escape character in duckdb (PostgreSQL's default is ``\\``): ``ESCAPE ''``;
- NULLs sort last in duckdb for ASC and DESC: every ORDER BY key says NULLS FIRST/LAST explicitly;
- string literals compared with timestamps are read in UTC (``SET LOCAL TimeZone``, storage side);
- NaN: a filter duckdb pushes into the sandbox's Arrow scan compares it as Arrow does (``NaN > 0.5`` is
  false), PostgreSQL orders it above every number: the double columns a comparison reads must hold no
  NaN, checked by one ``EXISTS`` per table in the query's own snapshot (:func:`_nan_guards`), else the
  sandbox answers.

The result's **names and Arrow types are the sandbox's own**: the router asks the sandbox for the
query's schema (a bind in a worker; no table data is read), casts every output column in the SQL to the
PostgreSQL type that reads back as that Arrow type (``sum(bigint)``, numeric in PostgreSQL, comes back as
duckdb's ``decimal128(38, 0)``; ``avg`` as double...), and the stream is cast to that schema. So
GetFlightInfo / GetSchema (:meth:`WarehouseRouter.schema`, the sandbox's answer) and DoGet
(:meth:`WarehouseRouter.run`) always agree. An output type without a known PostgreSQL counterpart
(lists, structs, intervals, NULL) falls back; so does a query PostgreSQL refuses before its first row
(the caller then gets the sandbox's answer or its usual error, in its usual words).

The storage side (``PostgresStorage.warehouse_query``) runs the SQL inside ``BEGIN TRANSACTION ISOLATION
LEVEL REPEATABLE READ READ ONLY`` with ``statement_timeout`` = ``server.sql_timeout``, ``search_path =
pg_catalog, pg_temp`` and cancellation by the caller (ADBC's ``adbc_cancel``); the router enforces ``server.sql_max_rows`` (it
asks for one row more) with the sandbox's own text.

Known differences, accepted: a double division by a negative zero gives ``+inf`` where duckdb gives
``-inf``; the last bits of a float ``sum``/``avg`` depend on the order of addition (as between two runs
of the sandbox itself), and ``avg`` of integers is PostgreSQL's exact numeric average rounded to a double,
which may differ from duckdb's in the last bit.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import pyarrow as pa
import sqlglot
from sqlglot import exp
from sqlglot.optimizer.annotate_types import annotate_types
from sqlglot.optimizer.qualify import qualify
from sqlglot.optimizer.scope import traverse_scope

from flight_server.domain.errors import Cancelled, InvalidRequest, ServiceError, SqlLimitExceeded, Unavailable
from flight_server.domain.fair import FairShare
from flight_server.domain.sql.check import CheckedQuery, case_sensitive
from flight_server.domain.sql.jobs import idle_limit
from flight_server.domain.sql.references import table_references
from flight_server.domain.sql.sandbox import SqlSandbox
from flight_server.domain.storage import Storage

log = logging.getLogger(__name__)

# dlt data types a query may read in the warehouse (PostgreSQL stores them as types whose values and
# order are the sandbox's): bigint/integer/smallint, double precision, varchar, boolean, timestamp(tz), date
PLAIN_DLT_TYPES = {"bigint": exp.DataType.Type.BIGINT, "double": exp.DataType.Type.DOUBLE,
                   "text": exp.DataType.Type.TEXT, "bool": exp.DataType.Type.BOOLEAN,
                   "timestamp": exp.DataType.Type.TIMESTAMPTZ, "date": exp.DataType.Type.DATE}

# the only node classes a query sent to the warehouse may hold (exact classes: subclasses do not match)
ALLOWED: frozenset[type] = frozenset({
    # query structure
    exp.Select, exp.Union, exp.Intersect, exp.Except, exp.From, exp.Join, exp.Where, exp.Group, exp.Having,
    exp.Order, exp.Ordered, exp.Limit, exp.Offset, exp.With, exp.CTE, exp.Subquery, exp.TableAlias, exp.Table,
    exp.Alias, exp.Column, exp.Identifier, exp.Star, exp.Distinct, exp.Tuple, exp.Paren,
    # values and operators
    exp.Literal, exp.Boolean, exp.Null, exp.EQ, exp.NEQ, exp.GT, exp.GTE, exp.LT, exp.LTE, exp.NullSafeEQ,
    exp.NullSafeNEQ, exp.And, exp.Or, exp.Not, exp.Is, exp.In, exp.Between, exp.Exists, exp.Add, exp.Sub,
    exp.Mul, exp.Div, exp.Neg, exp.Like, exp.Case, exp.If, exp.Coalesce, exp.Nullif, exp.Cast, exp.DataType,
    # aggregates and the few functions whose results are the same in both engines
    exp.Count, exp.Sum, exp.Avg, exp.Min, exp.Max, exp.Filter, exp.Length,
})

# arguments a node may carry (anything else set: not sent); nodes not named here are checked by class only
_ALLOWED_ARGS: dict[type, frozenset[str]] = {
    exp.Select: frozenset({"expressions", "from", "from_", "joins", "where", "group", "having", "order", "limit",
                           "offset", "with", "with_", "distinct"}),
    exp.Union: frozenset({"this", "expression", "distinct", "with", "with_", "order", "limit", "offset"}),
    exp.Join: frozenset({"this", "on", "using", "side", "kind"}),
    exp.Table: frozenset({"this", "db", "alias"}),
    exp.Star: frozenset(),
    exp.Distinct: frozenset({"expressions"}),
    exp.With: frozenset({"expressions"}),
    exp.CTE: frozenset({"this", "alias"}),
    exp.Subquery: frozenset({"this", "alias"}),
    exp.Between: frozenset({"this", "low", "high"}),
    exp.In: frozenset({"this", "expressions", "query"}),
    exp.Like: frozenset({"this", "expression"}),
    exp.Cast: frozenset({"this", "to"}),
    exp.Count: frozenset({"this", "expressions", "big_int"}),
    exp.Group: frozenset({"expressions"}),
    exp.Limit: frozenset({"expression"}),
    exp.Offset: frozenset({"expression"}),
}
_ALLOWED_ARGS[exp.Intersect] = _ALLOWED_ARGS[exp.Except] = _ALLOWED_ARGS[exp.Union]

#: queries of one server process running in PostgreSQL at once (the adapter's own bound: storage/postgres.py)
WAREHOUSE_QUERIES = 4
#: of those, what one user (an address, for callers without credentials) holds at once: a user's streams
#: that are slow or not read leave the other slots to others (issue 22); beyond it a query is answered
#: by the sandbox, under the sandbox's own fair share
WAREHOUSE_PER_USER = 2

MAX_DIVISIONS = 16  # each is spelled out as a CASE (IEEE at a zero divisor): text grows with each

_INTEGERS = {exp.DataType.Type.BIGINT, exp.DataType.Type.INT, exp.DataType.Type.SMALLINT, exp.DataType.Type.TINYINT}
_FLOATS = {exp.DataType.Type.DOUBLE, exp.DataType.Type.FLOAT}
_TEXTS = {exp.DataType.Type.TEXT, exp.DataType.Type.VARCHAR}
# CAST(x AS <target>) is sent only from these source types (the two engines convert them alike: integers
# exactly, doubles to integers rounding half to even in both); doubles and timestamps to text differ in format
# (targets: no TINYINT, which PostgreSQL lacks, nor FLOAT, which is REAL in one and DOUBLE in the other)
_CAST_INTEGERS = {exp.DataType.Type.BIGINT, exp.DataType.Type.INT, exp.DataType.Type.SMALLINT}
_CASTS: dict[exp.DataType.Type, set[exp.DataType.Type]] = {
    **{t: _CAST_INTEGERS | {exp.DataType.Type.DOUBLE} | _TEXTS for t in _INTEGERS},
    **{t: _CAST_INTEGERS | {exp.DataType.Type.DOUBLE} for t in _FLOATS},
    **{t: set(_TEXTS) for t in _TEXTS},
    exp.DataType.Type.BOOLEAN: {exp.DataType.Type.BOOLEAN} | _TEXTS,
}


@dataclass(frozen=True)
class Plan:
    """A checked query as PostgreSQL SQL that gives the sandbox's rows (before the output casts)."""

    sql: str  # postgres dialect; tables qualified "dataset"."table"
    columns: int  # how many columns it returns
    # SQL that must answer false in the same snapshot for the plan to hold (else: the sandbox), see _nan_guards
    guards: tuple[str, ...] = ()

    def final_sql(self, schema: pa.Schema, max_rows: int) -> str | None:
        """The SQL to run: every output column cast to the PostgreSQL type that reads back as the
        sandbox's Arrow type, at most ``max_rows + 1`` rows; None if a type has no counterpart."""
        if len(schema) != self.columns:
            return None
        names = [f"c{i}" for i in range(len(schema))]
        outputs = []
        for name, field in zip(names, schema):
            cast = pg_cast(field.type)
            if cast is None:
                return None
            outputs.append(cast.format(f'q."{name}"') + f' AS "{name}"')
        return (f"SELECT {', '.join(outputs)} FROM ({self.sql}) AS q({', '.join(chr(34) + n + chr(34) for n in names)}) "
                f"LIMIT {int(max_rows) + 1}")


def pg_cast(dtype: pa.DataType) -> str | None:
    """``{}`` cast to the PostgreSQL type ADBC reads back as ``dtype`` (after an Arrow cast); None: none."""
    if pa.types.is_int64(dtype):
        return "CAST({} AS bigint)"
    if pa.types.is_int32(dtype):
        return "CAST({} AS integer)"
    if pa.types.is_int16(dtype) or pa.types.is_int8(dtype):
        return "CAST({} AS smallint)"
    if pa.types.is_float64(dtype):
        return "CAST({} AS double precision)"
    if pa.types.is_float32(dtype):
        return "CAST({} AS real)"
    if pa.types.is_string(dtype) or pa.types.is_large_string(dtype):
        return "CAST({} AS text)"
    if pa.types.is_boolean(dtype):
        return "CAST({} AS boolean)"
    if pa.types.is_timestamp(dtype):
        return "CAST({} AS timestamptz)" if dtype.tz is not None else "CAST({} AS timestamp)"
    if pa.types.is_date32(dtype):
        return "CAST({} AS date)"
    if pa.types.is_decimal128(dtype) and dtype.precision <= 38:
        # ADBC reads numeric as an opaque string: text, cast by Arrow to the exact decimal
        return f"CAST(CAST({{}} AS numeric({dtype.precision}, {dtype.scale})) AS text)"
    return None


def _column_types(storage: Storage, query: CheckedQuery) -> dict[str, dict[str, exp.DataType.Type | None]]:
    """Each table's columns and their sqlglot types (None: a type the warehouse does not read)."""
    tables: dict[str, dict[str, exp.DataType.Type | None]] = {}
    for table in query.tables:
        types: dict[str, exp.DataType.Type | None] = {}
        for name, column in storage.table_columns(table).items():
            kind = PLAIN_DLT_TYPES.get(str(column.get("data_type")))
            if kind == exp.DataType.Type.TIMESTAMPTZ and column.get("timezone") is False:
                kind = exp.DataType.Type.TIMESTAMP
            types[name] = kind
        tables[table] = types
    return tables


def _unsupported(tree: exp.Expression) -> str | None:
    """Why the tree may not be sent (the first node off the allow-list), or None."""
    for node in tree.walk():
        cls = type(node)
        if cls not in ALLOWED:
            return f"{cls.__name__} is not on the warehouse allow-list"
        allowed_args = _ALLOWED_ARGS.get(cls)
        if allowed_args is not None:
            extra = [k for k, v in node.args.items() if k not in allowed_args and v not in (None, False, [])]
            if extra:
                return f"{cls.__name__} with {', '.join(sorted(extra))}"
        if cls is exp.Join:
            if node.args.get("side") not in (None, "", "LEFT", "RIGHT", "FULL") or \
                    node.args.get("kind") not in (None, "", "INNER", "CROSS", "OUTER"):
                return f"a {node.args.get('side') or ''} {node.args.get('kind') or ''} JOIN"
        if cls is exp.With and node.args.get("recursive"):
            return "WITH RECURSIVE"
        if cls is exp.Literal and not (node.is_string or node.is_number):
            return "a literal of an unknown kind"
        if cls is exp.Identifier and not isinstance(node.this, str):
            return "an identifier that is not a name"
    return None


def plan(storage: Storage, query: CheckedQuery) -> Plan | str:
    """The query as PostgreSQL SQL, or why it stays in the sandbox (a short reason, for the log)."""
    types = _column_types(storage, query)
    try:
        tree = sqlglot.parse_one(query.sql, read="duckdb")
    except sqlglot.errors.SqlglotError:
        return "does not parse"
    reason = _unsupported(tree)
    if reason:
        return reason
    schema = {query.dataset: {t: {c: exp.DataType.build(k or "UNKNOWN") for c, k in cols.items()}
                              for t, cols in types.items()}}
    try:
        # names as stored (PostgreSQL tells "FullName" from "fullname"; see sql.case_sensitive)
        tree = qualify(tree, schema=schema, dialect=case_sensitive("duckdb"), validate_qualify_columns=True,
                       quote_identifiers=True, expand_stars=True, infer_schema=False)
        tree = annotate_types(tree, schema=schema, dialect=case_sensitive("duckdb"))
    except Exception as exc:  # noqa: BLE001 - any doubt: the sandbox
        return f"sqlglot cannot qualify it ({type(exc).__name__})"
    reason = _unsupported(tree)
    if reason:
        return reason
    checked = _check_and_rewrite(tree, query, types)
    if isinstance(checked, str):
        return checked
    if not isinstance(tree, exp.Query):  # a checked statement is a query; anything else stays in the sandbox
        return "not a query"
    try:
        sql = tree.sql("postgres")
    except Exception as exc:  # noqa: BLE001
        return f"no PostgreSQL text ({type(exc).__name__})"
    return Plan(sql, len(tree.selects), checked)


_COMPARISONS = (exp.EQ, exp.NEQ, exp.GT, exp.GTE, exp.LT, exp.LTE, exp.NullSafeEQ, exp.NullSafeNEQ, exp.Between,
                exp.In)


def _nan_guards(tree: exp.Expression, query: CheckedQuery,
                types: Mapping[str, Mapping[str, exp.DataType.Type | None]],
                physical: Mapping[int, tuple[str, str]]) -> tuple[str, ...]:
    """NaN compares differently: PostgreSQL (and duckdb's own operators) order it above every number and
    equal to itself, but a filter duckdb pushes into the sandbox's Arrow scan compares with Arrow's
    semantics (``NaN > 0.5`` is false there) -- and which filters duckdb pushes is its optimizer's
    choice. So the double columns a comparison reads must hold no NaN for the query to run in the
    warehouse: one ``EXISTS`` per table, in the query's own snapshot. ``physical``: id of each column
    node of a table of the dataset -> (table, column). A comparison over a CTE's or a subquery's column
    (which may come from any double column) guards every double column the query reads."""
    compared: set[tuple[str, str]] = set()
    for comparison in tree.find_all(*_COMPARISONS):
        for column in comparison.find_all(exp.Column):
            where = physical.get(id(column))
            if where is None:
                compared |= {(t, c) for t, used in query.tables.items() for c in (used if used is not None else types[t])}
            else:
                compared.add(where)
    guards = []
    for table in sorted({t for t, _ in compared}):
        floats = sorted(c for t, c in compared if t == table and types[table].get(c) == exp.DataType.Type.DOUBLE)
        if floats:
            test = " OR ".join(f"{_quoted(c)} = 'NaN'::float8" for c in floats)
            guards.append(f"SELECT EXISTS (SELECT 1 FROM {_quoted(query.dataset)}.{_quoted(table)} WHERE {test})")
    return tuple(guards)


def _quoted(name: str) -> str:
    return exp.to_identifier(name, quoted=True).sql("postgres")


def _sources(tree: exp.Expression, query: CheckedQuery) -> dict[int, str] | str:
    """id of each ``exp.Table`` that names a table of the dataset -> its name; a reason if one names anything else."""
    out: dict[int, str] = {}
    # the sandbox check's own resolution: a CTE's name hides a table only inside the CTE's scope
    for table in table_references(tree):
        if table.args.get("db") is None or table.db != query.dataset or table.name not in query.tables:
            return f"table {table.sql('duckdb')} is not a table of the dataset"
        out[id(table)] = table.name
    return out


_TEXT_COMPARISONS = (exp.EQ, exp.NEQ, exp.GT, exp.GTE, exp.LT, exp.LTE, exp.NullSafeEQ, exp.NullSafeNEQ, exp.Like)


def _literal_reason(literal: exp.Literal, texts: Mapping[int, exp.Column]) -> str | None:
    """Why a literal may not be sent, or None. Review findings: PostgreSQL reads ``1e-1`` as an exact
    numeric (duckdb: DOUBLE); it reads a string literal by the type it meets (``'today'``, ``'on'``,
    ``'01/02/2024'`` by DateStyle, timestamps rounded rather than truncated) where duckdb refuses or reads
    otherwise; and a string literal that is not compared with a text column (read ``COLLATE "C"``) sorts in
    the database's collation. So a string literal is sent only as a text column's comparand."""
    if literal.is_number:
        return "a number in scientific notation" if "e" in str(literal.this).lower() else None
    parent = literal.parent
    if isinstance(parent, _TEXT_COMPARISONS):
        other = parent.this if parent.expression is literal else parent.expression
    elif isinstance(parent, (exp.In, exp.Between)) and parent.this is not literal:
        other = parent.this
    else:
        other = None
    if other is None or id(other) not in texts:
        return "a string literal that is not compared with a text column"
    return None


def _check_and_rewrite(tree: exp.Expression, query: CheckedQuery,
                       types: Mapping[str, Mapping[str, exp.DataType.Type | None]]) -> str | tuple[str, ...]:
    """Why the qualified tree may not be sent, or (rewritten in place for PostgreSQL) its NaN guards."""
    sources = _sources(tree, query)
    if isinstance(sources, str):
        return sources
    for cast in list(tree.find_all(exp.Cast)):
        target = cast.to.this
        source = cast.this.type.this if cast.this.type is not None else None
        if cast.to.expressions or source not in _CASTS or target not in _CASTS[source]:
            return f"CAST from {source} to {target}"
    texts: dict[int, exp.Column] = {}
    physical: dict[int, tuple[str, str]] = {}
    for scope in traverse_scope(tree):  # each scope's sources include the enclosing ones (correlated columns)
        for column in scope.columns:
            if isinstance(column.this, exp.Star):
                return "a star that sqlglot did not expand"
            source = scope.sources.get(column.table) if column.table else None
            if not isinstance(source, exp.Table):
                continue  # a CTE's, a subquery's or an output column's: qualify resolved it; typed where made
            if id(source) not in sources:
                return f"column {column.name} of an unknown table"
            kind = types[sources[id(source)]].get(column.name)
            if kind is None:
                return f"column {column.name} of {sources[id(source)]} is not of a type read in the warehouse"
            physical[id(column)] = (sources[id(source)], column.name)
            if kind == exp.DataType.Type.TEXT:
                texts[id(column)] = column
    for literal in tree.find_all(exp.Literal):
        reason = _literal_reason(literal, texts)
        if reason:
            return reason
    divisions = list(tree.find_all(exp.Div))
    if len(divisions) > MAX_DIVISIONS or any(side.find(exp.Div) is not None
                                             for div in divisions for side in (div.this, div.expression)):
        return "nested divisions (each is spelled out as IEEE division)"
    guards = _nan_guards(tree, query, types, physical)
    for column in texts.values():
        column.replace(exp.Collate(this=column.copy(), expression=exp.to_identifier("C", quoted=True)))
    for div in divisions:
        div.replace(_ieee_division(div.this, div.expression))
    for like in list(tree.find_all(exp.Like)):
        like.replace(exp.Escape(this=like.copy(), expression=exp.Literal.string("")))
    for ordered in tree.find_all(exp.Ordered):
        if ordered.args.get("nulls_first") is None:
            ordered.set("nulls_first", False)
    return guards


def _ieee_division(x: exp.Expression, y: exp.Expression) -> exp.Expression:
    """``x / y`` as duckdb computes it (double division, IEEE at a zero divisor), in PostgreSQL terms."""
    def double(e: exp.Expression) -> exp.Expression:
        return exp.Cast(this=exp.Paren(this=e), to=exp.DataType.build("DOUBLE"))

    fx, fy = double(x), double(y)

    def const(text: str) -> exp.Expression:
        return exp.Cast(this=exp.Literal.string(text), to=exp.DataType.build("DOUBLE"))

    at_zero = exp.Case(ifs=[
        exp.If(this=exp.Is(this=fx.copy(), expression=exp.Null()), true=exp.Null()),
        exp.If(this=exp.or_(exp.EQ(this=fx.copy(), expression=const("NaN")),
                            exp.EQ(this=fx.copy(), expression=exp.Literal.number(0))), true=const("NaN")),
        exp.If(this=exp.GT(this=fx.copy(), expression=exp.Literal.number(0)), true=const("Infinity")),
    ], default=const("-Infinity"))
    return exp.Paren(this=exp.Case(
        ifs=[exp.If(this=exp.EQ(this=fy.copy(), expression=exp.Literal.number(0)), true=at_zero)],
        default=exp.Div(this=fx, expression=fy, typed=True, safe=False)))


@runtime_checkable
class Warehouse(Protocol):
    """A storage adapter whose database can run a checked query itself (``PostgresStorage``)."""

    def warehouse_query(self, sql: str, timeout: float, cancelled: Callable[[], bool] | None = None,
                        guards: Sequence[str] = (), remaining: float | None = None,
                        idle: float | None = None) -> pa.RecordBatchReader: ...


class WarehouseRouter:
    """A :class:`~flight_server.domain.sql.SqlEngine`: eligible queries on a :class:`Warehouse` adapter run there,
    all others in the sandbox."""

    def __init__(self, sandbox: SqlSandbox) -> None:
        self.sandbox = sandbox
        # never waited for (a query that finds none runs in the sandbox) and never held while waiting for
        # another lock or slot: the sandbox's share is taken before (schema) or after (a fallback) it
        self.slots = FairShare(WAREHOUSE_QUERIES, WAREHOUSE_PER_USER, 0, "warehouse query", "warehouse per user",
                               "warehouse queries")

    # what callers use on the sandbox
    @property
    def timeout(self) -> float:
        return self.sandbox.timeout

    @property
    def max_rows(self) -> int:
        return self.sandbox.max_rows

    def stats(self) -> dict[str, int]:
        return self.sandbox.stats()

    def close(self) -> None:
        self.sandbox.close()

    def plan(self, storage: Storage, query: CheckedQuery, parameters: pa.Table | None = None) -> Plan | None:
        """The warehouse plan of a query, or None when it runs in the sandbox."""
        if parameters is not None or not isinstance(storage, Warehouse):
            return None
        try:
            decided = plan(storage, query)
        except ServiceError:
            return None
        except Exception:  # noqa: BLE001 - a bug here must never fail a query the sandbox can answer
            log.exception("warehouse planning failed; the query runs in the SQL sandbox")
            return None
        if isinstance(decided, str):
            log.debug("query on %s runs in the SQL sandbox: %s", query.dataset, decided)
            return None
        return decided

    def schema(self, storage: Storage, query: CheckedQuery, cancelled: Callable[[], bool] | None = None,
               parameters: pa.Table | None = None, *, user: str | None = None) -> pa.Schema:
        """The sandbox's schema: a warehouse run is cast to exactly this (no table data is read)."""
        return self.sandbox.schema(storage, query, cancelled, parameters, user=user)

    def run(self, storage: Storage, query: CheckedQuery, cancelled: Callable[[], bool] | None = None,
            parameters: pa.Table | None = None, *, partition: Any = None, user: str | None = None) -> pa.RecordBatchReader:
        """The sandbox's answer: from the warehouse when :meth:`plan` allows, else from the sandbox.

        One ``server.sql_timeout`` covers the sandbox's bind of the schema and the warehouse run; a query
        PostgreSQL refuses before its first row then runs in the sandbox under the sandbox's own limit.
        ``partition``: one endpoint of a split result (transport/flight_sql/statements.py): the sandbox reads
        that slice only. ``user``: the caller, whose fair share of the sandbox's workers the query takes.
        """
        if partition is not None:
            return self.sandbox.run(storage, query, cancelled, parameters, partition=partition, user=user)
        decided = self.plan(storage, query, parameters)
        if decided is None:
            return self.sandbox.run(storage, query, cancelled, parameters, user=user)
        started = time.monotonic()
        schema = self.sandbox.schema(storage, query, cancelled, user=user)
        sql = decided.final_sql(schema, self.sandbox.max_rows)
        if sql is None:
            return self.sandbox.run(storage, query, cancelled, parameters, user=user)
        remaining = self.sandbox.timeout - (time.monotonic() - started)
        if remaining <= 0:
            raise SqlLimitExceeded.time_limit(self.sandbox.timeout, query.dataset)
        claimant = user or ""
        try:
            self.slots.acquire(claimant, 0, dataset=query.dataset)
        except Unavailable:  # this user's warehouse share (or every slot) is in use: the sandbox answers
            log.debug("warehouse share of %r in use; query on %s runs in the SQL sandbox", claimant, query.dataset)
            return self.sandbox.run(storage, query, cancelled, parameters, user=user)
        release = _once(lambda: self.slots.release(claimant))
        reader = None
        try:
            assert isinstance(storage, Warehouse)  # plan() said so
            reader = storage.warehouse_query(sql, self.sandbox.timeout, cancelled, decided.guards, remaining,
                                             idle=idle_limit(self.sandbox.timeout))
            first = _next(reader)
            if first is not None:
                first = conform(first, schema)
        except (SqlLimitExceeded, Cancelled):
            _close(reader, release)
            raise
        except (ServiceError, pa.ArrowException) as exc:
            # PostgreSQL refused what the sandbox may answer (an overflow, a comparison of two types), or
            # a value does not fit the sandbox's type: the sandbox's answer, or its error in its own words
            _close(reader, release)
            log.info("warehouse query on %s failed before its first row, running it in the SQL sandbox: %s",
                     query.dataset, exc)
            return self.sandbox.run(storage, query, cancelled, parameters, user=user)
        except BaseException as exc:
            _close(reader, release)
            if not isinstance(exc, Exception):
                raise
            # a bug on this path must not fail what the sandbox can answer
            log.exception("warehouse query on %s failed unexpectedly; running it in the SQL sandbox", query.dataset)
            return self.sandbox.run(storage, query, cancelled, parameters, user=user)
        return pa.RecordBatchReader.from_batches(schema, self._limited(reader, first, schema, query.dataset, release))

    def _limited(self, reader: pa.RecordBatchReader, first: pa.RecordBatch | None, schema: pa.Schema,
                 dataset: str, release: Callable[[], None]) -> Iterator[pa.RecordBatch]:
        rows = 0
        batch = first
        max_rows = self.sandbox.max_rows
        try:
            while batch is not None:
                rows += batch.num_rows
                if rows > max_rows:
                    raise SqlLimitExceeded(
                        f"query result exceeds the limit of {max_rows:,} rows (server.sql_max_rows); "
                        "aggregate or add a LIMIT", dataset=dataset, limit="server.sql_max_rows", value=max_rows)
                yield batch
                batch = _next(reader)
                if batch is not None:
                    try:
                        batch = conform(batch, schema)
                    except pa.ArrowException as exc:
                        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                        raise InvalidRequest(f"SQL error: {text[:500]}", dataset=dataset) from None
        finally:
            _close(reader, release)


def _once(action: Callable[[], None]) -> Callable[[], None]:
    """``action``, run at most once however often it is called (a slot is given back once)."""
    done = threading.Lock()

    def run() -> None:
        if done.acquire(blocking=False):
            action()
    return run


def _close(reader: pa.RecordBatchReader | None, release: Callable[[], None]) -> None:
    """End a warehouse stream (its transaction and connection), then give its warehouse slot back."""
    try:
        if reader is not None:
            reader.close()
    finally:
        release()


def _next(reader: pa.RecordBatchReader) -> pa.RecordBatch | None:
    try:
        return reader.read_next_batch()
    except StopIteration:
        return None


def conform(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    """A warehouse batch (columns c0, c1...) with the sandbox's names and types."""
    columns = [column if column.type == field.type else column.cast(field.type)
               for column, field in zip(batch.columns, schema)]
    return pa.RecordBatch.from_arrays(columns, schema=schema)
