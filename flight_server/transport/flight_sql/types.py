"""Arrow <-> SQL type names: what Flight SQL clients read about a column's type.

Statements are duckdb SQL, so the names are duckdb's: GetTables' ``table_schema`` fields carry them in
FlightSql.proto's ``ARROW:FLIGHT:SQL:*`` column metadata, and GetXdbcTypeInfo lists them with their XDBC
codes.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

XDBC_TYPE_INFO_SCHEMA = pa.schema([
    pa.field("type_name", pa.utf8(), nullable=False), pa.field("data_type", pa.int32(), nullable=False),
    pa.field("column_size", pa.int32()), pa.field("literal_prefix", pa.utf8()), pa.field("literal_suffix", pa.utf8()),
    pa.field("create_params", pa.list_(pa.field("item", pa.utf8(), nullable=False))),
    pa.field("nullable", pa.int32(), nullable=False), pa.field("case_sensitive", pa.bool_(), nullable=False),
    pa.field("searchable", pa.int32(), nullable=False), pa.field("unsigned_attribute", pa.bool_()),
    pa.field("fixed_prec_scale", pa.bool_(), nullable=False), pa.field("auto_increment", pa.bool_()),
    pa.field("local_type_name", pa.utf8()), pa.field("minimum_scale", pa.int32()), pa.field("maximum_scale", pa.int32()),
    pa.field("sql_data_type", pa.int32(), nullable=False), pa.field("datetime_subcode", pa.int32()),
    pa.field("num_prec_radix", pa.int32()), pa.field("interval_precision", pa.int32()),
])

# FlightSql.proto's column metadata keys (on the fields of GetTables' table_schema)
COLUMN_METADATA = "ARROW:FLIGHT:SQL:"

# The SQL types a column can have here (duckdb's names: statements are duckdb SQL): GetXdbcTypeInfo's rows.
# (name, XdbcDataType, column_size, literal (prefix, suffix), unsigned, XdbcDatetimeSubcode); date/time types
# have sql_data_type XDBC_DATETIME (9) and a subcode, the others their data_type.
_XDBC_TYPES: tuple[tuple[str, int, int | None, tuple[str, str] | None, bool | None, int | None], ...] = (
    ("BOOLEAN", -7, 1, None, None, None),
    ("TINYINT", -6, 3, None, False, None),
    ("BIGINT", -5, 19, None, False, None),
    ("UBIGINT", -5, 20, None, True, None),
    ("BLOB", -3, None, ("'", "'::BLOB"), None, None),
    ("JSON", -1, None, ("'", "'::JSON"), None, None),
    ("DECIMAL", 3, 38, None, False, None),
    ("INTEGER", 4, 10, None, False, None),
    ("UINTEGER", 4, 10, None, True, None),
    ("SMALLINT", 5, 5, None, False, None),
    ("FLOAT", 7, 7, None, False, None),
    ("DOUBLE", 8, 15, None, False, None),
    ("VARCHAR", 12, None, ("'", "'"), None, None),
    ("DATE", 91, 10, ("DATE '", "'"), None, 1),
    ("TIME", 92, 15, ("TIME '", "'"), None, 2),
    ("TIMESTAMP", 93, 26, ("TIMESTAMP '", "'"), None, 3),
    ("TIMESTAMP WITH TIME ZONE", 93, 32, ("TIMESTAMPTZ '", "'"), None, 3),
)


def xdbc_type_info(data_type: int | None = None) -> pa.Table:
    """GetXdbcTypeInfo's answer: every type, or those of one XDBC data type."""
    rows = []
    for name, xdbc, size, literal, unsigned, subcode in _XDBC_TYPES:
        if data_type is not None and xdbc != data_type:
            continue
        numeric = unsigned is not None
        rows.append({
            "type_name": name, "data_type": xdbc, "column_size": size,
            "literal_prefix": literal[0] if literal else None, "literal_suffix": literal[1] if literal else None,
            "create_params": ["precision", "scale"] if name == "DECIMAL" else None,
            "nullable": 1, "case_sensitive": name in ("VARCHAR", "JSON"), "searchable": 3,  # XDBC_SEARCHABLE_FULL
            "unsigned_attribute": unsigned, "fixed_prec_scale": False, "auto_increment": False if numeric else None,
            "local_type_name": name, "minimum_scale": 0 if name == "DECIMAL" else None,
            "maximum_scale": 38 if name == "DECIMAL" else None, "sql_data_type": 9 if subcode else xdbc,
            "datetime_subcode": subcode, "num_prec_radix": 10 if numeric else None, "interval_precision": None,
        })
    return pa.Table.from_pylist(rows, schema=XDBC_TYPE_INFO_SCHEMA)


def sql_type_name(arrow_type: pa.DataType, dlt_type: str | None = None) -> str:
    """The SQL (duckdb) name of a column's type, as statements see it."""
    if dlt_type == "json":
        return "JSON"
    t = arrow_type
    for test, name in ((pa.types.is_boolean, "BOOLEAN"), (pa.types.is_int8, "TINYINT"), (pa.types.is_int16, "SMALLINT"),
                       (pa.types.is_int32, "INTEGER"), (pa.types.is_int64, "BIGINT"), (pa.types.is_uint8, "UTINYINT"),
                       (pa.types.is_uint16, "USMALLINT"), (pa.types.is_uint32, "UINTEGER"), (pa.types.is_uint64, "UBIGINT"),
                       (pa.types.is_float32, "FLOAT"), (pa.types.is_float64, "DOUBLE"), (pa.types.is_date, "DATE"),
                       (pa.types.is_time, "TIME")):
        if test(t):
            return name
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return "VARCHAR"
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t):
        return "BLOB"
    if pa.types.is_decimal(t):
        return f"DECIMAL({t.precision},{t.scale})"
    if pa.types.is_timestamp(t):
        return "TIMESTAMP WITH TIME ZONE" if t.tz else "TIMESTAMP"
    return str(t).upper()


def column_metadata(field: pa.Field, catalog: str, dataset: str, table: str, hints: dict[str, Any]) -> pa.Field:
    """A table column as Flight SQL describes it: FlightSql.proto's column metadata keys on its field."""
    meta = {"CATALOG_NAME": catalog, "SCHEMA_NAME": dataset, "TABLE_NAME": table,
            "TYPE_NAME": sql_type_name(field.type, hints.get("data_type")),
            "IS_AUTO_INCREMENT": "0", "IS_READ_ONLY": "1", "IS_SEARCHABLE": "1",
            "IS_CASE_SENSITIVE": "1" if pa.types.is_string(field.type) or pa.types.is_large_string(field.type) else "0"}
    if pa.types.is_decimal(field.type):
        meta["PRECISION"], meta["SCALE"] = str(field.type.precision), str(field.type.scale)
    elif hints.get("precision") is not None:
        meta["PRECISION"] = str(hints["precision"])
    return field.with_metadata({**(field.metadata or {}), **{(COLUMN_METADATA + k).encode(): v.encode() for k, v in meta.items()}})

# GetSqlInfo's value: a dense union whose children are not nullable. pa.UnionArray.from_dense makes
