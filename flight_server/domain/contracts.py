"""Schema contracts on writes: an incoming Arrow schema against the stored dlt schema.

The decision is dlt's own (``Schema.resolve_contract_settings_for_table`` +
``Schema.apply_schema_contract``, exactly what dlt's extract step runs), made on the Arrow schema
alone so a violation is known before any row is read or stored. The writer then runs a real dlt
pipeline with the same contract, so discard modes filter the data exactly as dlt does.

Only the *wording* is ours: dlt 1.31 phrases its DataValidationError differently from the documented
dlt+ workflow, so :func:`violation_message` formats the documented text from the error's fields.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
from dlt.common.destination.capabilities import (
    DestinationCapabilitiesContext,
    adjust_schema_to_capabilities,
)
from dlt.common.libs.pyarrow import py_arrow_to_table_schema_columns
from dlt.common.schema import Schema
from dlt.common.schema.exceptions import DataValidationError
from dlt.common.schema.typing import TSchemaContractDict
from dlt.common.schema.utils import is_complete_column, merge_columns, new_table

from flight_server.domain.config import Contract
from flight_server.domain.errors import ContractViolation

_VERBS = {"tables": "tables", "columns": "columns", "data_type": "data types"}


@dataclass(frozen=True)
class ContractDecision:
    """An accepted write: the dlt contract to run the pipeline with and what it will filter."""

    contract: TSchemaContractDict
    filters: list[tuple[str, str, str]]  # (entity, name, mode) as dlt returns them
    # columns whose stored type differs from the upload's, under ``data_type: evolve``: the stored
    # column schemas the upload is cast to (see :func:`check_write`)
    coerce: dict[str, Any] = field(default_factory=dict)


def expand_contract(contract: Contract) -> TSchemaContractDict:
    """dlt's expansion of a shorthand or partial contract (None means dlt's default: evolve); a new dict."""
    return Schema.expand_schema_contract_settings(contract or {})  # type: ignore[arg-type]


def violation_message(schema_name: str, table: str, column: str | None, entity: str, mode: str,
                      existing_type: str | None = None, incoming_type: str | None = None) -> str:
    """The documented dlt+ wording of a contract violation."""
    if entity == "tables":
        where = f"In Schema: {schema_name} Table: {table}."
        what = f"Trying to add table {table} but new tables are frozen."
    elif entity == "columns":
        where = f"In Schema: {schema_name} Table: {table} Column: {column}."
        what = f"Trying to add column {column} to table {table} but columns are frozen."
    else:
        where = f"In Schema: {schema_name} Table: {table} Column: {column}."
        what = (f"Trying to change data type of column {column} in table {table} from {existing_type} "
                f"to {incoming_type} but data types are frozen.")
    return f"In schema: {schema_name}: {where} Contract on {entity} with mode {mode} is violated. {what}"


def spell_out_nullability(schema: Schema, table: str) -> None:
    """Write dlt's default ``nullable: true`` into the table's complete columns that leave it out.

    dlt reads a missing ``nullable`` as true, but its contract check compares the key itself: a column
    declared with ``columns={"amount": {"data_type": "decimal", ...}}`` is stored without it, while every
    Arrow column arrives with ``nullable: true`` - so under ``data_type: freeze`` a table refused its own
    rows ("from decimal (nullable) to decimal (nullable)"), in dlt's own extractor as well. The save's
    copy of the stored schema says the default out loud; the owner's stored hints are put back after
    the load (``Writer._keep_owner_table_hints``), so the stored schema does not change."""
    if table not in schema.tables:
        return
    for column in schema.tables[table]["columns"].values():
        if is_complete_column(column) and "nullable" not in column:
            column["nullable"] = True


def check_write(schema: Schema, table: str, arrow_schema: pa.Schema, contract: Contract,
                resource: Any = None, capabilities: Any = None) -> ContractDecision:
    """Decide a write of ``arrow_schema`` into ``table``; raise ContractViolation (documented text).

    ``resource``: the dlt resource the writer will run; its hints (primary key, write disposition,
    columns) are merged over the Arrow columns exactly as dlt's Arrow extractor does.
    ``capabilities``: the destination's; the Arrow columns are adjusted to them first, as dlt's Arrow
    extractor does (it drops the default timestamp precision and the timezone flag) - without that,
    ``timestamp[us]`` into a stored ``timestamp`` column reads as a data type change "from timestamp
    to timestamp" and is refused under ``data_type: freeze`` although dlt itself would accept it.
    """
    settings = expand_contract(contract)
    probe = schema.clone()
    probe.set_schema_contract(settings)  # what pipeline.run(schema_contract=...) does to the source schema
    caps = capabilities or DestinationCapabilitiesContext.generic_capabilities()
    columns = adjust_schema_to_capabilities(py_arrow_to_table_schema_columns(arrow_schema), caps)
    columns = {n: c for n, c in columns.items() if is_complete_column(c)}  # as dlt: pa.null() fields say nothing
    if resource is not None:
        merge_columns(columns, resource.compute_table_schema(arrow_schema.empty_table())["columns"])
    computed = new_table(table, columns=list(columns.values()))
    resolved = probe.resolve_contract_settings_for_table(table, computed)
    if resolved["columns"] != "evolve" and probe.is_new_table(table):
        computed["x-normalizer"] = {"evolve-columns-once": True}  # as dlt's extractor: a new table may set its columns
    empty = arrow_schema.empty_table()
    try:
        _, filters = probe.apply_schema_contract(resolved, computed, data_item=empty)
    except DataValidationError as exc:
        raise _violation(exc, probe, table, computed) from None
    coerce: dict[str, Any] = {}
    if resolved["data_type"] == "evolve" and not probe.is_new_table(table):
        # dlt keeps Arrow data as it is but writes the new type into the stored schema (it makes
        # variant columns only for row-by-row data), and no destination changes a column's type: the
        # load then fails after the schema was stored, or the schema lies about the data. So an
        # evolving upload is cast to the stored type instead; values that do not fit are refused.
        stored = schema.get_table_columns(table)
        for name, column in computed["columns"].items():
            kept = stored.get(name)
            if kept and kept.get("data_type") and column.get("data_type") and kept["data_type"] != column["data_type"]:
                coerce[name] = dict(kept)
    return ContractDecision(settings, list(filters or []), coerce)


_TYPE_HINTS = ("nullable", "precision", "scale", "timezone")  # dlt's TColumnType besides data_type


def _with_hints(column: Mapping[str, Any], hints: list[str]) -> str:
    """A column's type with the hints that differ, e.g. ``text (not null)``."""
    words = []
    for hint in hints:
        if hint == "nullable":
            words.append("nullable" if column.get("nullable", True) else "not null")
        elif hint == "timezone":
            words.append("with time zone" if column.get("timezone", True) else "without time zone")
        else:
            words.append(f"{hint} {column.get(hint)}")
    text = str(column.get("data_type"))
    return f"{text} ({', '.join(words)})" if words else text


def _violation(exc: DataValidationError, schema: Schema, table: str, computed: Mapping[str, Any]) -> ContractViolation:
    entity = str(exc.schema_entity)
    column = exc.column_name
    existing_type: str | None = None
    incoming_type: str | None = None
    if entity == "data_type" and column:
        existing = schema.get_table_columns(table).get(column, {})
        incoming = computed["columns"].get(column, {})
        existing_type, incoming_type = existing.get("data_type"), incoming.get("data_type")
        if existing_type == incoming_type:  # same type, other hints (dlt counts nullable, precision ...)
            changed = [p for p in _TYPE_HINTS if p in incoming and incoming[p] != existing.get(p)]
            existing_type, incoming_type = _with_hints(existing, changed), _with_hints(incoming, changed)
    text = violation_message(exc.schema_name, exc.table_name or table, column, entity, str(exc.contract_mode),
                             existing_type, incoming_type)
    fields: dict[str, Any] = {
        "schema_name": exc.schema_name,
        "table_name": exc.table_name or table,
        "column_name": column,
        "schema_entity": entity,
        "contract_mode": str(exc.contract_mode),
    }
    if existing_type or incoming_type:
        fields.update(existing_data_type=existing_type, incoming_data_type=incoming_type)
    return ContractViolation(text, **fields)
