"""Is there dlt data where a dataset is said to be? A warning for ``check`` and the server's start, never a failure.

A dataset whose location holds nothing dlt wrote (no file, no ``_dlt_version``, no tables) is served as an
empty dataset: no error ever says the path may be wrong. This looks at local locations only - a duckdb file
or a local filesystem bucket - without creating or locking anything for longer than one look; remote
destinations (buckets with a scheme, warehouses) are left to the first request, which reaches them with
the server's credentials.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import unquote, urlparse

from flight_server.domain.config import ConfigError, DatasetConfig, DestinationConfig, ProjectConfig
from flight_server.domain.masking import Masker

DLT_VERSION_TABLE = "_dlt_version"


def empty_datasets(project: ProjectConfig) -> list[ConfigError]:
    """One warning per dataset whose (local) location holds no dlt data, naming the dataset and the resolved
    location; values from the environment and the secrets files are ``***``."""
    masker = Masker(project.secrets)
    found: list[ConfigError] = []
    for dataset in project.datasets.values():
        destination = project.destinations.get(dataset.destination)
        if destination is None:
            continue
        look = _look(destination, dataset)
        if look is None:
            continue
        location, why = look
        text = (f"dataset '{dataset.name}' (destination '{destination.name}') holds no dlt data at {location}: {why}; "
                "it is served without tables until dlt writes there - is this where the owner's pipelines write?")
        found.append(ConfigError(project.file, f"datasets.{dataset.name}", masker(text)))
    return found


def _look(destination: DestinationConfig, dataset: DatasetConfig) -> tuple[str, str] | None:
    """``(location, what is missing)``, or None when there is dlt data or no way to tell from here."""
    if destination.type == "duckdb":
        return _look_duckdb(destination.location, dataset.name)
    if destination.type == "filesystem":
        return _look_folder(destination.location, dataset.name)
    return None


def _local_path(location: str | None) -> str | None:
    """A local path from a path or a ``file://`` URL; None for anything remote or special."""
    if not location or location.startswith(":") or "{env." in location:
        return None
    if "://" in location or location.startswith("file:"):
        parsed = urlparse(location)
        return unquote(parsed.path) if parsed.scheme == "file" and not parsed.netloc else None
    return location if os.path.isabs(location) else None


def _look_duckdb(location: str | None, dataset: str) -> tuple[str, str] | None:
    path = _local_path(location)
    if path is None:
        return None
    if not os.path.isfile(path):
        return path, "the file does not exist"
    try:
        import duckdb
    except ImportError:
        return None
    try:
        with duckdb.connect(path, read_only=True) as conn:
            rows = conn.execute("SELECT table_schema, table_name FROM information_schema.tables").fetchall()
    except duckdb.Error:  # held by the owner's load, or unreadable: the server says which on the first request
        return None
    tables = {name for schema, name in rows if schema.lower() == dataset.lower()}
    found = {schema for schema, name in rows if name == DLT_VERSION_TABLE and schema.lower() != dataset.lower()}
    # dlt's staging dataset of a merge (<dataset>_staging) is no dataset of its own
    others = sorted(schema for schema in found if not (schema.endswith("_staging") and schema[:-8] in found))
    return _verdict(path, dataset, tables, others, "schema")


def _look_folder(location: str | None, dataset: str) -> tuple[str, str] | None:
    path = _local_path(location)
    if path is None:
        return None
    root = Path(path)
    if not root.is_dir():
        return path, "the folder does not exist"
    folder = root / dataset
    tables = {p.name for p in folder.iterdir() if p.is_dir()} if folder.is_dir() else set()
    if DLT_VERSION_TABLE in tables and not any((folder / DLT_VERSION_TABLE).iterdir()):
        tables.discard(DLT_VERSION_TABLE)  # dlt's folder with no schema version in it
    others = sorted(p.name for p in root.iterdir() if p.name != dataset and (p / DLT_VERSION_TABLE).is_dir())
    return _verdict(path, dataset, tables, others, "folder")


def _verdict(location: str, dataset: str, tables: set[str], others: list[str], kind: str) -> tuple[str, str] | None:
    elsewhere = f" (dlt datasets there: {', '.join(others)})" if others else ""
    if not tables:
        return location, f"no {kind} '{dataset}' in it{elsewhere}"
    if DLT_VERSION_TABLE not in tables:
        return location, f"the {kind} '{dataset}' has no {DLT_VERSION_TABLE} (not loaded by dlt){elsewhere}"
    if not any(not name.startswith("_dlt") for name in tables):
        return location, f"no tables loaded into '{dataset}' yet"
    return None
