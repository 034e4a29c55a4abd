"""What a profile may see: datasets, their tables and Arrow schemas. No Flight types here."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import pyarrow as pa

from client.protocol import CatalogInfo, DatasetInfo
from flight_server.domain.config import DatasetAccess, DatasetConfig, ProjectConfig
from flight_server.domain.errors import Forbidden, NotFound, ServiceError
from flight_server.domain.masking import mask
from flight_server.domain.reachability import is_unreachable, unreachable
from flight_server.domain.storage import Storage

log = logging.getLogger("flight_share.catalog")


#: picks and opens the adapter of a dataset (``flight_server.storage.open_storage``: the composition root chooses)
StorageOpener = Callable[[ProjectConfig, DatasetConfig], Storage]


class Catalog:
    """All datasets of a project, opened once; views are filtered per profile."""

    def __init__(self, project: ProjectConfig, open_storage: StorageOpener) -> None:
        self.project = project
        self._open_storage = open_storage
        # whoever builds a server (the CLI, a test, an embedding application) masks the secrets the project
        # pulled from the environment in every error; the CLI also installs the masking log formatter
        mask.add(project.secrets)
        self._storages: dict[str, Storage] = {}

    def storage(self, dataset: str) -> Storage:
        """The adapter of a dataset (opened on first use)."""
        storage = self._storages.get(dataset)
        if storage is None:
            storage = self._storages[dataset] = self._open_storage(self.project, self.project.datasets[dataset])
        return storage

    def grant(self, profile: str, dataset: str) -> DatasetAccess:
        """The profile's grant for a dataset; a dataset it may not see is reported as not existing."""
        grants = self.project.profile(profile).datasets
        if dataset not in grants:
            raise NotFound(
                f"Dataset '{dataset}' not found in project {self.project.name} for profile {profile}; "
                f"datasets: {', '.join(grants) or '(none)'}",
                dataset=dataset,
            )
        return grants[dataset]

    def require_write(self, profile: str, dataset: str) -> DatasetAccess:
        """The grant of a dataset the profile may write to; PERMISSION_DENIED if it may only read."""
        grant = self.grant(profile, dataset)
        if not grant.write:
            raise Forbidden(f"profile '{profile}' may read but not write dataset '{dataset}'",
                            dataset=dataset, profile=profile)
        return grant

    def visible(self, profile: str) -> list[str]:
        return list(self.project.profile(profile).datasets)

    def open(self, profile: str, dataset: str) -> Storage:
        """The adapter of a dataset the profile may see."""
        self.grant(profile, dataset)
        return self.storage(dataset)

    def dataset_info(self, profile: str, dataset: str) -> DatasetInfo:
        grant = self.grant(profile, dataset)
        storage = self.storage(dataset)
        stored = storage.stored_schema()
        return DatasetInfo(
            name=dataset,
            destination=storage.destination_config.name,
            destination_type=storage.destination_config.type,
            location=mask(storage.location),  # adapters mask already; this net catches what they miss
            schema_name=stored.schema.name if stored else self.project.datasets[dataset].schema_name,
            schema_version=stored.version if stored else None,
            tables=tuple(storage.table_names()),
            writable=grant.write and storage.accepts_saves,
        )

    def info(self, profile: str, datasets: Sequence[str] | None = None) -> CatalogInfo:
        """The profile's datasets; one that cannot be read right now is listed with its error, never
        taking the others down."""
        names = [d for d in self.visible(profile) if datasets is None or d in datasets]
        return CatalogInfo(self.project.name, profile, tuple(self._dataset_info_or_error(profile, d) for d in names))

    def _dataset_info_or_error(self, profile: str, dataset: str) -> DatasetInfo:
        try:
            return self.dataset_info(profile, dataset)
        except ServiceError as exc:
            error = exc.message
        except Exception as exc:  # noqa: BLE001 - a destination library's error, summed up for the listing
            log.warning("dataset %s cannot be read", dataset, exc_info=True)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            error = f"dataset '{dataset}' cannot be read right now: {first}"
            if is_unreachable(exc):  # the library's text says where the store lives: name it instead
                error = unreachable(self.project.datasets[dataset].destination, dataset).message
        config = self.project.destinations[self.project.datasets[dataset].destination]
        return DatasetInfo(
            name=dataset, destination=config.name, destination_type=config.type,
            location=mask(config.location or config.type), schema_name=self.project.datasets[dataset].schema_name,
            schema_version=None, tables=(), writable=self.grant(profile, dataset).write, error=mask(error),
        )

    def table_schema(self, profile: str, dataset: str, table: str, columns: Sequence[str] | None = None) -> pa.Schema:
        return self.open(profile, dataset).arrow_schema(table, columns)

    def close(self) -> None:
        for storage in self._storages.values():
            storage.close()
