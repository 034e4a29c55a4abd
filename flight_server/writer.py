"""Accepted uploads into the destination through a real dlt pipeline (``save_<table>_pipeline``).

Each put runs in a fresh pipelines folder with the dataset's stored schema, so schema versions,
``_dlt_loads`` and evolution are dlt's. A put that fails at any step, or whose client went away,
leaves nothing behind: its pending packages are dropped and the folder removed, and when dlt had
already stored a new schema version before the load failed (it migrates the schema first), that
version is removed again. Under ``data_type: evolve`` a column whose type differs from the stored
one is cast to the stored type (see :func:`flight_server.contracts.check_write`).

Works the same on every destination: dlt picks the loader file format for Arrow items (Parquet for
duckdb and Delta, CSV through ``COPY`` for PostgreSQL), and the adapter gives the table format
(``delta``) to every resource.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import dlt
import pyarrow as pa
import pyarrow.compute as pc
from dlt.common.libs.pyarrow import columns_to_arrow
from dlt.common.schema import Schema
from dlt.common.schema.exceptions import DataValidationError
from dlt.pipeline.exceptions import PipelineStepFailed

from client.load_info import LoadInfo  # the one definition of what a put answers, shared with the client
from client.protocol import COMMIT_METADATA, WriteCommand
from flight_server.catalog import Catalog
from flight_server.contracts import check_write
from flight_server.errors import ContractViolation, InvalidRequest, ServiceError, Unavailable

log = logging.getLogger("flight_share.writer")

# Arrow loads get dlt's row ids and load ids like dict loads do, so Arrow and dict writes can share a
# table (dict-created tables have NOT NULL _dlt_id/_dlt_load_id) and _dlt_loads tracks every row.
os.environ.setdefault("NORMALIZE__PARQUET_NORMALIZER__ADD_DLT_LOAD_ID", "true")
os.environ.setdefault("NORMALIZE__PARQUET_NORMALIZER__ADD_DLT_ID", "true")

# Uploads arrive in small batches (the client sends 65,536 rows). Handed to dlt one by one, each becomes
# its own extract item and its own parquet row group, which normalize and the destination then re-read
# row group by row group: extract + normalize + load took ~45% more CPU than for the same rows in
# 1 Mi-row items (benchmarks/WRITE.md). So batches are gathered (zero-copy) into tables of up to
# pyarrow's default row-group length, or a byte cap, before dlt sees them.
COALESCE_ROWS = 1 << 20
COALESCE_BYTES = 128 << 20


class PutCancelled(InvalidRequest):
    """The client went away before the upload was complete; nothing was written."""


def _load_id() -> str:
    """A package id in dlt's format, for a put refused before dlt made a package."""
    return str(time.time())


class Writer:
    """Runs puts for the service; one write per dataset at a time."""

    def __init__(self, catalog: Catalog, work_dir: Path, max_bytes: int) -> None:
        self.catalog = catalog
        self.work_dir = work_dir
        self.max_bytes = max_bytes

    def put(self, profile: str, command: WriteCommand, reader: Any, cancelled: Callable[[], bool]) -> LoadInfo:
        """Check, then load one upload stream; raise a ServiceError on refusal."""
        grant = self.catalog.require_write(profile, command.dataset)
        if command.table.startswith("_dlt"):
            raise InvalidRequest(f"table name '{command.table}' is reserved for dlt", dataset=command.dataset, table=command.table)
        storage = self.catalog.storage(command.dataset)
        with storage.write_lock:
            storage.invalidate()
            stored = storage.stored_schema()
            dataset_config = self.catalog.project.datasets[command.dataset]
            schema = stored.schema.clone() if stored else Schema(dataset_config.schema_name or command.dataset)
            counts = {"rows": 0, "bytes": 0, "committed": 0}
            decided: dict[str, Any] = {}

            def upload() -> Iterator[Any]:
                """The upload as dlt items; runs only inside extract, after the contract decision."""
                batches: Iterator[Any] = self._batches(reader, counts)
                if decided["decision"].coerce:
                    batches = self._coerced(batches, decided["decision"].coerce, storage, command)
                yield from batches

            resource = dlt.resource(
                upload(), name=command.table, write_disposition=command.write_disposition,
                primary_key=list(command.primary_key) or None, table_format=storage.table_format,
            )
            try:
                decision = decided["decision"] = check_write(schema, command.table, reader.schema, grant.contract,
                                                             resource)
            except ContractViolation as exc:
                exc.fields["load_id"] = _load_id()
                exc.fields["step"] = "extract"
                raise
            pipeline_name = f"save_{command.table}_pipeline"
            folder = self.work_dir / f"{pipeline_name}-{uuid.uuid4().hex}"
            pipeline = dlt.pipeline(pipeline_name, pipelines_dir=str(folder), destination=storage.dlt_destination(),
                                    dataset_name=command.dataset)
            try:
                pipeline.extract(resource, schema=schema, schema_contract=decision.contract)
                if command.commit_marker and not counts["committed"]:
                    raise PutCancelled(
                        f"upload to '{command.dataset}.{command.table}' ended without the client's commit; nothing was written",
                        dataset=command.dataset, table=command.table,
                    )
                if cancelled():
                    raise PutCancelled(
                        f"upload to '{command.dataset}.{command.table}' was cancelled by the client; nothing was written",
                        dataset=command.dataset, table=command.table,
                    )
                pipeline.normalize()
                with storage.writing():  # the destination is held for the load step only
                    info = pipeline.load()
            except PipelineStepFailed as exc:
                if exc.step == "load":
                    self._forget_failed_schema(storage, stored, pipeline)
                self._discard_packages(pipeline)
                raise self._step_error(exc, command) from None
            except BaseException:
                self._forget_failed_schema(storage, stored, pipeline)
                self._discard_packages(pipeline)
                raise
            finally:
                storage.invalidate()
                shutil.rmtree(folder, ignore_errors=True)
            new_schema = storage.stored_schema()
            started, finished = info.started_at, info.finished_at
            return LoadInfo(
                pipeline_name=pipeline_name,
                destination_name=storage.destination_config.name,
                destination_type=storage.destination_config.type,
                dataset_name=command.dataset,
                location=storage.location,
                table_name=command.table,
                load_ids=tuple(info.loads_ids),
                load_seconds=round((finished - started).total_seconds(), 2) if started and finished else 0.0,
                rows=counts["rows"],
                bytes=counts["bytes"],
                schema_name=schema.name,
                schema_version=new_schema.version if new_schema else None,
                failed_jobs=sum(len(p.jobs.get("failed_jobs", [])) for p in info.load_packages),
            )

    def _batches(self, reader: Any, counts: dict[str, int]) -> Iterator[pa.Table]:
        """The upload's batches as dlt items, counted against the size limit, gathered into larger tables."""
        pending: list[pa.RecordBatch] = []
        rows = size = 0
        while True:
            try:
                chunk = reader.read_chunk()
            except StopIteration:
                break
            except (pa.ArrowException, OSError) as exc:  # pyarrow reports some IPC framing errors as IOError
                raise InvalidRequest(f"the upload is not a valid Arrow stream: {exc}") from None
            batch = chunk.data
            if counts["committed"]:
                raise InvalidRequest("the upload continued after its commit marker")
            if batch is None:
                if chunk.app_metadata is not None and chunk.app_metadata.to_pybytes() == COMMIT_METADATA:
                    counts["committed"] = 1
                continue
            counts["rows"] += batch.num_rows
            counts["bytes"] += batch.nbytes
            if counts["bytes"] > self.max_bytes:
                raise InvalidRequest(f"upload exceeds the server's limit of {self.max_bytes} bytes; nothing was written")
            pending.append(batch)
            rows += batch.num_rows
            size += batch.nbytes
            if rows >= COALESCE_ROWS or size >= COALESCE_BYTES:
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
    def _coerced(batches: Iterator[pa.RecordBatch], columns: dict[str, Any], storage: Any,
                 command: WriteCommand) -> Iterator[pa.RecordBatch]:
        """Cast columns whose stored type differs to that type (``data_type: evolve``, see
        :func:`contracts.check_write`); a value that does not fit refuses the whole upload."""
        targets = columns_to_arrow(columns, storage.cached_capabilities(), "UTC")
        for batch in batches:
            arrays = list(batch.columns)
            for i, name in enumerate(batch.schema.names):
                if name not in columns:
                    continue
                target = targets.field(name).type
                try:
                    arrays[i] = pc.cast(arrays[i], target, safe=True)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                    raise InvalidRequest(
                        f"column '{name}' of table '{command.table}' is stored as {columns[name]['data_type']}; "
                        f"the upload's {batch.schema.field(name).type} values cannot be stored in it ({exc}); "
                        "nothing was written",
                        dataset=command.dataset, table=command.table, column_name=name,
                    ) from None
            fields = [batch.schema.field(i).with_type(a.type) for i, a in enumerate(arrays)]
            build = pa.Table.from_arrays if isinstance(batch, pa.Table) else pa.RecordBatch.from_arrays
            yield build(arrays, schema=pa.schema(fields, batch.schema.metadata))

    @staticmethod
    def _forget_failed_schema(storage: Any, before: Any, pipeline: Any) -> None:
        """A load that failed after dlt stored the new schema version (dlt migrates the schema
        before it loads the data) leaves that version behind: remove it, so a refused save leaves
        the dataset's schema version as it was. Only the version this pipeline stored is removed."""
        try:
            storage.invalidate()
            now = storage.stored_schema()
            ours = pipeline.default_schema.version_hash if pipeline.default_schema_name else None
            if now is None or ours is None or now.version_hash != ours:
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
    def _step_error(exc: PipelineStepFailed, command: WriteCommand) -> ServiceError:
        inner = exc.exception
        cause: BaseException | None = inner
        while cause is not None:  # our own refusal, raised inside dlt's extract (wrapped by dlt)
            if isinstance(cause, ServiceError):
                return cause
            cause = cause.__cause__ or cause.__context__
        if isinstance(inner, DataValidationError):
            from flight_server.contracts import violation_message

            text = violation_message(inner.schema_name, inner.table_name or command.table, inner.column_name,
                                     str(inner.schema_entity), str(inner.contract_mode))
            return ContractViolation(
                text, schema_name=inner.schema_name, table_name=inner.table_name or command.table,
                column_name=inner.column_name, schema_entity=str(inner.schema_entity),
                contract_mode=str(inner.contract_mode), load_id=exc.load_id, step=exc.step,
            )
        cls = Unavailable if exc.step == "load" else InvalidRequest  # load: the destination failed, not the data
        return cls(
            f"saving to '{command.dataset}.{command.table}' failed at step {exc.step}: {inner}; nothing was written",
            dataset=command.dataset, table=command.table, step=exc.step,
        )
