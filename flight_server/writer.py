"""Accepted uploads into the destination through a real dlt pipeline (``save_<table>_pipeline``).

Each put runs in a fresh pipelines folder with the dataset's stored schema, so schema versions,
``_dlt_loads`` and evolution are dlt's. A put that fails at any step, or whose client went away,
leaves nothing behind: its pending packages are dropped and the folder removed.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import dlt
import pyarrow as pa
from dlt.common.schema import Schema
from dlt.common.schema.exceptions import DataValidationError
from dlt.pipeline.exceptions import PipelineStepFailed

from client.protocol import COMMIT_METADATA, WriteCommand
from flight_server.catalog import Catalog
from flight_server.contracts import check_write
from flight_server.errors import ContractViolation, InvalidRequest, ServiceError, Unavailable

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


@dataclass(frozen=True)
class LoadResult:
    """What a put stored; sent back as JSON in PutResult metadata."""

    pipeline_name: str
    destination_name: str
    destination_type: str
    dataset_name: str
    location: str
    table_name: str
    load_ids: list[str]
    load_seconds: float
    rows: int
    bytes: int
    schema_name: str
    schema_version: int | None
    failed_jobs: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _load_id() -> str:
    """A package id in dlt's format, for a put refused before dlt made a package."""
    return str(time.time())


class Writer:
    """Runs puts for the service; one write per dataset at a time."""

    def __init__(self, catalog: Catalog, work_dir: Path, max_bytes: int) -> None:
        self.catalog = catalog
        self.work_dir = work_dir
        self.max_bytes = max_bytes

    def put(self, profile: str, command: WriteCommand, reader: Any, cancelled: Callable[[], bool]) -> LoadResult:
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
            resource = dlt.resource(
                self._batches(reader, counts), name=command.table, write_disposition=command.write_disposition,
                primary_key=list(command.primary_key) or None, table_format=storage.table_format,
            )
            try:
                decision = check_write(schema, command.table, reader.schema, grant.contract, resource)
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
                info = pipeline.load()
            except PipelineStepFailed as exc:
                pipeline.drop_pending_packages()
                raise self._step_error(exc, command) from None
            except BaseException:
                pipeline.drop_pending_packages()
                raise
            finally:
                storage.invalidate()
                shutil.rmtree(folder, ignore_errors=True)
            new_schema = storage.stored_schema()
            started, finished = info.started_at, info.finished_at
            return LoadResult(
                pipeline_name=pipeline_name,
                destination_name=storage.destination_config.name,
                destination_type=storage.destination_config.type,
                dataset_name=command.dataset,
                location=storage.location,
                table_name=command.table,
                load_ids=list(info.loads_ids),
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
            except pa.ArrowException as exc:
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
    def _step_error(exc: PipelineStepFailed, command: WriteCommand) -> ServiceError:
        inner = exc.exception
        if isinstance(inner, ServiceError):
            return inner
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
