"""Data packages: a dlt project shipped to analysts as a Python package (``flight-share package``).

A data package is a small module with the seed's functions (``access_profile``, ``context``, ``config``,
``catalog``; ``entities`` and ``runner`` say they need the server side). It depends on this client only
— never on dlt or the destinations' drivers — and registers itself in the ``dlt_package`` entry-point
group, like a dlt+ project package, so :func:`packages` can list what is installed::

    >>> import client
    >>> client.packages()
    [DataPackage(name='dlt_example_project', version='0.0.1', ...)]
    >>> client.packages()[0].load().catalog()

The server address is baked into the package (``<NAME>_URL`` overrides it); credentials never are:
see :mod:`client.environment`.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any

from client.catalog import open_catalog
from client.environment import ConnectionSettings, env_prefix, resolve
from client.errors import UnsupportedError

if TYPE_CHECKING:
    from client.catalog import Catalog

ENTRY_POINT_GROUP = "dlt_package"
ENTRY_POINT_NAME = "dlt-project"
PACKAGE_FORMAT = 1


@dataclass(frozen=True)
class DatasetPolicy:
    """What the package's profile may do with one dataset (as the project file said when packaged)."""

    name: str
    destination: str
    destination_type: str
    contract: Any = None  # dlt's contract: a mode, a mapping per entity, or None (evolve)
    write: bool = True

    def __str__(self) -> str:
        access = "read-write" if self.write else "read-only"
        contract = self.contract if self.contract is not None else "evolve (dlt's default)"
        return f"{self.name}@{self.destination} ({self.destination_type}), {access}, contract: {contract}"


@dataclass(frozen=True)
class PackageConfig:
    """A data package's view of its project: no destinations' locations or credentials, only what users see."""

    name: str  # the project's name
    package: str  # the importable module
    description: str | None
    server: str  # the address baked in at packaging time
    profile: str
    datasets: Mapping[str, DatasetPolicy] = field(default_factory=dict)
    built_by: str = ""
    format: int = PACKAGE_FORMAT

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PackageConfig:
        version = d.get("format", PACKAGE_FORMAT)
        if version > PACKAGE_FORMAT:
            raise UnsupportedError(
                f"data package {d.get('package')} was made by a newer flight-share (package format {version}, "
                f"this client reads {PACKAGE_FORMAT}); upgrade flight-share"
            )
        datasets = {name: DatasetPolicy(name=name, **body) for name, body in (d.get("datasets") or {}).items()}
        return cls(d["name"], d["package"], d.get("description"), d["server"], d["profile"], datasets,
                   d.get("built_by", ""), version)

    def __str__(self) -> str:
        lines = [f"Project {self.name} (package {self.package}) for profile {self.profile} at {self.server}"]
        if self.description:
            lines.append(self.description)
        lines += [f"  {policy}" for policy in self.datasets.values()]
        return "\n".join(lines)


@dataclass(frozen=True)
class PackageContext:
    """A data package at run time: where it is installed, its profile, its project view and its server."""

    package: str
    run_dir: str
    profile: str
    project: PackageConfig

    @property
    def env_prefix(self) -> str:
        """Prefix of the package's own environment variables (``DLT_EXAMPLE_PROJECT_URL`` ...)."""
        return env_prefix(self.package)

    def connection(self, **overrides: Any) -> ConnectionSettings:
        """Server address and credentials: arguments, the environment or a token file; never the package."""
        return resolve(package=self.package, package_url=self.project.server, **overrides)

    @property
    def url(self) -> str:
        return self.connection().url

    def catalog(self, **overrides: Any) -> Catalog:
        """Open the catalog on the package's server."""
        return open_catalog(self.connection(**overrides))


def server_side_only(function: str, package: str) -> UnsupportedError:
    """The error of ``entities()`` and ``runner()`` in a data package."""
    return UnsupportedError(
        f"{package}.{function}() needs the project itself: dlt, the sources and the destinations' credentials, "
        f"which this data package does not ship (it reads and writes through the flight-share server). "
        f"Run it where the project lives, or use {package}.catalog() to read tables and save results."
    )


@dataclass(frozen=True)
class DataPackage:
    """An installed package that registered itself in the ``dlt_package`` entry-point group."""

    name: str  # the importable module (entry point value)
    distribution: str
    version: str
    description: str

    def load(self) -> ModuleType:
        """Import the package."""
        return importlib.import_module(self.name)

    def catalog(self) -> Catalog:
        """The package's ``catalog()``."""
        return self.load().catalog()

    def __str__(self) -> str:
        return f"{self.name} {self.version}" + (f": {self.description}" if self.description else "")


def packages() -> list[DataPackage]:
    """The data packages installed in this environment, by name."""
    found: dict[str, DataPackage] = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(ep, "dist", None)
        meta = dist.metadata if dist is not None else {}
        module = ep.value.split(":", 1)[0].strip()
        found.setdefault(module, DataPackage(
            name=module,
            distribution=(meta.get("Name") if meta else None) or module,
            version=(dist.version if dist is not None else "") or "",
            description=(meta.get("Summary") if meta else None) or "",
        ))
    return sorted(found.values(), key=lambda p: p.name)


def package_context(package: str, run_dir: str, profile: str, project: Mapping[str, Any]) -> PackageContext:
    """What a data package's ``context()`` returns."""
    return PackageContext(package, os.path.abspath(run_dir), profile, PackageConfig.from_dict(project))
