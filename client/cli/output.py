"""What the command line shows and writes: text tables, CSV / JSON Lines / Parquet files, a progress line.

Results stream batch by batch into files; only the text table is held whole (it is for people). The
progress line goes to stderr and only when stderr is a terminal, so pipes and files stay clean.
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import json
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import pyarrow as pa

FORMATS = ("table", "csv", "json", "parquet")
FILE_FORMATS = ("csv", "json", "parquet")
_EXTENSIONS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".ndjson": "json", ".parquet": "parquet", ".pq": "parquet"}
MAX_CELL = 40
PUT_BATCH_ROWS = 65_536


class FileFormatError(ValueError):
    """A data file, or a format choice, that cannot work; the message names the file or the option."""


def format_from_path(path: str | Path, option: str) -> str:
    fmt = _EXTENSIONS.get(Path(path).suffix.lower())
    if fmt is None:
        raise FileFormatError(f"cannot tell the format of {path} from its extension; pass {option} "
                          f"({'|'.join(FILE_FORMATS)})")
    return fmt


# -- progress -------------------------------------------------------------------------------------------


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


class Progress:
    """``label  12,345/50,000 rows  [######----]  3.4 MB  1.2 MB/s`` on stderr, updated in place."""

    def __init__(self, label: str, total_rows: int | None = None, enabled: bool | None = None,
                 stream: IO[str] | None = None, interval: float = 0.1) -> None:
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()  # redraw in place; a forced progress into a file gets the last line only
        self.enabled = self.live if enabled is None else enabled
        self.label = label
        self.total_rows = total_rows if total_rows is not None and total_rows >= 0 else None
        self.rows = 0
        self.bytes = 0
        self.interval = interval
        self.started = time.monotonic()
        self._shown = 0.0
        self._width = 0

    def update(self, rows: int, nbytes: int) -> None:
        self.rows += rows
        self.bytes += nbytes
        now = time.monotonic()
        if self.enabled and self.live and now - self._shown >= self.interval:
            self._shown = now
            self._draw(self.line())

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-6)
        rows = f"{self.rows:,}" + (f"/{self.total_rows:,}" if self.total_rows is not None else "") + " rows"
        bar = ""
        if self.total_rows:
            done = min(self.rows / self.total_rows, 1.0)
            bar = f"  [{'#' * int(done * 20):-<20}] {done:4.0%}"
        return (f"{self.label}  {rows}{bar}  {_size(self.bytes)}  {_size(self.bytes / elapsed)}/s  "
                f"{self.rows / elapsed:,.0f} rows/s  {elapsed:.1f}s")

    def _draw(self, text: str) -> None:
        pad = max(self._width - len(text), 0)
        self.stream.write(("\r" if self.live else "") + text + " " * pad)
        self.stream.flush()
        self._width = len(text)

    def finish(self, keep: bool = True) -> None:
        """The final line (kept), or a cleared line before other output (not kept)."""
        if not self.enabled:
            return
        if keep:
            self._draw(self.line())
            self.stream.write("\n")
        elif self._width:
            self.stream.write("\r" + " " * self._width + "\r")
        self.stream.flush()

    def track(self, batches: Iterable[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            self.update(batch.num_rows, batch.nbytes)
            yield batch


# -- text tables ------------------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, (dict, list)):
        text = json.dumps(value, default=_json_default, ensure_ascii=False)
    elif isinstance(value, bytes):
        text = value.hex()
    else:
        text = str(value)
    text = text.replace("\n", "\\n").replace("\t", " ")
    return text if len(text) <= MAX_CELL else text[: MAX_CELL - 1] + "…"


def render_table(table: pa.Table) -> list[str]:
    """A table as aligned text lines: header, rule, rows (numbers right-aligned), and a row count."""
    names = table.column_names
    columns = [[_cell(v) for v in table.column(i).to_pylist()] for i in range(table.num_columns)]
    numeric = [pa.types.is_integer(f.type) or pa.types.is_floating(f.type) or pa.types.is_decimal(f.type)
               for f in table.schema]
    widths = [max([len(n), *(len(v) for v in col)]) for n, col in zip(names, columns)]
    lines = ["  ".join(n.ljust(w) for n, w in zip(names, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    for r in range(table.num_rows):
        cells = [col[r].rjust(w) if num else col[r].ljust(w) for col, w, num in zip(columns, widths, numeric)]
        lines.append("  ".join(cells).rstrip())
    lines.append(f"({table.num_rows:,} row{'s' if table.num_rows != 1 else ''})")
    return lines


# -- result files -----------------------------------------------------------------------------------------


def _json_default(value: Any) -> Any:
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    return str(value)


def write_batches(batches: Iterable[pa.RecordBatch], schema: pa.Schema, fmt: str, output: str | None) -> int:
    """Stream batches as CSV, JSON Lines or Parquet to ``output`` (stdout when None); returns rows written."""
    import pyarrow.csv as pacsv

    if fmt == "parquet" and output in (None, "-"):
        raise FileFormatError("parquet is binary: pass --output FILE")
    rows = 0
    to_stdout = output in (None, "-")
    if fmt == "parquet":
        import pyarrow.parquet as pq

        with pq.ParquetWriter(output, schema) as writer:
            for batch in batches:
                writer.write_batch(batch)
                rows += batch.num_rows
        return rows
    sink: Any = sys.stdout.buffer if to_stdout else open(output, "wb")  # type: ignore[arg-type]
    try:
        if fmt == "csv":
            writer = pacsv.CSVWriter(sink, schema)
            try:
                for batch in batches:
                    writer.write_batch(batch)
                    rows += batch.num_rows
            finally:
                writer.close()
        elif fmt == "json":
            for batch in batches:
                for record in batch.to_pylist():
                    sink.write(json.dumps(record, default=_json_default, ensure_ascii=False).encode() + b"\n")
                rows += batch.num_rows
        else:
            raise FileFormatError(f"unknown format '{fmt}'; choose one of {', '.join(FILE_FORMATS)}")
    finally:
        if to_stdout:
            sink.flush()
        else:
            sink.close()
    return rows


# -- input files (save) -----------------------------------------------------------------------------------


def _aligned(table: pa.Table, types: Mapping[str, pa.DataType]) -> pa.Table:
    """Cast columns the target table already has to its types where that works; leave the rest to the contract."""
    for i, name in enumerate(table.column_names):
        target = types.get(name)
        if target is not None and table.column(i).type != target:
            try:
                table = table.set_column(i, pa.field(name, target), table.column(i).cast(target))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
                pass
    return table


def open_input(path: str, fmt: str, types: Mapping[str, pa.DataType] | None = None,
               checking: Progress | None = None) -> tuple[pa.Schema, Iterator[pa.RecordBatch], int | None]:
    """A data file as (schema, batches, total rows if known). ``types``: the target table's columns.

    CSV streams, its columns read with the table's types where the table has them (CSV has no types of its
    own). It is read twice: once to find a bad value before anything is sent (a stream that breaks off
    midway would be stored up to there), once to send. Parquet streams with its own types; JSON is JSON
    Lines (or one array of objects), read whole.
    """
    types = dict(types or {})
    if fmt == "csv":
        import pyarrow.csv as pacsv

        def reader() -> pa.RecordBatchReader:
            return pacsv.open_csv(path, convert_options=pacsv.ConvertOptions(column_types=types))

        try:
            first = reader()
            schema, total = first.schema, 0
            for batch in first:
                total += batch.num_rows
                if checking is not None:
                    checking.update(batch.num_rows, batch.nbytes)
        except pa.ArrowInvalid as exc:
            raise FileFormatError(f"{path}: {exc}") from None
        finally:
            if checking is not None:
                checking.finish(keep=False)
        return schema, iter(reader()), total
    if fmt == "parquet":
        import pyarrow.parquet as pq

        file = pq.ParquetFile(path)
        return file.schema_arrow, file.iter_batches(batch_size=PUT_BATCH_ROWS), file.metadata.num_rows
    if fmt == "json":
        with open(path, "rb") as f:
            head = f.read(4096).lstrip()
        if head.startswith(b"["):
            with open(path, "rb") as f:
                try:
                    records = json.load(f)
                except ValueError as exc:
                    raise FileFormatError(f"{path}: not valid JSON: {exc}") from None
            if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
                raise FileFormatError(f"{path}: a JSON array must hold objects, one per row")
            table = pa.Table.from_pylist(records)
        else:
            import pyarrow.json as pajson

            try:
                table = pajson.read_json(path)
            except pa.ArrowInvalid as exc:
                raise FileFormatError(f"{path}: {exc}") from None
        table = _aligned(table, types)
        return table.schema, iter(table.to_batches(max_chunksize=PUT_BATCH_ROWS)), table.num_rows
    raise FileFormatError(f"unknown format '{fmt}'; choose one of {', '.join(FILE_FORMATS)}")
