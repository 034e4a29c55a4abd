"""The read-only SQL sandbox: one SELECT over one dataset's own tables, run where nothing else is.

Two independent walls:

1. **Parse and allow-list** (sqlglot): :mod:`.parse` parses a statement once, in the server process, with
   the parser shared fairly by user; :mod:`.references` finds the tables (CTEs resolved by scope), datasets
   and functions it names; :mod:`.check` admits a single query over the dataset's own tables and qualifies
   every reference, so the engine never resolves a name the caller chose. :mod:`.parameters` checks bound
   values; :mod:`.rowwise` tells which queries may run as one query per partition of their table.
2. **A locked-down engine in a killable process**: :mod:`.workers` keeps warm worker processes
   (:mod:`flight_server.domain.sql_worker` is their side) shared fairly by user; :mod:`.jobs` runs one
   query on one worker, streams it the tables it scans and owns its clock; :mod:`.sandbox`
   (:class:`SqlSandbox`) holds the limits. :mod:`.engine` is the interface the surfaces run SQL through
   (:class:`SqlEngine`: the sandbox, or the warehouse router).

Callers may import from here (every public name is re-exported) or from the module that holds a name.
"""

from flight_server.domain.sql.check import CheckedQuery, case_sensitive, check_query
from flight_server.domain.sql.engine import SqlEngine
from flight_server.domain.sql.jobs import SQL_IDLE_SECONDS, Source, engine_error_text
from flight_server.domain.sql.parameters import (
    MAX_PARAMETER_BYTES,
    MAX_PARAMETER_ROWS,
    check_parameters,
    parameter_count,
    parameter_schema,
)
from flight_server.domain.sql.parse import (
    ANALYSES_PER_USER,
    ANALYSES_WAITING_PER_USER,
    MAX_CONCURRENT_ANALYSES,
    MAX_QUERY_CHARS,
    parse_statement,
    syntax_error,
)
from flight_server.domain.sql.references import referenced_datasets, table_references
from flight_server.domain.sql.rowwise import DUCKDB_AGGREGATES, TablePartition, row_wise_table
from flight_server.domain.sql.sandbox import SCHEMA_MEMO_ENTRIES, SCHEMA_MEMO_MAX_FIELDS, SqlSandbox
from flight_server.domain.sql.workers import (
    IDLE_WORKER_RSS,
    MAX_QUERIES_PER_WORKER,
    SANDBOX_WORKERS,
    SQL_PER_USER,
    SQL_WAITING_PER_USER,
    WARM_WORKERS,
    WorkerPool,
)

__all__ = [
    "ANALYSES_PER_USER",
    "ANALYSES_WAITING_PER_USER",
    "DUCKDB_AGGREGATES",
    "IDLE_WORKER_RSS",
    "MAX_CONCURRENT_ANALYSES",
    "MAX_PARAMETER_BYTES",
    "MAX_PARAMETER_ROWS",
    "MAX_QUERIES_PER_WORKER",
    "MAX_QUERY_CHARS",
    "SANDBOX_WORKERS",
    "SCHEMA_MEMO_ENTRIES",
    "SCHEMA_MEMO_MAX_FIELDS",
    "SQL_IDLE_SECONDS",
    "SQL_PER_USER",
    "SQL_WAITING_PER_USER",
    "WARM_WORKERS",
    "CheckedQuery",
    "Source",
    "SqlEngine",
    "SqlSandbox",
    "TablePartition",
    "WorkerPool",
    "case_sensitive",
    "check_parameters",
    "check_query",
    "engine_error_text",
    "parameter_count",
    "parameter_schema",
    "parse_statement",
    "referenced_datasets",
    "row_wise_table",
    "syntax_error",
    "table_references",
]
