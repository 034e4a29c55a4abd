"""Which queries may run as several endpoints (Flight SQL's partitioned results), and one partition of one.

A row-wise query (:func:`row_wise_table`) may run as several independent queries, one per partition of its
table (``SqlSandbox.run(..., partition=...)``): the sandbox's limits hold per partition.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from sqlglot import exp

from flight_server.domain.sql.references import function_names

# duckdb's aggregate functions (``duckdb_functions()``, function_type 'aggregate', duckdb 1.5) and its
# macros that call one: any of them makes a query's answer depend on rows of other partitions.
# tests/test_sql_partitions.py checks this list against the duckdb that is installed.
DUCKDB_AGGREGATES = frozenset("""
    any_value approx_count_distinct approx_quantile approx_top_k arbitrary arg_max arg_max_null
    arg_max_nulls_last arg_min arg_min_null arg_min_nulls_last argmax argmin array_agg avg bit_and bit_or
    bit_xor bitstring_agg bool_and bool_or corr count count_if count_star countif covar_pop covar_samp
    cume_dist dense_rank entropy favg fill first first_value fsum group_concat histogram histogram_exact
    kahan_sum kurtosis kurtosis_pop lag last last_value lead list listagg mad max max_by mean median min
    min_by mode nth_value ntile percent_rank product quantile quantile_cont quantile_disc rank rank_dense
    regr_avgx regr_avgy regr_count regr_intercept regr_r2 regr_slope regr_sxx regr_sxy regr_syy
    reservoir_quantile row_number sem skewness stddev stddev_pop stddev_samp string_agg sum sum_no_overflow
    sumkahan var_pop var_samp variance
    geomean geometric_mean json_group_array json_group_object json_group_structure weighted_avg wavg
""".split())
# set-returning calls in a select list (their output rows are not one per input row): left to one stream
_GENERATORS = frozenset({"unnest", "explode", "posexplode", "generate_subscripts", "json_each", "json_tree"})
# the parts of a SELECT a row-wise query may have (anything else set: one endpoint)
_ROW_WISE_SELECT_ARGS = frozenset({"expressions", "from_", "where"})
_ROW_WISE_TABLE_ARGS = frozenset({"this", "db", "catalog", "alias"})


def row_wise_table(tree: exp.Expression) -> str | None:
    """The one table a query reads row by row, or None.

    A query is row-wise when its answer over a table is the union of its answers over any split of
    the table's rows: a plain ``SELECT <expressions> FROM <one table> [WHERE <condition>]`` with no
    GROUP BY / HAVING / aggregate / window / QUALIFY / DISTINCT / ORDER BY / LIMIT / OFFSET / sample /
    set operation / CTE / join / pivot, no nested SELECT anywhere (a scalar subquery would read the
    whole table in every part), and no set-returning call (``unnest``). Row-wise functions are fine.
    Such a query may run as several endpoints, each over one partition of the table (Flight SQL's
    ``adbc_execute_partitions``). Conservative: any doubt answers None (one endpoint, as before).

    ``tree``: a statement's tree, checked or not (a checked tree names ``"dataset"."table"``).
    """
    try:
        return _row_wise_table(tree)
    except RecursionError:
        return None


def _row_wise_table(tree: exp.Expression) -> str | None:
    if type(tree) is not exp.Select:
        return None
    if any(value not in (None, False, [], "") for key, value in tree.args.items() if key not in _ROW_WISE_SELECT_ARGS):
        return None
    source = tree.args.get("from_")
    if not isinstance(source, exp.From) or type(source.this) is not exp.Table:
        return None
    table = source.this
    if not isinstance(table.this, exp.Identifier):
        return None
    if any(value not in (None, False, [], "") for key, value in table.args.items() if key not in _ROW_WISE_TABLE_ARGS):
        return None
    alias = table.args.get("alias")
    if alias is not None and (not isinstance(alias, exp.TableAlias) or alias.args.get("columns")):
        return None  # a column list renames by position: fine in itself, but nothing gains from allowing it
    if not tree.expressions:
        return None
    nodes: Iterator[exp.Expression] = tree.walk()  # every node (sqlglot types them as the tree's own class)
    for node in nodes:
        if node is tree:
            continue
        if isinstance(node, (exp.Query, exp.Subquery, exp.Exists, exp.AggFunc, exp.Window, exp.UDTF, exp.Table,
                             exp.WindowSpec, exp.With, exp.CTE, exp.Lateral, exp.Join, exp.TableSample)) \
                and node is not table:
            return None
    for name in function_names(tree):
        if name in DUCKDB_AGGREGATES or name in _GENERATORS:
            return None
    return table.name


@dataclass(frozen=True)
class TablePartition:
    """One partition of the table a row-wise query reads (:func:`row_wise_table`): the query runs over
    those rows only. ``spec`` is a :class:`~flight_server.domain.storage.Partition`'s spec, as the storage
    adapter planned it: never one a client wrote (the transport seals it into the ticket)."""

    table: str
    spec: Mapping[str, Any]
