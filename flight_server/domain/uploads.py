"""What an upload may name and carry, decided before dlt runs (both write surfaces use this).

Names are compared the way dlt stores them: after the dataset schema's naming convention
(``schema.naming``, applied as dlt's extractor applies it; ``N`` is stored as ``n``, ``Issues_Event`` as ``issues_event``), so an upload
that names an existing table or column in another letter case goes into it, and dlt's reserved
``_dlt`` tables cannot be reached under any spelling (``_DLT_version``, `` _dlt_loads``).

Values are checked against the stored columns before anything reaches the destination: an integer
or decimal column whose Arrow type differs from the stored one while dlt sees the same data type
(``uint64`` and ``int64`` are both ``bigint``, so the contract passes) is cast to the stored type
with ``safe=True``, and nulls in a NOT NULL column are counted; a value that does not fit refuses
the whole upload with INVALID_ARGUMENT naming the column, instead of failing at the load step.

Values the destination would refuse only at the load step are refused here too: decimals wider than
:data:`MAX_DECIMAL_PRECISION` digits (no destination stores them) and ``timestamp[s]``/``timestamp[ms]``
values outside what a microsecond timestamp holds (duckdb, PostgreSQL and Delta store microseconds).

The table's shape is checked against dlt's nested tables: child tables (``orders__items``, tables with
a ``parent``) are dlt's own rows of their parent - linked by ``_dlt_parent_id`` - and are not written
directly, and a new column whose path is a child table's name (``items`` in ``orders``) is refused,
since dlt would then load the owner's nested ``items`` into that column instead of the child table.
``_dlt_id`` and ``_dlt_load_id`` in an upload (rows read back from the dataset carry them) are dropped:
dlt gives every saved row its own; any other ``_dlt`` column name is reserved. A table may have at
most :data:`~client.protocol.MAX_COLUMNS` columns after the save.

Every refusal is an :class:`~flight_server.domain.errors.InvalidRequest` naming the table or column and
what is allowed.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
from dlt.common.libs.pyarrow import (
    UnsupportedArrowTypeException,
    columns_to_arrow,
    get_column_type_from_py_arrow,
)
from dlt.common.normalizers.json.helpers import normalize_table_identifier
from dlt.common.schema import Schema
from dlt.common.schema.typing import TColumnSchema
from dlt.common.schema.utils import is_complete_column

from client.protocol import MAX_COLUMNS, MAX_NAME_CHARS
from flight_server.domain.errors import InvalidRequest

# ``.`` qualifies names in SQL, ``/`` separates folders, ``%``, ``{`` and ``}`` are dlt's file layout
# placeholders on the filesystem destination; control characters have no place in a name.
FORBIDDEN_TABLE_CHARS = "./%{}\\"
# the widest decimal every destination stores (duckdb and Delta: 38 digits; dlt's default cap)
MAX_DECIMAL_PRECISION = 38
# dlt's own row columns: an upload's values are replaced by dlt's, so they are dropped from it
DLT_ROW_COLUMNS = ("_dlt_id", "_dlt_load_id")
# timestamps are stored in microseconds in a signed 64-bit integer; duckdb keeps its two ends for
# infinity: per Arrow unit, the values that fit
_MICROS = {"s": 1_000_000, "ms": 1_000}
_TS_MAX = (1 << 63) - 2  # microseconds
TABLE_NAME_RULE = (f"a table name is 1 to {MAX_NAME_CHARS} characters, without control characters or any of "
                   f"{' '.join(FORBIDDEN_TABLE_CHARS)}, and does not start with _dlt (in any letter case)")


def _shown(name: str) -> str:
    """A caller's name for a message: control characters escaped, long names cut."""
    text = name.encode("unicode_escape").decode("ascii") if not name.isprintable() else name
    return text if len(text) <= 80 else text[:80] + f"... ({len(name)} characters)"


def table_name(schema: Schema, dataset: str, name: str) -> str:
    """The table ``name`` as dlt stores it in ``schema``; InvalidRequest when it cannot be written."""
    def refuse(why: str) -> InvalidRequest:
        return InvalidRequest(f"table name '{_shown(name)}' in dataset '{dataset}' {why}; {TABLE_NAME_RULE}",
                              dataset=dataset, table=name)

    if not isinstance(name, str) or not name.strip():
        raise refuse("is empty")
    if len(name) > MAX_NAME_CHARS:
        raise refuse(f"has {len(name)} characters")
    bad = sorted({c for c in name if c in FORBIDDEN_TABLE_CHARS or not c.isprintable()})
    if bad:
        raise refuse("contains " + ", ".join(repr(c) for c in bad))
    normalized = normalize_table_identifier(schema, schema.naming, name)  # what dlt's extractor does
    reserved = schema.naming.normalize_table_identifier("_dlt").lower()
    if normalized.lower().startswith(reserved) or name.strip().lower().startswith("_dlt"):
        raise refuse(f"is reserved for dlt (stored as '{normalized}')")
    return normalized


def _unstorable(dtype: pa.DataType) -> pa.DataType | None:
    """The (nested) Arrow type in ``dtype`` dlt cannot store, or None."""
    if pa.types.is_union(dtype):
        return dtype  # dlt maps unions to json, but no loader file format can write them
    if pa.types.is_run_end_encoded(dtype):
        return dtype  # dlt maps it by its values, but Parquet cannot write it (and it decodes to any size)
    if pa.types.is_dictionary(dtype):
        return _unstorable(dtype.value_type)
    if pa.types.is_nested(dtype):
        children = [dtype.field(i).type for i in range(dtype.num_fields)]
        return next((u for u in map(_unstorable, children) if u is not None), None)
    try:
        get_column_type_from_py_arrow(dtype)  # dlt's own mapping decides what it can store
    except UnsupportedArrowTypeException:
        return dtype
    return None


@dataclass(frozen=True)
class UploadShape:
    """How incoming batches become what dlt gets: stored names, stored types, stored nullability."""

    schema: pa.Schema  # the schema dlt sees
    casts: dict[str, pa.DataType] = field(default_factory=dict)  # column -> stored Arrow type
    stored_types: dict[str, str] = field(default_factory=dict)  # column -> stored dlt data type (messages)
    # the stored column schemas of the columns dlt sees with their stored data type: given to the
    # dlt resource as its column hints, so dlt's contract check compares like with like
    hints: dict[str, Any] = field(default_factory=dict)
    # positions of the incoming columns that are kept (None: all); dlt's own row columns are dropped
    keep: tuple[int, ...] | None = None
    # column -> Arrow timestamp unit whose values may not fit a microsecond timestamp
    coarse_timestamps: dict[str, str] = field(default_factory=dict)
    # stored JSON columns that arrive as text: each value must be JSON (checked before dlt sees it)
    json_text: frozenset[str] = frozenset()

    def conform(self, batch: Any, table: str, dataset: str) -> Any:
        """One batch (or table) in :attr:`schema`; a value that does not fit refuses the upload."""
        arrays = list(batch.columns)
        if self.keep is not None:
            arrays = [arrays[i] for i in self.keep]
        for i, f in enumerate(self.schema):
            unit = self.coarse_timestamps.get(f.name)
            if unit is not None:
                _check_timestamp_range(arrays[i], unit, f.name, table, dataset)
            if f.name in self.json_text:
                _check_json_text(arrays[i], f.name, table, dataset)
            if not f.nullable and arrays[i].null_count:
                raise InvalidRequest(
                    f"column '{f.name}' of table '{table}' is stored as NOT NULL; the upload has "
                    f"{arrays[i].null_count} null value(s) in it; nothing was written",
                    dataset=dataset, table=table, column_name=f.name,
                )
            target = self.casts.get(f.name)
            if target is None or arrays[i].type == target:
                continue
            try:
                arrays[i] = pc.cast(arrays[i], target, safe=True)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise InvalidRequest(
                    f"column '{f.name}' of table '{table}' is stored as {self.stored_types.get(f.name, target)}; the upload's "
                    f"{arrays[i].type} values cannot be stored in it ({str(exc).splitlines()[0]}); "
                    "nothing was written",
                    dataset=dataset, table=table, column_name=f.name,
                ) from None
        build = pa.Table.from_arrays if isinstance(batch, pa.Table) else pa.RecordBatch.from_arrays
        return build(arrays, schema=self.schema)


def shape(schema: Schema, dataset: str, table: str, incoming: pa.Schema, capabilities: Any,
          coerce: Mapping[str, Any] | None = None, served: pa.Schema | None = None) -> UploadShape:
    """Check the upload's columns and decide how its batches are conformed (see the module text).

    ``table`` is the stored table name (:func:`table_name`); ``coerce``: stored columns that a
    contract decision (``data_type: evolve``) wants the upload cast to, although dlt sees another type.
    ``served``: the Arrow schema the server reads the stored table as - a column that arrives with its
    served type is the stored column sent back unchanged, whatever dlt would infer from the Arrow type
    (``wei`` is served as a decimal, a ``time`` column on Delta as text, a variant column as its variant's
    type): it is saved with the stored column's hints, so a read saves back under ``freeze``.
    """
    stored = schema.get_table_columns(table) if table in schema.tables else {}
    parent = schema.tables.get(table, {}).get("parent")
    if parent:
        raise InvalidRequest(
            f"table '{table}' in dataset '{dataset}' is a child table of '{parent}': dlt keeps the nested rows "
            f"of '{parent}' in it, each linked to its parent row by _dlt_parent_id, so it cannot be written "
            f"on its own; save the rows into '{parent}' or into a table of your own; nothing was written",
            dataset=dataset, table=table,
        )
    if len(incoming) > MAX_COLUMNS:
        raise _too_many_columns(dataset, table, len(incoming), "the upload has")
    child_tables = {name: t.get("parent") for name, t in schema.tables.items() if t.get("parent")}
    reserved = schema.naming.normalize_identifier("_dlt").lower()
    seen: dict[str, str] = {}
    fields = []
    keep: list[int] = []
    casts: dict[str, pa.DataType] = {}
    hints: dict[str, Any] = {}
    coarse: dict[str, str] = {}
    json_columns: set[str] = set()
    for position, f in enumerate(incoming):
        if not f.name.strip():
            raise InvalidRequest(
                f"a column of table '{table}' has an empty name ('{_shown(f.name)}'); name every column; "
                "nothing was written", dataset=dataset, table=table, column_name=f.name,
            )
        odd = _unstorable(f.type)
        if odd is not None:
            raise InvalidRequest(
                f"column '{_shown(f.name)}' of table '{table}' has Arrow type {f.type}, which dlt cannot store"
                f"{'' if odd == f.type else f' ({odd} inside)'}; send numbers, strings, booleans, binary, "
                "decimals, dates, times, timestamps, or lists/structs/maps of them; nothing was written",
                dataset=dataset, table=table, column_name=f.name,
            )
        name = schema.naming.normalize_path(f.name)  # as dlt's normalize_table_identifiers (a__b stays)
        if name in seen:
            raise InvalidRequest(
                f"columns '{_shown(seen[name])}' and '{_shown(f.name)}' of table '{table}' are both stored as "
                f"'{name}'; send each column once; nothing was written",
                dataset=dataset, table=table, column_name=f.name,
            )
        seen[name] = f.name
        if name in DLT_ROW_COLUMNS:
            continue  # dlt gives every saved row its own id and load id
        if name.lower().startswith(reserved) or f.name.strip().lower().startswith("_dlt"):
            raise InvalidRequest(
                f"column '{_shown(f.name)}' of table '{table}' (stored as '{name}') has a name reserved for dlt's "
                "own columns (_dlt...); rename it; nothing was written",
                dataset=dataset, table=table, column_name=f.name,
            )
        path = schema.naming.shorten_fragments(table, name)
        if name not in stored and path in child_tables:
            raise InvalidRequest(
                f"column '{_shown(f.name)}' of table '{table}' (stored as '{name}') would take the place of the "
                f"child table '{path}', where dlt keeps the nested '{name}' rows of '{table}': the owner's next "
                f"load would put them into the column instead; rename the column; nothing was written",
                dataset=dataset, table=table, column_name=f.name,
            )
        keep.append(position)
        kept = stored.get(name)
        as_read = False
        nullable = f.nullable
        if kept is not None and is_complete_column(kept):
            # Arrow's nullability is a property of the stream, not of the column: the stored hint
            # stands (dlt's normalize still refuses nulls in a NOT NULL column). Otherwise dlt's
            # contract check reads a non-nullable Arrow field as a data type change.
            nullable = kept.get("nullable", True)
            # a JSON column reads as its JSON text (Arrow has no JSON type): that text goes back as JSON
            json_text = kept.get("data_type") == "json" and (pa.types.is_string(f.type) or pa.types.is_large_string(f.type))
            if json_text:
                json_columns.add(name)
            as_read = served is not None and name in served.names and served.field(name).type == f.type
            if _dlt_type(f.type) == kept.get("data_type") or json_text or as_read:
                # Arrow says less than the stored schema (``timestamp[us]`` has precision 6 where the
                # stored column has none; a key's NOT NULL): dlt lets resource hints override what it
                # reads from Arrow, so the stored hints are those hints and dlt's contract sees no
                # "data type change from timestamp to timestamp". A merge key on a stored nullable
                # column stays nullable (dlt's ``_merge_key`` keeps an explicit nullable).
                # (not ``variant``: dlt reads a variant hint in the incoming columns as a new type for
                # the column - "from text to text" under freeze; the stored column keeps its hint)
                hints[name] = {k: v for k, v in kept.items() if k != "variant"}
                if as_read and _dlt_type(f.type) != kept.get("data_type"):
                    # dlt merges the hints over what it reads from Arrow: a served ``decimal128(38, 0)`` would
                    # add precision 38 to a stored ``wei`` that has none - say "none" out loud
                    hints[name].update({k: kept.get(k) for k in ("precision", "scale")})
            # integers and decimals are where the same dlt type can hold values the stored one cannot
            may_overflow = pa.types.is_integer(f.type) or pa.types.is_decimal(f.type)
            if (may_overflow and _dlt_type(f.type) == kept.get("data_type")) or (coerce and name in coerce):
                target = columns_to_arrow({name: cast(TColumnSchema, dict(kept))}, capabilities, "UTC").field(name).type
                if target != f.type and not as_read:
                    casts[name] = target
        sent = casts.get(name, f.type)  # a stored decimal column's type, if the upload is cast to it
        stored_wide = kept is not None and (as_read or name in casts)  # the destination holds the stored type
        if pa.types.is_decimal(sent) and sent.precision > MAX_DECIMAL_PRECISION and not stored_wide:
            raise InvalidRequest(
                f"column '{_shown(f.name)}' of table '{table}' has Arrow type {f.type}: decimals of more than "
                f"{MAX_DECIMAL_PRECISION} digits cannot be stored; send decimal128 with a precision of at most "
                f"{MAX_DECIMAL_PRECISION} (or a string); nothing was written",
                dataset=dataset, table=table, column_name=f.name,
            )
        if pa.types.is_timestamp(f.type) and f.type.unit in _MICROS and name not in casts:
            coarse[name] = f.type.unit
        fields.append(pa.field(name, casts.get(name, f.type), nullable, f.metadata))
    new = {f.name for f in fields} - set(stored)
    total = len(set(stored) | {f.name for f in fields} | {"_dlt_load_id"})  # dlt adds it to every save
    if new and total > MAX_COLUMNS:
        raise _too_many_columns(dataset, table, total, f"with the upload's {len(new)} new column(s) it would have")
    target_schema = pa.schema(fields, incoming.metadata)
    stored_types = {n: str(stored[n].get("data_type")) for n in casts}
    return UploadShape(target_schema, casts, stored_types, hints,
                       None if len(keep) == len(incoming) else tuple(keep), coarse, frozenset(json_columns))


def _too_many_columns(dataset: str, table: str, count: int, what: str) -> InvalidRequest:
    return InvalidRequest(
        f"table '{table}' in dataset '{dataset}' may have at most {MAX_COLUMNS} columns (dlt's own included); "
        f"{what} {count}; nothing was written", dataset=dataset, table=table, max_columns=MAX_COLUMNS,
    )


def _check_timestamp_range(array: Any, unit: str, column: str, table: str, dataset: str) -> None:
    """Refuse ``timestamp[s]``/``timestamp[ms]`` values that do not fit a microsecond timestamp."""
    bounds = pc.min_max(array.cast(pa.int64())).as_py()  # a view of the same integers, no range check
    if bounds["min"] is None:
        return
    limit = _TS_MAX // _MICROS[unit]
    if -limit <= bounds["min"] and bounds["max"] <= limit:
        return
    raise InvalidRequest(
        f"column '{column}' of table '{table}' has timestamp[{unit}] values from {bounds['min']} to {bounds['max']}; "
        f"timestamps are stored in microseconds, which hold timestamp[{unit}] values from {-limit} to {limit} "
        f"(about {_year(-_TS_MAX)} to {_year(_TS_MAX)}); nothing was written",
        dataset=dataset, table=table, column_name=column,
    )


def _year(micros: int) -> str:
    year = int(1970 + micros / (365.2425 * 86400 * 1_000_000))
    return f"year {year}" if year > 0 else f"year {1 - year} BC"


def _dlt_type(dtype: pa.DataType) -> str | None:
    return get_column_type_from_py_arrow(dtype).get("data_type")


def _check_json_text(values: Any, column: str, table: str, dataset: str) -> None:
    """Every value of a text column going into a stored JSON column is JSON: destinations differ (duckdb and
    PostgreSQL refuse text that is none at the load, Delta and SQLite would store it, PostgreSQL turns ``''``
    into NULL), so it is checked here, for all alike. duckdb's ``json_valid`` runs over the Arrow column
    (vectorized; an in-memory connection with no file or network access)."""
    con = duckdb.connect()
    try:
        con.execute("SET enable_external_access = false")
        con.register("upload_values", pa.table({"v": values}))
        bad = con.execute("SELECT v FROM upload_values WHERE v IS NOT NULL AND NOT json_valid(v) LIMIT 1").fetchone()
    finally:
        con.close()
    if bad is not None:
        position = pc.index(values, bad[0]).as_py()
        raise InvalidRequest(
            f"column '{column}' of table '{table}' is stored as json; the upload's text value at row {position} "
            f"('{_shown(bad[0])}') is not JSON (a JSON column takes JSON text, e.g. '{{\"a\": 1}}' or '\"text\"'); "
            "nothing was written", dataset=dataset, table=table, column_name=column)


def conformed(batches: Iterator[Any], upload: UploadShape, table: str, dataset: str) -> Iterator[Any]:
    """The batches, each conformed to the upload's shape."""
    for batch in batches:
        yield upload.conform(batch, table, dataset)
