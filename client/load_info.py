"""The result of a save, printed the way dlt prints a LoadInfo."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class LoadInfo:
    """What the server stored for one ``Dataset.save``."""

    pipeline_name: str
    destination_name: str
    destination_type: str
    dataset_name: str
    # the destination's name from the project file, as ``destination_name`` (servers before 2026-12 sent its
    # address: a connection string without its password, or the server's file path)
    location: str
    table_name: str
    load_ids: tuple[str, ...]
    load_seconds: float
    rows: int
    bytes: int
    schema_name: str
    schema_version: int | None
    failed_jobs: int

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> LoadInfo:
        fields = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        fields["load_ids"] = tuple(d.get("load_ids", ()))
        return cls(**fields)

    def to_json(self) -> dict[str, Any]:
        """The JSON the server puts into PutResult metadata (``protocol.PutResult``)."""
        body = asdict(self)
        body["load_ids"] = list(self.load_ids)
        return body

    @property
    def has_failed_jobs(self) -> bool:
        return self.failed_jobs > 0

    def __str__(self) -> str:
        lines = [
            f"Pipeline {self.pipeline_name} load step completed in {self.load_seconds:.2f} seconds",
            f"{len(self.load_ids)} load package(s) were loaded to destination {self.destination_name} "
            f"and into dataset {self.dataset_name}",
            f"The {self.destination_type} destination '{self.destination_name}' stored the data",
        ]
        for load_id in self.load_ids:
            state = "contains no failed jobs" if not self.failed_jobs else f"contains {self.failed_jobs} failed job(s)"
            lines.append(f"Load package {load_id} is LOADED and {state}")
        return "\n".join(lines)
