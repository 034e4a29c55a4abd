"""A dataset of Delta Lake tables written by dlt's ``filesystem`` destination (``table_format: delta``).

Works on a local folder and on S3 (or any S3-compatible store). Everything about *where* things are
comes from dlt itself: the destination factory resolves bucket and credentials (the project file's
``credentials`` mapping, or dlt's config providers), dlt's filesystem client reads the newest stored
schema from the ``_dlt_version`` folder and names each table's location, and dlt turns the
credentials into ``deltalake`` storage options (including ``aws_allow_http`` for an http endpoint).

Reads: ``DeltaTable(...).to_pyarrow_dataset()`` → ``scanner(columns=..., batch_size=...)`` →
``to_reader()``: an Arrow C++ stream with column projection pushed into the Parquet reads; a LIMIT
reads only the first batches (``Dataset.head``), a large one streams through duckdb. Row counts come
from the Delta log's per-file statistics (``num_records``), falling back to Parquet footers.

SQL: a fresh in-memory duckdb connection per query, a schema named like the dataset holding one view
per referenced table over its Arrow dataset; external access is switched off before the query runs.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import urlparse

import dlt
import duckdb
import pyarrow as pa
import pyarrow.dataset as pads

from flight_server.domain.config import DatasetConfig, DestinationConfig
from flight_server.domain.errors import InvalidRequest, NotFound, Unavailable
from flight_server.domain.identifiers import quote
from flight_server.domain.lifetime import isolated, owning_reader
from flight_server.domain.pushdown import Predicate, applicable, arrow_filter, dlt_types
from flight_server.domain.storage import (
    LOADS_TABLE,
    SHARED_SCHEMA_TTL,
    Partition,
    Storage,
    StoredSchema,
    conform,
    contiguous_groups,
    not_null_hints,
    plain_arrow,
    split_evenly,
)

log = logging.getLogger(__name__)

# a LIMIT up to this many rows is read with ``Dataset.head`` (stops after enough batches); larger
# limits stream through duckdb instead of materialising
HEAD_LIMIT_ROWS = 1_000_000
# table versions kept open for tickets planned against a version that is no longer the newest
PINNED_VERSIONS = 4



def mask_url(url: str) -> str:
    """A bucket URL without user info (keys), always ending in ``/``."""
    if "://" not in url:
        url = "file://" + url
    parsed = urlparse(url)
    netloc = parsed.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    text = f"{parsed.scheme}://{netloc}{parsed.path}"
    return text if text.endswith("/") else text + "/"


def _load_records(schema: pa.Schema, bodies: list[bytes], dataset: str) -> pa.Table:
    """dlt's load records (JSON, one per file) as rows of ``schema``; unreadable ones are logged and left out."""
    import io

    import pyarrow.json as pajson

    options = pajson.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore")

    def parse(text: bytes) -> pa.Table:
        return pajson.read_json(io.BytesIO(text), parse_options=options).select(schema.names).cast(schema)

    texts = [b.strip() for b in bodies if b.strip()]
    if not texts:
        return schema.empty_table()
    try:
        return parse(b"\n".join(texts))  # all at once: the usual case
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, KeyError):
        pass
    tables = []
    for text in texts:  # one by one, to leave out only what is broken
        try:
            tables.append(parse(text))
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, KeyError):
            log.warning("a load record of dataset %s is not one of dlt's records; left out of its load history", dataset)
    return pa.concat_tables(tables) if tables else schema.empty_table()


def _reader_of(con: duckdb.DuckDBPyConnection, sql: str, batch_rows: int, *owners: Any) -> pa.RecordBatchReader:
    """duckdb's stream of a query; the connection (it holds the registered datasets) lives as long."""
    rel = con.sql(sql)
    to_reader = getattr(rel, "to_arrow_reader", None)  # duckdb >= 1.4; fetch_record_batch is deprecated
    reader = to_reader(batch_rows) if to_reader else rel.fetch_record_batch(batch_rows)
    return owning_reader(reader, con, *owners, on_close=con.close)


class DeltaStorage(Storage):
    """One dataset (a folder of Delta tables) under a filesystem bucket URL."""

    table_format = "delta"
    schema_ttl = SHARED_SCHEMA_TTL  # other replicas and pipelines load into the same bucket

    def __init__(self, dataset: DatasetConfig, destination: DestinationConfig, batch_rows: int = 122_880) -> None:
        super().__init__(dataset, destination)
        assert destination.location is not None
        self.bucket_url = destination.location
        self.batch_rows = batch_rows
        self._client: Any = None  # dlt FilesystemClient bound to the stored schema
        self._storage_options: dict[str, str] = {}
        self._tables: dict[str, Any] = {}  # table -> deltalake.DeltaTable (kept, updated incrementally)
        self._table_locks: dict[str, threading.Lock] = {}
        # (table, version) -> DeltaTable at that version, for tickets planned against an older version
        self._versions: OrderedDict[tuple[str, int], Any] = OrderedDict()
        self._row_bytes: dict[tuple[str, int, tuple[str, ...]], float | None] = {}  # see row_bytes
        # the load history's files read so far, and their records (see _load_history)
        self._loads_seen: tuple[frozenset[str], pa.Table] = (frozenset(), pa.table({}))

    # --- dlt --------------------------------------------------------------------------------
    def dlt_destination(self) -> Any:
        """dlt's filesystem destination for this bucket.

        dlt has no destination-wide table format: resources loaded into it must carry
        ``table_format="delta"`` (see :attr:`table_format`).
        """
        return dlt.destinations.filesystem(
            bucket_url=self.bucket_url,
            credentials=self.destination_config.credentials,
            destination_name=self.destination_config.name,
        )

    def capabilities(self) -> Any:
        return dlt.destinations.filesystem().capabilities()

    def arrow_schema_for(self, columns: dict[str, Any]) -> pa.Schema:
        """dlt's Arrow mapping, then dlt's own adjustment to what Delta stores (``time`` and
        ``decimal256`` — e.g. ``wei`` — are written as strings)."""
        from dlt.common.libs.deltalake import ensure_delta_compatible_arrow_schema

        return ensure_delta_compatible_arrow_schema(super().arrow_schema_for(columns))

    def served_schema(self, table: str, columns: dict[str, Any]) -> pa.Schema:
        """What the Delta table itself holds (deltalake's read: e.g. every timestamp in microseconds, NOT NULL
        where the Delta schema says so), for the columns dlt's schema knows; dlt's mapping for a column
        the table has not got yet and for the load history (JSON records, not a Delta table)."""
        mapped = super().served_schema(table, columns)
        if table == LOADS_TABLE:
            return mapped
        stored = plain_arrow(self.arrow_dataset(table).schema)
        hints = not_null_hints(columns)
        fields = [stored.field(f.name).with_nullable(stored.field(f.name).nullable or f.name not in hints)
                  if f.name in stored.names else f for f in mapped]
        return pa.schema(fields)

    def _dlt_client(self, schema: Any) -> Any:
        from dlt.dataset.utils import get_destination_clients

        return get_destination_clients(schema, self.dlt_destination(), self.dataset.name)[0]

    def _read_stored_schemas(self) -> tuple[list[StoredSchema], Any, dict[str, str]] | None:
        from dlt.common.destination.exceptions import DestinationUndefinedEntity
        from dlt.common.libs.deltalake import deltalake_storage_options

        probe = dlt.Schema(self.dataset.schema_name or "flight_share")
        with self._dlt_client(probe) as client:
            # dlt names each stored schema file ``<schema>__<load id>__<hash>``: the newest load id per
            # schema name is that schema's newest version (what dlt's get_stored_schema(name) picks)
            newest: dict[str, str] = {}
            try:
                for _, parts in client._iter_stored_schema_files():
                    if parts[1] > newest.get(parts[0], ""):
                        newest[parts[0]] = parts[1]
            except DestinationUndefinedEntity:
                return None  # nothing loaded yet
            names = sorted(newest, key=newest.__getitem__, reverse=True)
            infos = [client.get_stored_schema(name) for name in names]
        results = [StoredSchema.from_row(i.version, i.version_hash, i.schema) for i in infos if i is not None]
        if not results:
            return None
        client = self._dlt_client(results[0].schema)
        options = deltalake_storage_options(client.config.credentials, client.config.deltalake_storage_options)
        return results, client, options

    def _load_stored_schemas(self) -> list[StoredSchema]:
        loaded = isolated(self._read_stored_schemas)  # dlt resolves its config here: see lifetime.isolated
        if loaded is None:
            return []
        results, client, options = loaded
        with self._lock:
            if [s.version_hash for s in self._schemas] != [s.version_hash for s in results]:
                self._tables.clear()  # a new schema may move or replace tables
            self._client = client
            self._storage_options = options
        return results

    def invalidate(self) -> None:
        with self._lock:
            self._tables.clear()
            self._versions.clear()
        super().invalidate()

    def forget_schema_version(self, schema_name: str, version_hash: str) -> None:
        """Delete the schema file dlt wrote for this version (``_dlt_version/<schema>__<load id>__<hash>``)."""

        def forget() -> None:
            client = self._dlt_client(dlt.Schema(schema_name))
            safe = client._to_path_safe_string(version_hash)
            for path, (name, _load_id, stored_hash) in list(client._iter_stored_schema_files()):
                if name == schema_name and stored_hash == safe:
                    client.fs_client.rm(path)

        isolated(forget)

    def savepoint(self, tables: Sequence[str]) -> Callable[[], None] | None:
        """Delta has no transaction over several tables, and dlt's replace makes several commits:
        the child tables without new rows are emptied first (``truncate_delta_table``, a delete
        commit in ``initialize_storage``), then each table with rows is overwritten in one commit
        of its own. So the current version of each table is remembered, and a load that fails puts
        back every table that moved since with ``DeltaTable.restore(version)`` - a new commit whose
        files are those of that version (the removed files are still there: nothing vacuums them).
        A table whose folder did not exist before the load (a new table, a new child table) is
        removed again, folder and all: dlt would otherwise find a Delta table there that the stored
        schema does not know."""
        from deltalake import DeltaTable

        def folders() -> tuple[Any, dict[str, str]]:
            stored = self.stored_schema()
            schema = stored.schema if stored is not None else dlt.Schema(self.dataset.schema_name or self.dataset.name)
            client = self._dlt_client(schema)
            return client.fs_client, {t: client.get_table_dir(t) for t in tables}

        fs, dirs = isolated(folders)
        versions: dict[str, int] = {}
        new: list[str] = []
        for table in tables:
            if not fs.exists(dirs[table]):
                new.append(table)
                continue
            try:
                versions[table] = int(self.delta_table(table).version())
            except (NotFound, Unavailable):
                continue  # a folder that is no Delta table of this dataset (yet): left as it is

        def restore() -> None:
            self.invalidate()
            for table, version in versions.items():
                dt = DeltaTable(self.table_uri(table), storage_options=self._storage_options or None)
                if int(dt.version()) != version:
                    dt.restore(version)
            for table in new:
                folder = dirs[table]
                # the table's own folder only (never the dataset's): ".../<dataset>/<table>/"
                if folder.rstrip("/").rsplit("/", 1)[-1] == table and fs.exists(folder):
                    fs.rm(folder, recursive=True)
            self.invalidate()

        return restore if versions or new else None

    @property
    def location(self) -> str:
        return mask_url(self.bucket_url)

    # --- Delta tables -----------------------------------------------------------------------
    def table_uri(self, table: str) -> str:
        """Where dlt keeps a table (a fully formed URL ending in ``/``)."""
        self.table_columns(table)  # NotFound for tables that are not in the dataset
        return str(self._client.get_open_table_location("delta", table))

    def delta_table(self, table: str) -> Any:
        """The table at its newest version (opened once, then updated from the log)."""
        from deltalake import DeltaTable
        from deltalake.exceptions import TableNotFoundError

        uri = self.table_uri(table)
        with self._lock:
            lock = self._table_locks.setdefault(table, threading.Lock())
        with lock:
            dt = self._tables.get(table)
            try:
                if dt is not None:
                    try:
                        dt.update_incremental()
                    except Exception:  # noqa: BLE001 - e.g. the table was dropped and written anew
                        dt = None
                if dt is None:
                    dt = DeltaTable(uri, storage_options=self._storage_options or None)
                    self._tables[table] = dt
            except TableNotFoundError:
                raise Unavailable(
                    f"Table '{table}' of dataset '{self.dataset.name}' is in the dlt schema but no Delta table "
                    f"was found at {mask_url(uri)}",
                    dataset=self.dataset.name, table=table,
                ) from None
            return dt

    def table_version(self, table: str) -> Any:
        """The Delta table's version (every dlt load into it is a commit) and the stored schemas' hashes:
        what the hot-table cache keys it by. Costs what a read's own log update costs."""
        if table == LOADS_TABLE:
            return None  # dlt's JSON load records: small, read fresh
        schemas = self.stored_schemas()
        dt = self.delta_table(table)
        with self._table_locks[table]:
            version = dt.version()
        return (tuple(s.version_hash for s in schemas), version)

    def arrow_dataset(self, table: str) -> pads.Dataset:
        """The table's current files as a pyarrow dataset (nothing read yet)."""
        dt = self.delta_table(table)
        with self._table_locks[table]:  # the Rust table object is not re-entrant across threads
            # deltalake's filesystem handler: object_store (Rust) with dlt's storage options, file
            # sizes known from the log. pyarrow's own Local/S3FileSystem was measured here as well:
            # no faster, single or 4 concurrent scans, so there is no second credential mapping.
            return dt.to_pyarrow_dataset()

    # --- dlt's load history -----------------------------------------------------------------
    # ``_dlt_loads`` on a filesystem is a folder of dlt's JSON files (one small record per load), not a
    # Delta table: read here with the bucket's own client and pyarrow's JSON reader, read-only like
    # everywhere. (dlt reads it through duckdb, which needs its httpfs extension - downloaded at run
    # time - for a bucket; not reachable offline.)
    serves_load_history = True

    def _load_history(self) -> pa.Table:
        """The load records, one row per file of ``_dlt_loads/``. Files are immutable (one per load), so the
        parsed records are kept and a request reads only files it has not seen (one listing per request);
        a file that is not one of dlt's records is left out (and logged) rather than failing the read."""
        schema = self.arrow_schema(LOADS_TABLE)

        def listing() -> list[str]:
            # the folder's listing itself (dlt's list_table_files costs ~1 s per 20,000 files)
            client = self._client
            folder = client.get_table_dir(LOADS_TABLE)
            if not client.fs_client.exists(folder):
                return []
            return sorted(p for p in client.fs_client.ls(folder, detail=False) if not p.rstrip("/").endswith("/init"))

        def fetch(paths: list[str]) -> dict[str, bytes]:
            return dict(self._client.fs_client.cat(paths)) if paths else {}

        try:
            files = isolated(listing)
            with self._lock:
                known, table = self._loads_seen if self._loads_seen[1].schema.equals(schema) else (frozenset(), None)
            if known == frozenset(files) and table is not None:
                return table
            fresh = [f for f in files if f not in known] if known <= set(files) else files
            bodies = isolated(fetch, fresh)
        except Exception as exc:  # noqa: BLE001 - the bucket's errors, in the user's terms
            raise Unavailable(f"reading the load history of dataset '{self.dataset.name}' failed: "
                              f"{type(exc).__name__}", dataset=self.dataset.name, table=LOADS_TABLE) from None
        parts = [table] if table is not None and known <= set(files) else []
        parts.append(_load_records(schema, [bodies[f] for f in fresh if f in bodies], self.dataset.name))
        table = pa.concat_tables(parts)
        with self._lock:
            self._loads_seen = (frozenset(files), table)
        return table

    # --- reading ----------------------------------------------------------------------------
    def row_count(self, table: str) -> int:
        if table == LOADS_TABLE:
            return int(self._load_history().num_rows)
        dt = self.delta_table(table)
        with self._table_locks[table]:
            counts = dt.get_add_actions(flatten=False).column("num_records").to_pylist()
        if all(c is not None for c in counts):
            return int(sum(counts))
        return int(self.arrow_dataset(table).count_rows())  # files without stats: Parquet footers

    def row_bytes(self, table: str, columns: Sequence[str] | None, sample_rows: int) -> float | None:
        """Bytes per row from the first rows of the table's *smallest* file (a sample still decodes
        a whole Parquet row group), remembered per table version and projection."""
        if table == LOADS_TABLE:
            return super().row_bytes(table, columns, sample_rows)
        schema = self.arrow_schema(table, columns)
        dt = self.delta_table(table)
        with self._table_locks[table]:
            version = int(dt.version())
            key = (table, version, tuple(schema.names))
            if key in self._row_bytes:
                return self._row_bytes[key]
            actions = pa.table(dt.get_add_actions(flatten=False))
            dataset = dt.to_pyarrow_dataset()
        records = dict(zip(actions.column("path").to_pylist(), actions.column("num_records").to_pylist()))
        fragments = sorted(dataset.get_fragments(), key=lambda f: records.get(f.path) or 0)
        sample = None
        for fragment in fragments:
            # with the dataset's schema: a file written before a column was added has no such column
            sample = fragment.scanner(schema=dataset.schema, columns=schema.names).head(sample_rows)
            if sample.num_rows:
                break
        per_row = sample.nbytes / sample.num_rows if sample is not None and sample.num_rows else None
        with self._lock:
            if len(self._row_bytes) > 256:
                self._row_bytes.clear()
            self._row_bytes[key] = per_row
        return per_row

    # --- partitions: file groups pinned to a table version ------------------------------------
    def partitions(self, table: str, target_rows: int) -> list[Partition]:
        """Groups of the current version's data files of about ``target_rows`` rows (from the Delta
        log's ``num_records``); a file larger than the target is split by its Parquet row groups
        (its footer is read). Each group names the table version, so every endpoint reads the same
        snapshot even if a load commits in between, on whichever replica serves it."""
        if table == LOADS_TABLE:
            return super().partitions(table, target_rows)
        dt = self.delta_table(table)
        with self._table_locks[table]:
            version = int(dt.version())
            actions = pa.table(dt.get_add_actions(flatten=False))
            dataset = dt.to_pyarrow_dataset()
        records = dict(zip(actions.column("path").to_pylist(), actions.column("num_records").to_pylist()))
        fragments = list(dataset.get_fragments())
        known = [records.get(f.path) for f in fragments]
        if all(r is not None for r in known) and sum(known) <= target_rows:  # type: ignore[arg-type]
            return [Partition({}, int(sum(known)))]  # type: ignore[arg-type]
        units: list[tuple[list[Any], int]] = []  # ([path] or [path, first row group, stop], rows)
        for fragment, rows in zip(fragments, known):
            if rows is None or rows > target_rows:
                fragment.ensure_complete_metadata()  # reads the Parquet footer
                groups = fragment.row_groups
                rows = sum(g.num_rows for g in groups)
                if rows > target_rows and len(groups) > 1:
                    units += [([fragment.path, g.id, g.id + 1], g.num_rows) for g in groups]
                    continue
            units.append(([fragment.path], int(rows)))
        total = sum(rows for _, rows in units)
        groups = contiguous_groups([rows for _, rows in units], split_evenly(total, target_rows, len(units)))
        if len(groups) <= 1:
            return [Partition({}, total)]
        parts = []
        for start, stop in groups:
            files: list[list[Any]] = []
            for entry, _ in units[start:stop]:
                last = files[-1] if files else None
                if last is not None and len(entry) == 3 and len(last) == 3 and last[0] == entry[0] and last[2] == entry[1]:
                    last[2] = entry[2]  # adjacent row groups of one file: one range
                else:
                    files.append(list(entry))
            parts.append(Partition({"version": version, "files": files}, sum(rows for _, rows in units[start:stop])))
        return parts

    def _dataset_at(self, table: str, version: int) -> pads.Dataset:
        """The table's files at ``version`` as a pyarrow dataset (the newest one when it is that)."""
        from deltalake import DeltaTable

        dt = self.delta_table(table)
        lock = self._table_locks[table]
        with lock:
            if int(dt.version()) == version:
                return dt.to_pyarrow_dataset()
        key = (table, version)
        with self._lock:
            pinned = self._versions.get(key)
            if pinned is not None:
                self._versions.move_to_end(key)
        if pinned is None:
            try:
                pinned = DeltaTable(self.table_uri(table), version=version, storage_options=self._storage_options or None)
            except Exception as exc:  # noqa: BLE001 - e.g. the version's log was cleaned up
                raise Unavailable(
                    f"version {version} of table '{table}' in dataset '{self.dataset.name}' can no longer be read "
                    f"({type(exc).__name__}); ask for the flight again", dataset=self.dataset.name, table=table,
                ) from None
            with self._lock:
                self._versions[key] = pinned
                while len(self._versions) > PINNED_VERSIONS:
                    self._versions.popitem(last=False)
        with lock:
            return pinned.to_pyarrow_dataset()

    def _partition_dataset(self, table: str, partition: Mapping[str, Any]) -> pads.Dataset:
        version, files = partition.get("version"), partition.get("files")
        valid = (isinstance(version, int) and not isinstance(version, bool) and version >= 0 and isinstance(files, list)
                 and bool(files) and all(
                     isinstance(f, list) and len(f) in (1, 3) and isinstance(f[0], str)
                     and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in f[1:])
                     and (len(f) == 1 or f[1] < f[2]) for f in files))
        if not valid:
            raise InvalidRequest(f"ticket partition of a Delta table must be {{\"version\": n, \"files\": [[path], "
                                 f"[path, first row group, stop], ...]}}, got {partition!r}")
        dataset = self._dataset_at(table, int(version))  # type: ignore[arg-type]
        by_path = {f.path: f for f in dataset.get_fragments()}
        fragments = []
        for entry in files:  # type: ignore[union-attr]
            fragment = by_path.get(entry[0])
            if fragment is None:  # only paths of this table version are ever read
                raise NotFound(f"file {entry[0]!r} is not part of version {version} of table '{table}'",
                               dataset=self.dataset.name, table=table)
            if len(entry) == 3:
                # subset() reads the footer; make_fragment(row_groups=...) was measured to return the
                # row groups out of order (pyarrow 26)
                groups = list(range(entry[1], entry[2]))
                if entry[2] > fragment.num_row_groups:
                    raise InvalidRequest(f"file {entry[0]!r} of table '{table}' has {fragment.num_row_groups} row groups, "
                                         f"ticket partition asks for {entry[1]}..{entry[2]}")
                fragment = fragment.subset(row_group_ids=groups)
            fragments.append(fragment)
        return pads.FileSystemDataset(fragments, dataset.schema, dataset.format, dataset.filesystem)

    def reader(self, table: str, columns: Sequence[str] | None, limit: int | None,
               partition: Mapping[str, Any] | None = None,
               where: Sequence[Predicate] | None = None) -> pa.RecordBatchReader:
        if table == LOADS_TABLE:
            loads = self._load_history().select(self.arrow_schema(table, columns).names)
            if where:
                limit = None  # the load history is small: no filter here, so no row limit either
            return (loads if limit is None else loads.slice(0, int(limit))).to_reader()
        schema = self.arrow_schema(table, columns)
        dataset = self._partition_dataset(table, partition) if partition else self.arrow_dataset(table)
        # a SQL query's filters: pyarrow skips files and row groups by their statistics
        kept, complete = (applicable(where, self.arrow_schema(table), dlt_types(self.table_columns(table)), floats=False)
                          if where else ([], True))
        condition = arrow_filter(kept)
        if not complete:
            limit = None  # a row limit holds only over the query's full filter
        if limit is not None and int(limit) > HEAD_LIMIT_ROWS and condition is None:
            con = self._sql_connection({table: dataset})
            select = ", ".join(quote(c) for c in schema.names)
            reader = _reader_of(
                con, f"SELECT {select} FROM {quote(self.dataset.name)}.{quote(table)} LIMIT {int(limit)}",
                self.batch_rows, dataset,
            )
        elif limit is not None and int(limit) <= HEAD_LIMIT_ROWS:
            # no filter: the first rows of the first file; pyarrow's readahead (4 files, 16 batches) would
            # fetch far more than that from an object store (measured: benchmarks/s3_bytes_read.py)
            ahead = {} if condition is not None else {"batch_readahead": 1, "fragment_readahead": 1}
            head = dataset.head(int(limit), columns=schema.names, filter=condition, batch_size=self.batch_rows, **ahead)
            reader = head.to_reader(max_chunksize=self.batch_rows)
        else:  # the whole table, or a big limit over a filter (the sandbox stops reading at its limit)
            reader = dataset.scanner(columns=schema.names, filter=condition, batch_size=self.batch_rows).to_reader()
        return conform(reader, schema)

    def _sql_connection(self, datasets: dict[str, pads.Dataset]) -> duckdb.DuckDBPyConnection:
        """A fresh in-memory duckdb with ``"dataset"."table"`` views over the given Arrow datasets."""
        con = duckdb.connect(":memory:")
        con.execute(f"CREATE SCHEMA {quote(self.dataset.name)}")
        for i, (table, dataset) in enumerate(datasets.items()):
            source = f"__flight_share_{i}"
            con.register(source, dataset)
            columns = ", ".join(quote(c) for c in self.table_columns(table))
            con.execute(f"CREATE VIEW {quote(self.dataset.name)}.{quote(table)} AS SELECT {columns} FROM {quote(source)}")
        # results in UTC whatever the machine's zone; then no files, network or settings for the query
        con.execute("SET TimeZone = 'UTC'")
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
        return con

    def close(self) -> None:
        with self._lock:
            self._tables.clear()
            self._versions.clear()
