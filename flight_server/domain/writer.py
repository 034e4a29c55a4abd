"""Accepted uploads into the destination through a real dlt pipeline (``save_<table>_pipeline``).

The one write path of both surfaces: a DoPut and a Flight SQL ``CommandStatementIngest`` both reach
:meth:`Writer.put` (through the transport's ``save`` handlers in ``transport/plain.py`` and
``transport/flight_sql/ingest.py``; the dispatch evicts the hot-table cache and fills the audit line).
Each put runs in a fresh pipelines folder with the dataset's stored schema, so schema versions,
``_dlt_loads`` and evolution are dlt's.

**A save is all-or-nothing** (issue 11). The owner's rows, child tables and schema version stay as
they were whatever step fails - extract, normalize, load, or a client that vanishes:

1. *Before dlt runs* (:mod:`flight_server.domain.uploads`, on every destination): table and column names are
   normalized as dlt stores them and checked (reserved ``_dlt`` names in any letter case, characters
   that break SQL or dlt's file layout, types dlt cannot store), and integer/decimal columns are cast
   to the stored type with a safe cast - a value that would only fail at the load step (``uint64``
   2**64-1 into ``bigint``) is refused up front with INVALID_ARGUMENT naming the column. Cheap, and a
   clear answer; but it cannot know everything the destination enforces, hence:
2. *SQL destinations (duckdb, PostgreSQL)*: ``replace`` runs with dlt's ``insert-from-staging``
   strategy (``domain.storage.SQL_REPLACE_STRATEGY``): the rows go into the staging dataset, then one SQL
   job truncates the table and its child tables and inserts from staging in ONE transaction. A load
   that fails - in staging or in that job (a constraint, a type) - rolls back, and the real tables were
   never emptied. dlt's default ``truncate-and-insert`` empties them in a transaction of its own
   before loading, which is how a failed replace used to leave empty tables. ``append`` and ``merge``
   were already one transaction per job in dlt.
3. *Delta (local and S3)*: there is no transaction over several tables, and dlt's replace commits per
   table (child tables without rows are emptied by a delete commit first, then each table with rows
   is overwritten). Before the load the writer takes ``storage.savepoint(tables)`` - the current
   version of the table and its child tables - and a failed load restores every table that moved with
   ``DeltaTable.restore(version)``.
4. *New tables*: dlt creates a new table (and new child tables) before it loads rows into them, in a
   step of its own; a load that then fails would leave an empty table the stored schema does not know.
   ``storage.savepoint`` also remembers which of the tables did not exist, and the undo of a failed
   load removes those (SQL: ``DROP TABLE IF EXISTS``; Delta: the new table's folder) - never a table
   that existed. After every load, success or not, the staging tables it used (``<dataset>_staging``,
   replace and merge) are emptied (``storage.clear_staging``, best effort).
5. Whatever failed, the put's pending packages are dropped and its folder removed (nothing for a later
   run to retry), and a schema version that dlt stored before the load failed is removed again.
6. *Once the load has committed*, the save has happened: what follows (the owner's hints put back,
   staging emptied, the new schema version read for the answer) is best effort and logged, and can
   no longer turn the client's answer into an error.
7. *Across a crash* (issue 22 §4): dlt's load step is several commits (data jobs, then the ``_dlt_loads``
   record), so before it the save is written to the journal (:mod:`flight_server.domain.save_journal`)
   with its packages' folder, which is kept. At the next start (or before the dataset's next save) an
   unfinished save is finished with dlt's own resume of its packages - wholly there, with its
   ``_dlt_loads`` record and the owner's hints put back - and a save sent again by the same caller with the
   same ``save_id`` answers as the first time without storing anything (the same id with a different
   request - disposition, keys, columns, row count - is refused, :class:`SaveIdReused`). Only saves of a
   dead process are recovered (replicas may share the data folder).

**Concurrency: the client's stream is read without the dataset's lock** (optimistic). The contract
is decided from the upload's Arrow schema against the stored schema *before any row is read*; then
extract reads the stream into the put's own pipelines folder and normalize works there, holding no
lock - a client that stops sending holds nothing but its own request. Only the load step takes
``storage.write_lock``, in arrival order, waiting at most ``WRITE_LOCK_TIMEOUT`` (then UNAVAILABLE, "busy
... retry"; a client that goes away leaves the queue). Under the lock the stored schema is
read again: if its version hash is not the one the upload was checked against (another save, or the
owner's pipeline, changed the dataset's schema meanwhile), the put is refused with UNAVAILABLE
"changed during the upload ... retry" and nothing is written - unless the schema now stored is exactly
the one the upload's package holds (two saves that created the same new table with the same columns):
then the load loses nothing and needs nothing the contract would have to allow. Refusing, rather than re-checking the
contract against the new schema, was chosen because the package was normalized against the old
schema: loading it would store a schema version without the other save's tables and columns (the
owner's schema would lose them), and re-normalizing would need the rows again. Saves that do not
change the schema (appends of known columns, replaces, merges) usually keep the stored version, so
they do not conflict with each other; they load one after the other.

**Lock hierarchy** (issue 22: a save that held the schema cache's lock while it waited for the duckdb
file, and a save inside the file's write window that waited for that lock, deadlocked). Locks are taken
only in this order, and nothing waits for a lock while holding one of a lower rank:

1. the dataset's write lock (``storage.write_lock``, a FIFO queue), for one load step;
2. the destination's write window (``storage.writing()``: the duckdb file's read-write connection; it waits
   at most ``BUSY_TIMEOUT`` for read-only reads to end, and reads never wait for it: they read the same
   duckdb instance and see the last committed data, issue 22 §4);
3. short internal locks - the stored-schema cache, the adapters' handle maps, the writer's map of running
   save ids, the journal's renames - held only to read or swap a reference, never while doing I/O or
   waiting for anything else (``Storage.stored_schemas`` reads the destination with no lock held).

A save sent again while its first attempt still runs waits for that attempt (an event, holding no lock).
The journal entry's file lock (``SaveJournal.claim``, one recovery per entry across replicas) is taken
under the write lock and never waited for (non-blocking: a claimed entry is skipped).

A save that succeeds changes the owner's schema only by what the contract allows (new tables and
columns under ``evolve``): the profile's contract is not left in the schema dlt stores
(:meth:`Writer._keep_owner_contract`), and the owner's table and column hints - write disposition,
resource, keys - are put back after the load (:meth:`Writer._keep_owner_table_hints`). Under ``data_type: evolve`` a column whose type differs from the
stored one is cast to the stored type (see :func:`flight_server.domain.contracts.check_write`).

Works the same on every destination: dlt picks the loader file format for Arrow items (Parquet for
duckdb and Delta, CSV through ``COPY`` for PostgreSQL), and the adapter gives the table format
(``delta``) to every resource.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, cast

import dlt
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from dlt.common.schema import Schema
from dlt.common.schema.exceptions import DataValidationError
from dlt.common.schema.typing import TWriteDisposition
from dlt.common.schema.utils import generate_version_hash, get_nested_tables
from dlt.pipeline.exceptions import PipelineStepFailed

from client.load_info import (
    LoadInfo,  # the one definition of what a put answers, shared with the client
)
from client.protocol import WriteCommand
from flight_server.domain import faults, uploads
from flight_server.domain.catalog import Catalog
from flight_server.domain.contracts import check_write, spell_out_nullability
from flight_server.domain.errors import (
    ContractViolation,
    InvalidRequest,
    NotFound,
    ServiceError,
    Unavailable,
    Unsupported,
)
from flight_server.domain.fair import FairShare
from flight_server.domain.lifetime import isolated
from flight_server.domain.reachability import is_unreachable, unreachable
from flight_server.domain.save_journal import (
    SAVES,
    Entry,
    SaveJournal,
    differences,
    fingerprint,
    running_elsewhere,
    this_process,
)
from flight_server.domain.storage import LOADS_TABLE, WRITE_LOCK_TIMEOUT, StoredSchema

log = logging.getLogger("flight_share.writer")



def _row_ids(pipeline_name: str, schema: Schema, table: str) -> None:
    """Write dlt's row columns exactly where the stored table has them (issues 13 and 21): a table
    loaded from Python dicts has a NOT NULL ``_dlt_id`` and ``_dlt_load_id``; a table the owner loaded
    from an Arrow table or a DataFrame has neither (dlt's defaults for Arrow), and adding one would change
    the owner's table - dlt adds it NOT NULL, duckdb refuses that, and on Delta the owner's next load fails
    its validation. A new table (the save's own) gets ``_dlt_load_id``, the lineage key ``_dlt_loads``
    joins on, and no random ``_dlt_id`` (most of a save's normalize time). Set for this pipeline only, in
    the section dlt reads first (``<PIPELINE_NAME>__NORMALIZE__PARQUET_NORMALIZER__...``), so no other
    pipeline of the process is touched."""
    stored = schema.tables.get(table)
    columns = (stored or {}).get("columns", {})
    row_id = columns.get("_dlt_id")
    prefix = f"{pipeline_name.upper()}__NORMALIZE__PARQUET_NORMALIZER__"
    os.environ[prefix + "ADD_DLT_LOAD_ID"] = "true" if stored is None or "_dlt_load_id" in columns else "false"
    os.environ[prefix + "ADD_DLT_ID"] = "true" if row_id is not None and row_id.get("nullable") is False else "false"

# Uploads arrive in small batches (the client sends 65,536 rows). Handed to dlt one by one, each becomes
# its own extract item and its own parquet row group, which normalize and the destination then re-read
# row group by row group: extract + normalize + load took ~45% more CPU than for the same rows in
# 1 Mi-row items (benchmarks/WRITE.md). So batches are gathered (zero-copy) into tables of up to
# pyarrow's default row-group length, or a byte cap, before dlt sees them.
COALESCE_ROWS = 1 << 20
COALESCE_BYTES = 128 << 20


class Upload(Protocol):
    """What a save reads: the upload's schema, its batches, and whether it arrived whole. The transport
    makes one from its stream (:class:`flight_server.transport.upload.FlightUpload`)."""

    @property
    def schema(self) -> pa.Schema: ...

    @property
    def complete(self) -> bool:
        """After :meth:`batches` ran out: False when the client did not finish the upload."""
        ...

    def batches(self) -> Iterator[pa.RecordBatch]: ...


#: uploads open at once on one server, all users together
MAX_UPLOADS = 64
#: the default of server.uploads_per_user
UPLOADS_PER_USER = 8
#: a user's uploads that may wait for one of that user's open ones to end, and for how long; more, or
#: longer, are refused "busy" (a waiting upload holds a server thread, not a folder)
UPLOADS_WAITING_PER_USER = 16
UPLOAD_WAIT_SECONDS = 30.0
# answers kept in the journal between two prunings of it (save_journal.KEEP_SECONDS, KEEP_ENTRIES)
PRUNE_EVERY = 256


class PutCancelled(InvalidRequest):
    """The client went away before the upload was complete; nothing was written."""


class SaveIdReused(InvalidRequest):
    """A ``save_id`` this caller used already for a different save (``differs``: what differs); nothing
    was written."""

    def __init__(self, save_id: str, dataset: str, table: str, differs: list[str]) -> None:
        what = " and ".join(filter(None, (", ".join(differs[:-1]), differs[-1])))
        super().__init__(f"save_id {save_id} was already used for a different save to '{dataset}.{table}' (another "
                         f"{what}); choose a new id; nothing was written",
                         save_id=save_id, dataset=dataset, table=table, differs=differs)


def _load_id() -> str:
    """A package id in dlt's format, for a put refused before dlt made a package."""
    return str(time.time())


class Writer:
    """Runs puts for the service; one load per dataset at a time (uploads are read concurrently)."""

    def __init__(self, catalog: Catalog, work_dir: Path, max_bytes: int, uploads_per_user: int = UPLOADS_PER_USER) -> None:
        self.catalog = catalog
        self.work_dir = work_dir
        self.max_bytes = max_bytes
        self.coalesce_bytes = COALESCE_BYTES  # the server lowers it under a small server.memory_limit
        # open uploads: each holds a server thread and a folder for as long as its client sends (issue 22:
        # 300 DoPuts that never sent stalled everyone); one user's share is bounded, a few more wait, the rest
        # are refused before anything is read
        self.uploads = FairShare(MAX_UPLOADS, uploads_per_user, UPLOADS_WAITING_PER_USER, "upload",
                                 "server.uploads_per_user")
        self.journal = SaveJournal(work_dir.parent / SAVES)  # crash recovery and save ids (save_journal.py)
        self._running: dict[str, threading.Event] = {}  # journal key -> set when that put is done
        self._running_lock = threading.Lock()  # lock rank 3: a dict swap only
        self._unfinished: set[str] = set()  # datasets with saves a crash interrupted and not yet finished
        self._answers = 0  # answers kept since the start: the journal is pruned every PRUNE_EVERY

    def stats(self) -> dict[str, int]:
        """Uploads open now (reported by ``health``)."""
        return self.uploads.stats()

    def put(self, profile: str, command: WriteCommand, upload: Upload, cancelled: Callable[[], bool],
            must_exist: str | None = None, must_be_new: str | None = None, *, user: str | None = None) -> LoadInfo:
        """Check, then load one upload; raise a ServiceError on refusal (see :meth:`_put`).

        ``user``: the caller; one user has at most ``server.uploads_per_user`` uploads open; a further one
        waits (at most :data:`UPLOAD_WAIT_SECONDS`, :data:`UPLOADS_WAITING_PER_USER` of them) and is then
        refused "busy" (UNAVAILABLE: it may succeed once one of them ends) before anything is read. A save whose
        ``save_id`` was stored already by the same caller (the client retries after a lost answer) answers as
        the first time and stores nothing, when it asks for the same save (else :class:`SaveIdReused`); one
        attempt of a save id runs at a time.
        """
        self.uploads.acquire(user or "", UPLOAD_WAIT_SECONDS, cancelled, dataset=command.dataset)
        try:
            return self._put_once(profile, command, upload, cancelled, must_exist, must_be_new, user or "")
        finally:
            self.uploads.release(user or "")

    def _put_once(self, profile: str, command: WriteCommand, upload: Upload, cancelled: Callable[[], bool],
                  must_exist: str | None, must_be_new: str | None, user: str) -> LoadInfo:
        """One attempt per save id at a time (see :meth:`put`)."""
        key = self.journal.key(user, profile, command.dataset, command.table, command.save_id)
        request = fingerprint(command.write_disposition, command.primary_key, upload.schema)
        while True:
            with self._running_lock:
                earlier = self._running.get(key)
                if earlier is None:
                    done = self._running[key] = threading.Event()
                    break
            if not earlier.wait(WRITE_LOCK_TIMEOUT):
                raise Unavailable(f"an earlier attempt of this save to '{command.dataset}.{command.table}' is still "
                                  "running; retry with the same save id", dataset=command.dataset, table=command.table)
        try:
            if command.save_id:
                answer = self._answered(profile, command, upload, cancelled, key, request)
                if answer is not None:
                    return answer
            return self._put(profile, command, upload, cancelled, must_exist, must_be_new, key, request)
        except Unavailable as exc:  # the destination busy or away: always before the commit (see _load)
            if "nothing was written" not in exc.message:
                exc.message += "; nothing was written"
            raise
        finally:
            with self._running_lock:
                del self._running[key]
            done.set()

    def _answered(self, profile: str, command: WriteCommand, upload: Upload, cancelled: Callable[[], bool],
                  key: str, request: dict[str, Any]) -> LoadInfo | None:
        """The first answer to a save sent again with the same id (finishing it first if a crash interrupted
        it); None when no attempt of it reached its load step. An id whose entry records another request
        (:func:`~flight_server.domain.save_journal.differences`) is refused: :class:`SaveIdReused`."""
        entry = self.journal.get(key)
        if entry is None:
            return None
        self.catalog.require_write(profile, command.dataset)  # a profile that lost the grant learns nothing
        differs = differences(entry, request)
        if differs:  # before a recovery: the earlier save is finished at the start or before the next save
            raise SaveIdReused(str(command.save_id), command.dataset, command.table, differs)
        if entry.answer is None:
            if running_elsewhere(entry) and list(entry.process) != list(this_process()):
                raise Unavailable(f"an earlier attempt of this save to '{command.dataset}.{command.table}' is still "
                                  "running on another server process; retry with the same save id",
                                  dataset=command.dataset, table=command.table)
            storage = self.catalog.storage(command.dataset)
            with self._write_lock(storage, command.dataset, command.table, cancelled):
                self._recover(entry, raise_errors=True)
            entry = self.journal.get(key)
            if entry is None or entry.answer is None:
                return None  # undone: nothing of it is stored, it runs as a new save
        rows = 0
        for batch in upload.batches():  # the client's stream, read and dropped: its rows are stored already
            rows += batch.num_rows
        differs = differences(entry, request, rows if upload.complete else None)
        if differs:
            raise SaveIdReused(str(command.save_id), command.dataset, command.table, differs)
        answer = LoadInfo.from_json(entry.answer)
        # an answer kept before the destination's address was left out of answers (the location field)
        return dataclasses.replace(answer, location=answer.destination_name)

    def recover(self) -> None:
        """At the server's start: finish every save a crash (of this or another process on this host that
        shares the data folder) interrupted - see :mod:`flight_server.domain.save_journal`. A destination
        that is away leaves its saves for the next save into the dataset."""
        self.journal.prune()
        for entry in self.journal.unfinished():
            if running_elsewhere(entry):
                continue
            try:
                storage = self.catalog.storage(entry.dataset)
                with self._write_lock(storage, entry.dataset, entry.table, lambda: False):
                    self._recover(entry)
            except Exception:  # noqa: BLE001 - logged; tried again before the dataset's next save
                log.exception("could not finish the interrupted save %s to %s.%s", entry.key, entry.dataset, entry.table)
                self._unfinished.add(entry.dataset)

    def _recover(self, entry: Entry, raise_errors: bool = False) -> None:
        """Finish one interrupted save, under the dataset's write lock: its load committed (every load id in
        ``_dlt_loads``) - only the bookkeeping is left; else dlt's own resume loads its packages from where
        the load stopped (jobs done are skipped, then the ``_dlt_loads`` record). The answer goes into the
        journal; the pipelines folder is removed once the save is whole."""
        with self.journal.claim(entry.key) as mine:
            if not mine:
                return
            current = self.journal.get(entry.key)
            if current is None or current.answer is not None:
                return
            entry = current
            storage = self.catalog.storage(entry.dataset)
            before = (StoredSchema(Schema.from_dict(entry.before["schema"]), entry.before["version"],
                                   entry.before["version_hash"]) if entry.before else None)
            started = time.monotonic()
            storage.invalidate()
            if not set(entry.load_ids) <= _recorded_loads(storage):
                folder = Path(entry.folder)
                if not folder.is_dir():
                    log.error("interrupted save %s to %s.%s: its packages are gone, it cannot be finished",
                              entry.key, entry.dataset, entry.table)
                    self.journal.drop(entry.key)
                    return
                entry.attempts += 1
                self.journal.write(entry)
                try:
                    with storage.writing():
                        pipeline = dlt.pipeline(entry.pipeline_name, pipelines_dir=str(folder),
                                                destination=storage.dlt_destination(), dataset_name=entry.dataset)
                        pipeline.config.restore_from_destination = False
                        if self._schema_moved_before_any_job(storage, entry, pipeline):
                            pipeline.drop()  # nothing of it reached the destination: the save is not there
                            self.journal.drop(entry.key)
                            shutil.rmtree(entry.folder, ignore_errors=True)
                            log.warning("dropped the save %s to %s.%s that a crash interrupted before its load: the "
                                        "dataset's schema changed since", entry.key, entry.dataset, entry.table)
                            return
                        pipeline.load()
                except BaseException:
                    storage.invalidate()
                    if raise_errors:
                        raise
                    log.exception("resuming the interrupted save %s to %s.%s failed", entry.key, entry.dataset,
                                  entry.table)
                    return
                log.warning("finished the save %s to %s.%s that a crash interrupted (load ids %s)", entry.key,
                            entry.dataset, entry.table, ", ".join(entry.load_ids))
            self._keep_owner_table_hints(storage, before, entry.dataset, entry.load_ids)  # best effort
            self._clear_staging(storage, [entry.table])
            storage.invalidate()
            self._answer(entry, self._load_info(storage, entry, time.monotonic() - started))
            shutil.rmtree(entry.folder, ignore_errors=True)

    @staticmethod
    def _schema_moved_before_any_job(storage: Any, entry: Entry, pipeline: Any) -> bool:
        """True when the dataset's schema changed since the save was checked (the owner's pipeline ran while
        the server was down) and no job of the save had started: then resuming would store the package's
        schema over the owner's newer one (the optimistic check of :meth:`_load`), and dropping it loses
        nothing - dlt stores a package's schema and starts its jobs only in its load step."""
        now = _newest_version(storage, entry.schema_name)
        known = {entry.before["version_hash"] if entry.before else None, *entry.packaged}
        if (now.version_hash if now else None) in known:
            return False
        packages = pipeline._get_load_storage().normalized_packages
        for load_id in entry.load_ids:
            jobs = packages.get_load_package_info(load_id).jobs
            if jobs.get("started_jobs") or jobs.get("completed_jobs") or jobs.get("failed_jobs"):
                return False
        return True

    def _answer(self, entry: Entry | None, info: LoadInfo, keep: bool = True) -> None:
        """The save is whole: keep its answer for a retry with its id (``keep``), else forget it."""
        if entry is None:
            return
        if not keep:  # sent without a save id: nothing can ask for it again
            self.journal.drop(entry.key)
            return
        entry.answer, entry.before, entry.packaged = info.to_json(), None, []  # what a retry needs, no more
        try:
            self.journal.write(entry)
        except OSError:  # the save is stored; only a retry with its id would store it again
            log.exception("could not record the answer of save %s", entry.key)
        self._answers += 1
        if self._answers % PRUNE_EVERY == 0:
            self.journal.prune()

    @staticmethod
    def _load_info(storage: Any, entry: Entry, seconds: float) -> LoadInfo:
        try:
            new_schema = storage.stored_schema(entry.table)
        except Exception:  # noqa: BLE001 - the destination may be briefly unreachable; the save happened
            new_schema = None
        return LoadInfo(
            pipeline_name=entry.pipeline_name, destination_name=storage.destination_config.name,
            destination_type=storage.destination_config.type, dataset_name=entry.dataset,
            location=storage.destination_config.name, table_name=entry.table, load_ids=tuple(entry.load_ids),
            load_seconds=round(seconds, 2), rows=entry.rows, bytes=entry.bytes, schema_name=entry.schema_name,
            schema_version=new_schema.version if new_schema else None, failed_jobs=0)

    def _put(self, profile: str, command: WriteCommand, upload: Upload, cancelled: Callable[[], bool],
             must_exist: str | None, must_be_new: str | None, key: str, request: dict[str, Any]) -> LoadInfo:
        """Check, then load one upload; raise a ServiceError on refusal.

        The one write path of both surfaces (DoPut and Flight SQL ingest). ``must_exist`` /
        ``must_be_new``: the table must (not) hold data already; the text says what to do instead.
        """
        grant = self.catalog.require_write(profile, command.dataset)
        storage = self.catalog.storage(command.dataset)
        if not storage.accepts_saves:
            raise Unsupported(
                f"dataset '{command.dataset}' is in dlt's plain parquet/jsonl/csv layout on a filesystem, served "
                "read-only: dlt writes such files one by one, so a save could not be all-or-nothing; load the "
                "dataset as Delta tables (table_format: delta) to save into it", dataset=command.dataset)
        # No lock while the client's stream is read: a client that stops sending would hold every
        # other save to the dataset. The upload is checked against the stored schema as it is now,
        # extracted and normalized into the put's own folder, and loaded under the dataset's write
        # lock only if the stored schema is still the one it was checked against (see _load).
        storage.invalidate()
        dataset_config = self.catalog.project.datasets[command.dataset]
        # a dataset with several dlt schemas: the save goes through the schema that holds the table, its
        # name as that schema's naming convention stores it; a new table through the newest schema
        stored, table = None, ""
        for candidate in storage.stored_schemas():
            name = uploads.table_name(candidate.schema, command.dataset, command.table)
            if name in candidate.schema.tables:
                stored, table = candidate, name
                break
        owner = storage.stored_schema()  # the dataset's newest schema: a new table is checked against it
        if stored is None:
            # a new table goes into a schema of the saves' own (dlt+'s ``out_source``), never into an
            # owner's: the owner's next run stores its schema from its own state, without the table, and
            # the table would vanish from the catalog. Names follow the owner's naming convention.
            saves_schema = dataset_config.schema_name or SAVES_SCHEMA
            stored = next((s for s in storage.stored_schemas() if s.schema.name == saves_schema), None)
            naming = owner.schema if owner else Schema(saves_schema)
            table = uploads.table_name(naming, command.dataset, command.table)  # as dlt stores it
            schema = stored.schema.clone() if stored else Schema(
                saves_schema, normalizers=copy.deepcopy(naming._normalizers_config))
        else:
            schema = stored.schema.clone()
        spell_out_nullability(schema, table)
        exists = table in storage.table_names()
        holders = [s.schema.name for s in storage.schemas_holding(table)]
        if len(holders) > 1:
            raise InvalidRequest(
                f"table '{table}' of dataset '{command.dataset}' is loaded by several dlt schemas ({', '.join(holders)}): "
                "a save goes through one schema and would lose what the others know of the table (a merge would "
                "empty their columns); save into a table of your own; nothing was written",
                dataset=command.dataset, table=table)
        if stored is None or table not in stored.schema.tables:
            physical = storage.physical_table(table)
            if physical is not None:  # never let dlt create (or, on failure, drop) what is the owner's
                raise InvalidRequest(
                    f"a table '{physical}' already exists in dataset '{command.dataset}' but no dlt schema of the "
                    f"dataset describes it (it was not loaded by dlt); save under another name; nothing was written",
                    dataset=command.dataset, table=table)
        if must_exist is not None and not exists:
            raise NotFound(f"Table '{table}' not found in dataset '{command.dataset}'; {must_exist}",
                           dataset=command.dataset, table=table)
        if must_be_new is not None and exists:
            raise InvalidRequest(f"Table '{table}' already exists in dataset '{command.dataset}'; {must_be_new}",
                                 dataset=command.dataset, table=table)
        _refuse_scd2(schema, command.dataset, table, exists)
        capabilities = storage.cached_capabilities()
        served = _served_schema(storage, table) if exists else None  # what a read of the table returns
        shape = uploads.shape(schema, command.dataset, table, upload.schema, capabilities, served=served)
        counts = {"rows": 0, "bytes": 0}

        def items() -> Iterator[Any]:
            """The upload as dlt items; runs only inside extract, after the contract decision."""
            yield from uploads.conformed(self._batches(upload.batches(), counts), shape, table, command.dataset)

        disposition, primary_key, merge_key = _write_mode(schema, command, table, exists, shape.schema.names)
        _refuse_nested_merge(schema, command.dataset, table, disposition, exists)
        # hints left out where the save has none (dlt's defaults), rather than passed as None
        hints: dict[str, Any] = {"primary_key": primary_key, "merge_key": merge_key,
                                 "table_format": storage.table_format,
                                 "columns": list(shape.hints.values())}  # the stored hints (uploads.shape)
        resource = dlt.resource(items(), name=table, write_disposition=cast(TWriteDisposition, disposition),
                                **{k: v for k, v in hints.items() if v})
        # a new table is refused or allowed by the dataset's newest schema (its name in dlt's message, as
        # dlt+ words it: "In schema: events ... new tables are frozen"); it is loaded into the saves' schema
        judge = owner.schema if owner is not None and table not in schema.tables else schema
        try:  # decided from the Arrow schema, before any row is read
            decision = check_write(judge, table, shape.schema, grant.contract, resource, capabilities)
        except ContractViolation as exc:
            exc.fields["load_id"] = _load_id()
            exc.fields["step"] = "extract"
            raise
        if decision.coerce:  # data_type: evolve - the stored types win (contracts.check_write)
            shape = uploads.shape(schema, command.dataset, table, upload.schema, capabilities, decision.coerce,
                                  served=served)
        pipeline_name = f"save_{table}_pipeline"
        _row_ids(pipeline_name, schema, table)
        folder = self.work_dir / f"{pipeline_name}-{uuid.uuid4().hex}"
        pipeline = dlt.pipeline(pipeline_name, pipelines_dir=str(folder), destination=storage.dlt_destination(),
                                dataset_name=command.dataset)
        # a save pipeline lives for one put and has no state worth keeping, while dlt would store its
        # state in the owner's `_dlt_pipeline_state` with every package - even one whose data failed to
        # load: so it neither restores nor stores state (dlt's own switch for both, this pipeline only)
        pipeline.config.restore_from_destination = False
        try:
            try:
                # extract reads the client's stream into the put's folder; normalize works there too
                pipeline.extract(resource, schema=schema, schema_contract=decision.contract)
                if not upload.complete:
                    raise PutCancelled(
                        f"upload to '{command.dataset}.{table}' ended without the client's commit; nothing was written",
                        dataset=command.dataset, table=table,
                    )
                self._check_cancelled(cancelled, command.dataset, table)
                pipeline.normalize()
                packaged = self._keep_owner_contract(pipeline, stored)  # schema version hashes of the packages
            except PipelineStepFailed as exc:
                raise self._step_error(exc, command.dataset, table) from None
            with self._write_lock(storage, command.dataset, table, cancelled):
                if command.dataset in self._unfinished:  # saves a crash interrupted go first
                    self._recover_dataset(command.dataset)
                entry = Entry(key, command.dataset, table, pipeline_name, str(folder),
                              list(pipeline.list_normalized_load_packages()), schema.name, _schema_json(stored),
                              sorted(packaged), counts["rows"], counts["bytes"], request=request)
                info = self._load(storage, stored, schema.name, pipeline, packaged, command.dataset, table, cancelled,
                                  entry)
        except BaseException:
            self._discard_packages(pipeline)
            raise
        finally:
            storage.invalidate()
            shutil.rmtree(folder, ignore_errors=True)
        # the rows are committed: nothing from here on may turn the answer into an error
        try:
            new_schema = storage.stored_schema(table)
        except Exception:  # noqa: BLE001 - the destination may be briefly unreachable; the save happened
            log.exception("could not read the schema of dataset %s after a save", command.dataset)
            new_schema = None
        started, finished = info.started_at, info.finished_at
        answer = LoadInfo(
            pipeline_name=pipeline_name,
            destination_name=storage.destination_config.name,
            destination_type=storage.destination_config.type,
            dataset_name=command.dataset,
            location=storage.destination_config.name,  # its name, never its address (LoadInfo.location)
            table_name=table,
            load_ids=tuple(info.loads_ids),
            load_seconds=round((finished - started).total_seconds(), 2) if started and finished else 0.0,
            rows=counts["rows"],
            bytes=counts["bytes"],
            schema_name=schema.name,
            schema_version=new_schema.version if new_schema else None,
            failed_jobs=sum(len(p.jobs.get("failed_jobs", [])) for p in info.load_packages),
        )
        self._answer(entry, answer, keep=bool(command.save_id))
        return answer

    def _recover_dataset(self, dataset: str) -> None:
        """Finish the dataset's saves a crash interrupted (under its write lock); raises while it cannot."""
        for entry in self.journal.unfinished(dataset):
            if not running_elsewhere(entry):
                self._recover(entry, raise_errors=True)
        self._unfinished.discard(dataset)

    @staticmethod
    def _check_cancelled(cancelled: Callable[[], bool], dataset: str, table: str) -> None:
        if cancelled():
            raise PutCancelled(f"upload to '{dataset}.{table}' was cancelled by the client; nothing was written",
                               dataset=dataset, table=table)

    @classmethod
    @contextlib.contextmanager
    def _write_lock(cls, storage: Any, dataset: str, table: str, cancelled: Callable[[], bool]) -> Iterator[None]:
        """The dataset's write lock, in arrival order (:class:`~flight_server.domain.storage.FifoLock`), waited for
        at most WRITE_LOCK_TIMEOUT (then UNAVAILABLE: busy, retry); a client that goes away leaves the queue."""
        lock = storage.write_lock
        ticket = lock.ticket()
        deadline = time.monotonic() + WRITE_LOCK_TIMEOUT
        try:
            while not lock.wait(ticket, max(0.0, min(0.25, deadline - time.monotonic()))):
                cls._check_cancelled(cancelled, dataset, table)
                if time.monotonic() >= deadline:
                    raise Unavailable(
                        f"dataset '{dataset}' is busy: the saves queued before this one did not finish within "
                        f"{WRITE_LOCK_TIMEOUT:.0f} s; nothing was written, retry", dataset=dataset, table=table)
        except BaseException:
            lock.give_up(ticket)
            raise
        try:
            yield
        finally:
            lock.release()

    def _load(self, storage: Any, stored: Any, schema_name: str, pipeline: Any, packaged: set[str], dataset: str,
              table: str, cancelled: Callable[[], bool], entry: Entry) -> Any:
        """Load the normalized packages; runs under the dataset's write lock, and returns only once the
        rows are committed (every error before that leaves the dataset as it was). ``stored``: the version
        of the save's schema (``schema_name``) the upload was checked against, None if it had none."""
        storage.invalidate()
        now = _newest_version(storage, schema_name)
        changed = (now.version_hash if now else None) != (stored.version_hash if stored else None)
        if changed and now is not None and now.version_hash in packaged:
            # the other save stored exactly the schema this upload's package holds (e.g. both created
            # the same new table with the same columns): loading it loses nothing and changes nothing
            # the contract would have to allow - the stored schema is the base of the load from here
            stored, changed = now, False
        if changed and now is not None:
            rebased = self._rebase(pipeline, stored, now)
            if rebased is not None:  # the others changed other tables: this save's changes go on top of theirs
                packaged.clear()
                packaged.update(rebased)
                stored, changed = now, False
                entry.before, entry.packaged = _schema_json(now), sorted(rebased)
        if changed:
            # optimistic concurrency: the upload was checked and normalized against a schema that is
            # no longer the dataset's (another save, or the owner's pipeline, changed it meanwhile)
            raise Unavailable(
                f"dataset '{dataset}' changed during the upload to '{dataset}.{table}' (its schema is now version "
                f"{now.version if now else 'none'}); nothing was written, retry the save",
                dataset=dataset, table=table, retry="conflict")
        self._check_cancelled(cancelled, dataset, table)
        # what the load may touch: the table and its child tables, stored or new (a replace empties them)
        family = sorted(set(_table_family(stored.schema if stored else None, table))
                        | set(_table_family(pipeline.default_schema, table)))
        undo: Callable[[], None] | None = None
        committed = False
        # from here a crash leaves the save to finish at the next start (save_journal.py); the journal
        # entry names the packages, and the put's folder is kept until the save is whole
        self.journal.write(entry)
        try:
            # the destination is held for the load step only (duckdb: its read-write connection,
            # which dlt borrows; reads of the file share it, the owner's pipelines wait before and after)
            with storage.writing(cancelled):
                self._check_cancelled(cancelled, dataset, table)  # its client may have left while it waited
                undo = storage.savepoint(family)
                faults.at("load")
                info = pipeline.load()
                committed = True
                faults.at("loaded")
                self._keep_owner_table_hints(storage, stored, dataset, info.loads_ids)  # best effort, never raises
                self._clear_staging(storage, family)
        except PipelineStepFailed as exc:
            if committed:  # pragma: no cover - nothing after the commit raises
                log.exception("error after the load of a save to %s.%s was committed", dataset, table)
                return info
            self._undo(undo)
            if exc.step == "load":
                self._forget_failed_schema(storage, stored, pipeline, packaged)
            self._clear_staging(storage, family)
            self.journal.drop(entry.key)  # undone: nothing of the save is stored
            raise self._step_error(exc, dataset, table, storage.destination_config.name) from None
        except BaseException as exc:
            if committed and isinstance(exc, Exception):
                log.exception("error after the load of a save to %s.%s was committed", dataset, table)
                return info
            self._undo(undo)
            self._forget_failed_schema(storage, stored, pipeline, packaged)
            self._clear_staging(storage, family)
            self.journal.drop(entry.key)
            raise
        return info

    @staticmethod
    def _clear_staging(storage: Any, tables: list[str]) -> None:
        try:
            storage.clear_staging(tables)
        except Exception:  # noqa: BLE001 - staging rows are dlt's scratch space; logged
            log.exception("could not empty the staging tables %s of dataset %s", tables, storage.dataset.name)

    def _batches(self, batches: Iterator[pa.RecordBatch], counts: dict[str, int]) -> Iterator[pa.Table]:
        """The upload's batches as dlt items, counted against the size limit, gathered into larger tables."""
        pending: list[pa.RecordBatch] = []
        rows = size = 0
        for batch in batches:
            counts["rows"] += batch.num_rows
            cost = _decoded_nbytes(batch)  # what it costs once dictionaries and list views are decoded
            counts["bytes"] += cost
            if counts["bytes"] > self.max_bytes:
                raise InvalidRequest(
                    f"upload exceeds the server's limit of {self.max_bytes} bytes (counted as the data takes once "
                    "decoded: dictionary-encoded columns at the size of their values); nothing was written",
                    max_bytes=self.max_bytes)
            pending.append(batch)
            rows += batch.num_rows
            size += cost
            if rows >= COALESCE_ROWS or size >= self.coalesce_bytes:
                yield pa.Table.from_batches(pending)
                pending, rows, size = [], 0, 0
        if pending:
            yield pa.Table.from_batches(pending)

    @staticmethod
    def _discard_packages(pipeline: Any) -> None:
        """Delete the put's pending packages, locally. Not dlt's ``abort_packages``: that completes
        a half-loaded package *at the destination* (a ``_dlt_loads`` record of an aborted load);
        a refused save must write nothing there. Each put has a pipelines folder of its own, so
        the local drop leaves nothing that a later run could retry."""
        try:
            pipeline.drop()
        except Exception:  # noqa: BLE001 - the folder is removed after the put anyway
            log.exception("could not drop the pipeline of a failed put")

    @staticmethod
    def _rebase(pipeline: Any, stored: Any, now: Any) -> set[str] | None:
        """Put this save's schema changes on top of the version stored meanwhile, or None when they meet.

        Saves into one dataset are checked and normalized without its lock (above), so another save (or
        the owner) may have stored a new version of the schema by the time this one loads: a save that
        created table ``a`` while this one created ``b``, or added column ``x`` to a table where this one
        added ``y``. Loading this package as it is would store a version without ``a`` (or ``x``). When
        everything this save changed (tables, columns, hints, compared with ``stored``, the version it was
        checked against) is in ``now`` as it was in ``stored`` (:func:`_three_way`), and the schema's settings
        (the owner's contract) are too, the contract decision is the same against ``now`` - a column new
        to ``stored`` is new to ``now`` - so the package's schema becomes ``now`` with this save's changes
        put in, as one more version. dlt's load then creates only what the package needs (its schema
        update) and stores that version. Otherwise (both changed one column or hint, both created one
        table, or the contract changed) the save is refused for a retry, which is checked anew. The
        hashes of the rebased package schemas are returned."""
        base = stored.schema if stored is not None else None
        base_settings = base.settings if base is not None else {}
        packages = pipeline._get_load_storage().normalized_packages
        rebased: dict[str, Schema] = {}
        for load_id in pipeline.list_normalized_load_packages():
            package = packages.load_schema(load_id)
            own = {name: table for name, table in package.tables.items()
                   if base is None or base.tables.get(name) != table}
            system = {package.version_table_name, package.loads_table_name, package.state_table_name}
            if base is not None and now.schema.settings != base_settings:
                return None
            merged = now.schema.clone()
            for name, table in own.items():
                if name in system and name in merged.tables:
                    continue  # dlt's own tables: the same in every schema of the dataset
                result = _three_way(base.tables.get(name) if base is not None else None, now.schema.tables.get(name),
                                    table)
                if result is None:
                    return None  # both changed one column or hint, or both created the table: may decide otherwise
                merged.tables[name] = result
            if package.settings != base_settings and base is not None:
                return None  # the save changed the schema's settings (never expected): not replayed
            rebased[load_id] = Schema.from_dict(merged.to_dict(bump_version=True), bump_version=False)
        for load_id, schema in rebased.items():
            packages.save_schema(load_id, schema)
        return {schema.version_hash for schema in rebased.values()}

    @staticmethod
    def _keep_owner_contract(pipeline: Any, before: Any) -> set[str]:
        """The profile's contract decides this save only. dlt writes the contract a pipeline ran with
        into the schema the load stores (the schema's settings and the tables), where it would bind
        the owner's own pipeline from then on: a ``freeze`` profile would lock the owner out of
        evolving the dataset. So the normalized package's schema gets the owner's contract back
        before the load stores it (the load itself does not use the contract)."""
        owner = before.schema if before is not None else None
        packages = pipeline._get_load_storage().normalized_packages
        hashes: set[str] = set()
        for load_id in pipeline.list_normalized_load_packages():
            stored = packages.load_schema(load_id).to_dict(bump_version=False)
            changed = _restore_key(stored.setdefault("settings", {}), owner.settings if owner else {}, "schema_contract")
            for name, table in stored["tables"].items():
                previous = owner.tables.get(name, {}) if owner else {}
                changed = _restore_key(table, previous, "schema_contract") or changed
            if changed:
                # the version dlt gave the package stays; the hash is that of the new content
                stored["version_hash"] = generate_version_hash(stored)
                packages.save_schema(load_id, Schema.from_dict(stored, bump_version=False))
            hashes.add(stored["version_hash"])
        return hashes

    @staticmethod
    def _keep_owner_table_hints(storage: Any, before: Any, dataset: str, load_ids: Sequence[str] = ()) -> None:
        """dlt stores a table's hints as the last pipeline gave them: a save into the owner's table
        wrote its own write disposition, resource name and column hints over the owner's (a demo
        table loaded with ``replace`` read ``append`` after one append). So the hints of every table
        and column that existed before the save are put back; new columns (under ``evolve``) and new
        tables stay. When that gives the owner's schema again, the version the save stored is removed
        (the dataset keeps its version); otherwise the result is stored as the next version with dlt's
        own ``update_stored_schema``. The load itself needs the save's hints, so this comes after it.
        The save's ``_dlt_loads`` records name the version the dataset keeps, so each still has its
        ``_dlt_version`` row when the save's own version is removed."""
        if before is None:
            return
        try:
            storage.invalidate()
            now = _newest_version(storage, before.schema.name)
            if now is None or now.version_hash == before.version_hash:
                return
            stored = now.schema.to_dict(bump_version=False)
            for name, table in stored["tables"].items():
                previous = before.schema.tables.get(name)
                if previous is None or name.startswith(now.schema._dlt_tables_prefix):
                    continue
                for key in (set(table) | set(previous)) - {"columns", "name", "parent", "x-normalizer"}:
                    _restore_key(table, previous, key)
                for column, hints in previous.get("columns", {}).items():
                    if column in table["columns"]:
                        table["columns"][column] = copy.deepcopy(hints)
            from dlt.dataset.utils import get_destination_clients

            if generate_version_hash(stored) == before.version_hash:
                try:
                    client = isolated(get_destination_clients, before.schema, storage.dlt_destination(), dataset)[0]
                    with client:
                        _relink_loads(client, load_ids, before.schema.name, before.version_hash)
                except Exception:  # noqa: BLE001 - the owner's schema comes first; the records keep the save's hash
                    log.exception("could not point the load records of a save to %s at schema version %s",
                                  dataset, before.version)
                storage.forget_schema_version(now.schema.name, now.version_hash)
                return
            schema = Schema.from_dict(stored)  # the next version: its content changed, dlt bumps it
            if schema.version_hash == now.version_hash:
                return
            client = isolated(get_destination_clients, schema, storage.dlt_destination(), dataset)[0]
            with client:
                client.update_stored_schema()
        except Exception:  # noqa: BLE001 - the rows are saved; the owner's hints are best effort, logged
            log.exception("could not put back the table hints of dataset %s after a save", dataset)
        finally:
            storage.invalidate()

    @staticmethod
    def _undo(undo: Callable[[], None] | None) -> None:
        """Put back what a failed load changed where the destination has no transaction (Delta)."""
        if undo is None:
            return
        try:
            undo()
        except Exception:  # noqa: BLE001 - the load error is what the client must see; this is logged
            log.exception("could not restore the tables of a failed load")

    @staticmethod
    def _forget_failed_schema(storage: Any, before: Any, pipeline: Any, packaged: set[str]) -> None:
        """A load that failed after dlt stored the new schema version (dlt migrates the schema
        before it loads the data) leaves that version behind: remove it, so a refused save leaves
        the dataset's schema version as it was. Only the version this pipeline stored is removed."""
        try:
            storage.invalidate()
            name = pipeline.default_schema_name or (before.schema.name if before is not None else None)
            now = _newest_version(storage, name) if name else None
            ours = {pipeline.default_schema.version_hash} if pipeline.default_schema_name else set()
            ours |= packaged  # the schemas of the put's packages, as the load stored them
            if now is None or now.version_hash not in ours:
                return
            if before is not None and now.version_hash == before.version_hash:
                return
            storage.forget_schema_version(now.schema.name, now.version_hash)
            log.warning("removed schema %s version %s stored by a failed load", now.schema.name, now.version)
        except Exception:  # noqa: BLE001 - best effort; the load error is what the client must see
            log.exception("could not remove the schema version of a failed load")
        finally:
            storage.invalidate()

    @staticmethod
    def _step_error(exc: PipelineStepFailed, dataset: str, table: str, destination: str | None = None) -> ServiceError:
        inner = exc.exception
        cause: BaseException | None = inner
        while cause is not None:  # our own refusal, raised inside dlt's extract (wrapped by dlt)
            if isinstance(cause, ServiceError):
                return cause
            cause = cause.__cause__ or cause.__context__
        if isinstance(inner, DataValidationError):
            from flight_server.domain.contracts import violation_message

            text = violation_message(inner.schema_name, inner.table_name or table, inner.column_name,
                                     str(inner.schema_entity), str(inner.contract_mode))
            return ContractViolation(
                text, schema_name=inner.schema_name, table_name=inner.table_name or table,
                column_name=inner.column_name, schema_entity=str(inner.schema_entity),
                contract_mode=str(inner.contract_mode), load_id=exc.load_id, step=exc.step,
            )
        reason = _reason(inner)
        if exc.step == "load" and _refused_data(inner):  # the destination refused these values
            return InvalidRequest(
                f"saving to '{dataset}.{table}' failed at step load: the destination refused the upload's values "
                f"({reason}); nothing was written and the table is as it was",
                dataset=dataset, table=table, step=exc.step, reason=reason,
            )
        if exc.step == "load" and not _transient(inner):  # the same save would fail the same way again
            return InvalidRequest(
                f"saving to '{dataset}.{table}' failed at step load: the destination refused the save ({reason}); "
                "nothing was written and the table is as it was",
                dataset=dataset, table=table, step=exc.step, reason=reason,
            )
        if exc.step == "load" and is_unreachable(inner):  # its text says where the store lives: name it instead
            error = unreachable(destination or dataset, dataset, f"saving to '{dataset}.{table}'")
            error.fields.update(table=table, step=exc.step)
            return error
        if exc.step == "load":  # the destination away or busy: a retry may succeed
            return Unavailable(
                f"saving to '{dataset}.{table}' failed at step load: the destination did not take the rows "
                f"({reason}); nothing was written and the table is as it was",
                dataset=dataset, table=table, step=exc.step, reason=reason,
            )
        return InvalidRequest(
            f"saving to '{dataset}.{table}' failed at step {exc.step}: {reason}; nothing was written",
            dataset=dataset, table=table, step=exc.step, reason=reason,
        )


# "_duckdb.ConversionException: Conversion Error: ..." -> "Conversion Error: ..."
_EXCEPTION_PREFIX = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?[A-Za-z_]\w*(?:Exception|Error|Failed|Violation): ")


def _reason(exc: BaseException) -> str:
    """What failed, in the words of the one who refused (the destination, dlt): the first line of the
    innermost message, without Python's chained-exception text, class paths or dlt's retry advice
    (a failed put's package is dropped, there is nothing to retry)."""
    text = getattr(exc, "failed_message", None) or str(exc) or type(exc).__name__
    lines = [line for line in str(text).splitlines() if line.strip()]
    if lines and lines[0].startswith("Traceback"):  # a failed job's message can be a whole traceback:
        # its exception lines are the unindented ones after the frames; the first names the root cause
        lines = [line for line in lines if not line[0].isspace() and not line.startswith(
            ("Traceback", "The above exception", "During handling"))]
    first = lines[0].strip() if lines else type(exc).__name__
    first = _EXCEPTION_PREFIX.sub("", first)
    return first if len(first) <= 300 else first[:300] + "..."


# Destination errors caused by the values sent, not by the destination's state: duckdb's conversion,
# range, input and constraint errors, PostgreSQL's data exceptions (class 22: DataError and its
# NumericValueOutOfRange, InvalidDatetimeFormat, ...) and integrity violations (class 23). dlt keeps only
# the text of a failed job, so the names are also looked for at the start of its message.
_DATA_ERRORS = frozenset({
    "ConversionException", "OutOfRangeException", "InvalidInputException", "ConstraintException",
    "DataError", "IntegrityError", "NumericValueOutOfRange", "NotNullViolation", "CheckViolation",
})
_DATA_ERROR_TEXT = re.compile(r"\b(?:Conversion|Out of Range|Invalid Input|Constraint) Error:|"
                              r"\b(?:" + "|".join(sorted(_DATA_ERRORS)) + r")\b")


def _refused_data(exc: BaseException) -> bool:
    """True when the load failed on the values (see :data:`_DATA_ERRORS`), not on an outage or lock."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if {k.__name__ for k in type(cause).__mro__} & _DATA_ERRORS:
            return True
        text = str(getattr(cause, "failed_message", None) or cause)
        if _DATA_ERROR_TEXT.search(text.split("\n", 1)[0]):  # the message's first line: what failed
            return True
        cause = cause.__cause__ or cause.__context__
    return False


# what says "try again later" in a failed load: the destination unreachable or busy (a lock, a timeout,
# a dropped connection); dlt marks its own such errors TransientException
_TRANSIENT_TEXT = re.compile(r"could not connect|connection (?:refused|reset|closed|timed out)|server closed the "
                             r"connection|could not set lock|conflicting lock|timed? ?out|temporarily unavailable|"
                             r"too many connections|deadlock detected|could not serialize", re.IGNORECASE)


def _transient(exc: BaseException) -> bool:
    """True when a failed load may succeed if retried (UNAVAILABLE); a refusal that a retry cannot fix -
    a constraint the table has, a type it cannot take - is not (issue 21: clients that retry looped forever)."""
    from dlt.common.exceptions import TransientException

    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, (TransientException, ConnectionError, TimeoutError)):
            return True
        if _TRANSIENT_TEXT.search(str(getattr(cause, "failed_message", None) or cause)):
            return True
        cause = cause.__cause__ or cause.__context__
    return False


def _needs_decoding(dtype: pa.DataType) -> bool:
    """Types whose ``nbytes`` can be far below their decoded size: dictionaries and list views."""
    if pa.types.is_dictionary(dtype) or pa.types.is_list_view(dtype) or pa.types.is_large_list_view(dtype):
        return True
    return pa.types.is_nested(dtype) and any(_needs_decoding(dtype.field(i).type) for i in range(dtype.num_fields))


def _decoded_nbytes(batch: Any) -> int:
    """The batch's size as dlt will hold it: ``nbytes`` for plain columns; for dictionary-encoded
    columns (and list views) each row costs its value, so a 1 MB dictionary referenced by 6,600
    indices counts 6.6 GB, not 1 MB."""
    total = 0
    for column in batch.columns:
        if _needs_decoding(column.type):
            total += int(_element_sizes(column).sum())
        else:
            total += column.nbytes
    return total


def _element_sizes(array: Any) -> np.ndarray:
    """Decoded bytes per element of ``array`` (approximate: buffers' per-element share)."""
    n = len(array)
    dtype = array.type
    if n == 0:
        return np.zeros(0, np.int64)
    if pa.types.is_dictionary(dtype):
        values = _element_sizes(array.dictionary)
        indices = array.indices.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        sizes: np.ndarray = values[indices] if len(values) else np.zeros(n, np.int64)
        return sizes
    if pa.types.is_binary(dtype) or pa.types.is_string(dtype) or pa.types.is_large_binary(dtype) \
            or pa.types.is_large_string(dtype):
        lengths: np.ndarray = pc.binary_length(array).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        return lengths + (8 if pa.types.is_large_binary(dtype) or pa.types.is_large_string(dtype) else 4)
    if pa.types.is_list_view(dtype) or pa.types.is_large_list_view(dtype) or pa.types.is_list(dtype) \
            or pa.types.is_large_list(dtype) or pa.types.is_map(dtype):
        child = np.concatenate([[0], np.cumsum(_element_sizes(array.values))])
        if pa.types.is_list_view(dtype) or pa.types.is_large_list_view(dtype):
            starts = array.offsets.to_numpy(zero_copy_only=False).astype(np.int64)
            ends = starts + array.sizes.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        else:
            offsets = array.offsets.to_numpy(zero_copy_only=False).astype(np.int64)
            starts, ends = offsets[:-1], offsets[1:]
        valid = array.is_valid().to_numpy(zero_copy_only=False)
        return np.where(valid, child[ends] - child[starts], 0) + 8
    if pa.types.is_fixed_size_list(dtype):
        child = _element_sizes(array.flatten())
        return child.reshape(n, dtype.list_size).sum(axis=1) if len(child) == n * dtype.list_size \
            else np.full(n, int(child.sum()) // n + 1, np.int64)
    if pa.types.is_struct(dtype):
        sizes = np.zeros(n, np.int64)
        for child in array.flatten():
            sizes += _element_sizes(child)
        return sizes + 1
    return np.full(n, -(-array.nbytes // n), np.int64)  # fixed width and the rest: an even share


def _restore_key(target: dict[str, Any], source: Any, key: str) -> bool:
    """Set ``target[key]`` back to ``source[key]`` (or remove it); True if that changed ``target``."""
    if target.get(key) == source.get(key):
        return False
    if key in source:
        target[key] = copy.deepcopy(source[key])
    else:
        target.pop(key, None)
    return True


def _relink_loads(client: Any, load_ids: Sequence[str], schema_name: str, version_hash: str) -> None:
    """Point the save's own ``_dlt_loads`` records at ``version_hash`` (the version the dataset keeps) -
    through dlt's client of the destination: an UPDATE on SQL destinations; on a filesystem, dlt's load
    record file (``_dlt_loads/<schema>__<load id>.jsonl``) rewritten with the same fields."""
    if hasattr(client, "fs_client"):  # a filesystem: dlt's FilesystemClient._store_load layout
        for load_id in load_ids:
            path = client.pathlib.join(client.dataset_path, client.schema.loads_table_name,
                                       f"{schema_name}__{load_id}.jsonl")
            if client.fs_client.exists(path):
                record = json.loads(client.fs_client.read_text(path, encoding="utf-8"))
                record["schema_version_hash"] = version_hash
                client._write_to_json_file(path, record)
        return
    sql_client = client.sql_client
    table = sql_client.make_qualified_table_name(client.schema.loads_table_name)
    for load_id in load_ids:
        sql_client.execute_sql(f"UPDATE {table} SET schema_version_hash = %s WHERE load_id = %s AND schema_name = %s",
                               version_hash, load_id, schema_name)


def _three_way(base: dict[str, Any] | None, now: dict[str, Any] | None, mine: dict[str, Any]) -> dict[str, Any] | None:
    """One table of this save (``mine``) put on top of ``now``, both descended from ``base``; None when they
    changed the same thing differently (or both created the table). Columns and hints this save did not
    change are ``now``'s; what it changed comes in when ``now`` has it as ``base`` had it (or already equal)."""
    if now == base:
        return copy.deepcopy(mine)
    if base is None or now is None:
        return None
    merged = copy.deepcopy(now)
    for key, value in mine.items():
        if key == "columns" or value == base.get(key):
            continue
        if now.get(key) not in (base.get(key), value):
            return None
        merged[key] = copy.deepcopy(value)
    columns, before = merged.setdefault("columns", {}), base.get("columns", {})
    for name, column in mine.get("columns", {}).items():
        if column == before.get(name):
            continue
        if columns.get(name) not in (before.get(name), column):
            return None  # both changed (or added) this column, differently
        columns[name] = copy.deepcopy(column)
    return merged


def _schema_json(stored: Any) -> dict[str, Any] | None:
    """A stored schema as the journal keeps it (save_journal.Entry.before)."""
    if stored is None:
        return None
    return {"schema": stored.schema.to_dict(bump_version=False), "version": stored.version,
            "version_hash": stored.version_hash}


def _recorded_loads(storage: Any) -> set[str]:
    """The load ids of the dataset's ``_dlt_loads`` records, read as a client reads them (every adapter
    serves the table)."""
    try:
        reader = storage.reader(LOADS_TABLE, ["load_id"], None)
    except NotFound:
        return set()
    return {str(v) for v in reader.read_all().column("load_id").to_pylist()}


def _newest_version(storage: Any, schema_name: str) -> Any:
    """The newest stored version of one dlt schema of the dataset (a dataset may hold several)."""
    return next((s for s in storage.stored_schemas() if s.schema.name == schema_name), None)


def _write_mode(schema: Schema, command: WriteCommand, table: str, exists: bool,
                columns: list[str]) -> tuple[str, list[str], list[str]]:
    """The write disposition and keys of a save: as asked, else as the stored table (dlt+ does the same:
    a save into a ``merge`` table merges on its stored keys; any other table, and a new one, appends -
    a default save never deletes rows). A merge without keys uses the stored primary key (or merge key)."""
    stored = schema.tables.get(table) if exists else None
    stored_columns = (stored or {}).get("columns", {})
    disposition = command.write_disposition or (
        "merge" if stored is not None and stored.get("write_disposition") == "merge" else "append")
    primary_key = [schema.naming.normalize_path(k) for k in command.primary_key]
    merge_key: list[str] = []
    if disposition == "merge" and not primary_key:
        primary_key = [c for c, hints in stored_columns.items() if hints.get("primary_key")]
        merge_key = [] if primary_key else [c for c, hints in stored_columns.items() if hints.get("merge_key")]
        if not primary_key and not merge_key:
            raise InvalidRequest(
                f"merge needs a primary key: table '{command.dataset}.{table}' stores none; pass primary_key",
                dataset=command.dataset, table=table)
    missing = [k for k in (*primary_key, *merge_key) if k not in columns]
    if disposition == "merge" and missing:
        raise InvalidRequest(
            f"primary key column '{missing[0]}' is not in the upload to '{command.dataset}.{table}'; "
            f"columns: {', '.join(columns)}", dataset=command.dataset, table=table, column=missing[0])
    return disposition, primary_key, merge_key


# dlt+'s name for the schema its ``save`` writes new tables into (the seed's error text names it)
SAVES_SCHEMA = "out_source"
# merge strategies that delete the nested rows of every merged row before inserting the upload's
_REPLACES_NESTED = ("delete-insert", "upsert")


def _served_schema(storage: Any, table: str) -> pa.Schema | None:
    """The Arrow schema a read of ``table`` returns (None if it cannot be told: then only dlt's own type
    inference decides what an upload's columns are)."""
    try:
        return storage.arrow_schema(table)
    except Exception:  # noqa: BLE001 - the save still gets dlt's own checks
        log.debug("no served schema for %s", table, exc_info=True)
        return None


def _refuse_scd2(schema: Schema, dataset: str, table: str, exists: bool) -> None:
    """Refuse, in plain words and before anything is read, a save into a table whose history dlt keeps with
    its ``scd2`` merge strategy: each version's ``_dlt_id`` is dlt's hash of the row as the owner's source
    sent it (original names and nested data included) and ``_dlt_valid_from/_to`` are set by the owner's
    loads. Rows read back cannot be re-hashed alike (dlt itself adds no row hash to Arrow data), so a merge
    would retire and re-insert every version, and any other save would add rows outside the history."""
    stored = schema.tables.get(table) if exists else None
    if stored is not None and stored.get("write_disposition") == "merge" and stored.get("x-merge-strategy") == "scd2":
        raise InvalidRequest(
            f"table '{dataset}.{table}' keeps a history of row versions with dlt's scd2 merge strategy: its "
            "versions and their validity (_dlt_valid_from/_dlt_valid_to) come from the owner's loads, and a "
            "saved row cannot be matched to its version, so a save would rewrite that history; save the rows "
            "into a table of your own; nothing was written", dataset=dataset, table=table, merge_strategy="scd2")


def _refuse_nested_merge(schema: Schema, dataset: str, table: str, disposition: str, exists: bool) -> None:
    """Refuse a merge that would delete a parent's nested rows: dlt's ``delete-insert`` and ``upsert``
    merges replace all child rows of every merged row, and the rows of a save carry no nested data (a
    read of a table does not include its child tables, and a save cannot write them). Appending to the
    parent, or an ``insert-only`` merge, touches no child row."""
    stored = schema.tables.get(table) if exists else None
    if stored is None or disposition != "merge":
        return
    children = [str(t["name"]) for t in get_nested_tables(schema.tables, table) if t["name"] != table]
    if children and stored.get("x-merge-strategy", "delete-insert") in _REPLACES_NESTED:
        raise InvalidRequest(
            f"table '{dataset}.{table}' has nested data in child table(s) {', '.join(children)}: a merge replaces "
            "the nested rows of every merged row, and the rows of a save carry none (rows read from a table do "
            "not include its child tables), so the merge would delete them; append the rows "
            "(write_disposition='append') or save them into a table of your own; nothing was written",
            dataset=dataset, table=table, child_tables=children)


def _table_family(schema: Schema | None, table: str) -> list[str]:
    """The table and its child tables in a schema (what dlt's replace empties, or creates)."""
    if schema is None or table not in schema.tables:
        return [table]
    return [str(t["name"]) for t in get_nested_tables(schema.tables, table)]
