"""Client-side commands: explore a running server's catalog, read tables and SQL results, save files back.

They need the flight-share client and click only (``pip install 'flight-share[cli]'``), never dlt.
Names and shapes follow dlt's ``dlt dataset`` commands: ``show``, ``head`` with ``--limit``, ``row-counts``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import Any

import click
import pyarrow as pa

from client.cli.frame import connection_options, echo_lines, open_catalog
from client.cli.output import (
    FILE_FORMATS,
    FORMATS,
    Progress,
    format_from_path,
    open_input,
    render_table,
    write_batches,
)

WRITE_DISPOSITIONS = ("append", "replace", "merge")

progress_option = click.option(
    "--progress/--no-progress", "progress", default=None,
    help="Show a progress line (rows, bytes, rate) on stderr [default: only when stderr is a terminal].")


def output_options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option("-o", "--output", type=click.Path(dir_okay=False, writable=True), default=None,
                     help="Write the result to this file (format from its extension unless --format).")(f)
    f = click.option("-f", "--format", "fmt", type=click.Choice(FORMATS), default=None,
                     help="table (text, the default on a terminal), csv, json (JSON Lines) or parquet (needs --output).")(f)
    return progress_option(f)


def _peek(batches: Iterator[pa.RecordBatch]) -> tuple[pa.RecordBatch | None, Iterator[pa.RecordBatch]]:
    first = next(batches, None)
    return first, (itertools.chain([first], batches) if first is not None else iter(()))


def emit(relation: Any, fmt: str | None, output: str | None, progress: bool | None, label: str,
         total_rows: int | None = None) -> None:
    """Read a relation and print it as a text table, or stream it to a file / stdout in a file format."""
    if fmt is None:
        fmt = format_from_path(output, "--format") if output not in (None, "-") else "table"
    if fmt == "table" and output not in (None, "-"):
        raise click.UsageError("--format table prints to the terminal; pick csv, json or parquet for --output")
    bar = Progress(label, total_rows, enabled=progress)
    first, batches = _peek(relation.iter_batches())
    schema = first.schema if first is not None else relation.schema
    batches = bar.track(batches)
    if fmt == "table":
        table = pa.Table.from_batches(list(batches), schema=schema)
        bar.finish(keep=False)
        echo_lines(render_table(table))
        return
    rows = write_batches(batches, schema, fmt, output)
    bar.finish(keep=output not in (None, "-"))
    if output not in (None, "-"):
        click.echo(f"wrote {rows:,} row{'s' if rows != 1 else ''} to {output} ({fmt})")


@click.command("catalog")
@connection_options
def catalog_command(settings: Any) -> None:
    """Print the catalog: the datasets this profile may see.

    \b
    Example:
      flight-share catalog --url grpc://127.0.0.1:8815
    """
    with open_catalog(settings) as catalog:
        click.echo(str(catalog))


@click.command("show")
@click.argument("dataset")
@click.argument("table", required=False)
@connection_options
def show_command(settings: Any, dataset: str, table: str | None) -> None:
    """Show a dataset's tables, or one table's columns.

    Without TABLE: every table with its column and row counts. With TABLE: its columns and Arrow types.

    Only schemas and counts travel: no data is read.

    \b
    Examples:
      flight-share show github_events_dataset
      flight-share show github_events_dataset issues_event
    """
    with open_catalog(settings) as catalog:
        ds = catalog[dataset]
        if table is None:
            info = ds.info
            access = "read-write" if info.writable else "read-only"
            click.echo(str(ds).splitlines()[0])
            click.echo(f"{info.destination} ({info.destination_type}) {info.location}, {access} for profile {catalog.profile}")
            click.echo()
            tables = [ds[t] for t in ds.tables]
            echo_lines(render_table(pa.table({
                "table_name": [t.name for t in tables],
                "columns": pa.array([len(t.schema) for t in tables], pa.int64()),
                "row_count": pa.array([t.row_count() for t in tables], pa.int64()),
            })))
            return
        t = ds[table]
        schema = t.schema
        click.echo(f"Table {dataset}.{table}: {len(schema)} columns, {t.row_count():,} rows")
        click.echo()
        echo_lines(render_table(pa.table({
            "column": [f.name for f in schema],
            "type": [str(f.type) for f in schema],
            "nullable": [f.nullable for f in schema],
        })))


@click.command("head")
@click.argument("dataset")
@click.argument("table")
@click.option("-n", "--limit", type=click.IntRange(min=0), default=10, show_default=True, help="How many rows.")
@click.option("-c", "--columns", multiple=True, metavar="COL[,COL...]", help="Only these columns (repeat or comma-separate).")
@output_options
@connection_options
def head_command(settings: Any, dataset: str, table: str, limit: int, columns: tuple[str, ...], fmt: str | None,
                 output: str | None, progress: bool | None) -> None:
    """Print the first rows of a table.

    \b
    Examples:
      flight-share head github_events_dataset issues_event -n 5
      flight-share head github_events_dataset push_event -c id,created_at --format csv > push.csv
    """
    names = [c.strip() for spec in columns for c in spec.split(",") if c.strip()]
    with open_catalog(settings) as catalog:
        relation = catalog[dataset][table]
        if names:
            relation = relation.select(*names)
        emit(relation.limit(limit), fmt, output, progress, f"{dataset}.{table}", None)


@click.command("row-counts")
@click.argument("dataset")
@connection_options
def row_counts_command(settings: Any, dataset: str) -> None:
    """Count the rows of every table in a dataset.

    The counts are the destination's own (no data is read).

    \b
    Example:
      flight-share row-counts github_events_dataset
    """
    with open_catalog(settings) as catalog:
        counts = catalog[dataset].row_counts()
    echo_lines(render_table(pa.table({
        "table_name": list(counts), "row_count": pa.array(list(counts.values()), pa.int64())})))


@click.command("sql")
@click.argument("dataset")
@click.argument("query")
@output_options
@connection_options
def sql_command(settings: Any, dataset: str, query: str, fmt: str | None, output: str | None,
                progress: bool | None) -> None:
    """Run a read-only SQL query over a dataset.

    Tables are named as in the dataset; the result prints as a text table or streams to a file.

    \b
    Examples:
      flight-share sql github_events_dataset "SELECT payload__action, count(*) AS n FROM issues_event GROUP BY 1"
      flight-share sql github_events_dataset "SELECT * FROM push_event" --output push.parquet
      flight-share sql github_events_dataset "SELECT * FROM push_event" --format csv | head
    """
    with open_catalog(settings) as catalog:
        emit(catalog[dataset].sql(query), fmt, output, progress, f"sql on {dataset}")


@click.command("save")
@click.argument("dataset")
@click.argument("table")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("-f", "--format", "fmt", type=click.Choice(FILE_FORMATS), default=None,
              help="csv, json (JSON Lines, or one array of objects) or parquet [default: from the extension].")
@click.option("-w", "--write-disposition", type=click.Choice(WRITE_DISPOSITIONS), default=None,
              help="Add rows, replace the table, or merge on --primary-key. Default: as the stored table "
                   "(a merge table merges on its stored key; otherwise append).")
@click.option("--primary-key", multiple=True, metavar="COL[,COL...]", help="Key columns for merge (default: the stored key).")
@progress_option
@connection_options
def save_command(settings: Any, dataset: str, table: str, file: str, fmt: str | None, write_disposition: str | None,
                 primary_key: tuple[str, ...], progress: bool | None) -> None:
    """Upload a CSV, Parquet or JSON file into a table.

    The write runs under the contract of the server's profile, as Dataset.save does.

    Prints dlt's load info. A contract violation prints dlt's PipelineStepFailed text, writes nothing and
    exits with 4. CSV columns that the table already has are read with the table's types.

    \b
    Examples:
      flight-share save reports_dataset aggregated_issues report.csv
      flight-share save reports_dataset daily report.parquet -w merge --primary-key day
    """
    fmt = fmt or format_from_path(file, "--format")
    keys = [c.strip() for spec in primary_key for c in spec.split(",") if c.strip()]
    with open_catalog(settings) as catalog:
        ds = catalog[dataset]
        types = {f.name: f.type for f in ds[table].schema} if table in ds.tables else {}
        schema, batches, total = open_input(file, fmt, types, Progress(f"checking {file}", enabled=progress))
        bar = Progress(f"{file} -> {dataset}.{table}", total, enabled=progress)
        reader = pa.RecordBatchReader.from_batches(schema, bar.track(batches))
        try:
            info = ds.save(reader, table_name=table, write_disposition=write_disposition, primary_key=keys or None)
        finally:
            bar.finish(keep=True)
    click.echo(str(info))


DATA_COMMANDS = (catalog_command, show_command, head_command, row_counts_command, sql_command, save_command)
