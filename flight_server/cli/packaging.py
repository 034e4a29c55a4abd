"""``flight-share package``: write a dlt project as an installable data package for analysts.

The package is what step 1 of dlt+'s "secure data access" workflow describes — ``pyproject.toml`` with an
entry point in the ``dlt_package`` group and an ``__init__.py`` with ``access_profile()``, ``context()``,
``config()``, ``catalog()``, ``entities()`` and ``runner()`` — except that it depends on the flight-share
client only. It carries the project's name, description, the server address and, per dataset the profile
may see, the destination's name and type and the contract; never a destination's location or a credential.
"""

from __future__ import annotations

import keyword
import pprint
import re
import shutil
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from client import __version__
from client.data_packages import ENTRY_POINT_GROUP, ENTRY_POINT_NAME, PACKAGE_FORMAT
from client.environment import env_prefix
from flight_server.domain.config import ConfigError, ProjectConfig

CLIENT_DISTRIBUTION = "flight-share"
URL_SCHEMES = ("grpc://", "grpc+tcp://", "grpc+tls://")
_VERSION = re.compile(r"^\d+(\.\d+)*([abc]|rc)?\d*(\.post\d+)?(\.dev\d+)?$")
_RESERVED = {"client", "flight_server", "tests", "dlt", "dlt_plus"}
_WILDCARD_HOSTS = {"0.0.0.0", "::", "[::]", ""}


class PackagingError(ValueError):
    """A package that cannot be written as asked; the message says what to change."""


@dataclass(frozen=True)
class PackageSpec:
    """What to write: every choice of ``flight-share package`` after defaults are filled in."""

    project: ProjectConfig
    name: str
    version: str
    server: str
    profile: str
    requires: str


def client_version() -> str | None:
    """This flight-share's version, or None when it runs from a checkout that is not installed."""
    return None if __version__.endswith("+unknown") else __version__


def client_requirement() -> str:
    """``flight-share>=<this version>``, or unpinned when this checkout is not installed."""
    version = client_version()
    return f"{CLIENT_DISTRIBUTION}>={version}" if version else CLIENT_DISTRIBUTION


def make_spec(project: ProjectConfig, name: str | None = None, version: str = "0.0.1", server: str | None = None,
              profile: str | None = None, requires: str | None = None) -> PackageSpec:
    """Fill in defaults from the project file and check every choice."""
    name = name or project.name
    if not name.isidentifier() or keyword.iskeyword(name) or not name.isascii():
        raise PackagingError(f"package name '{name}' is not an importable Python name (letters, digits and _)")
    if name in _RESERVED:
        raise PackagingError(f"package name '{name}' would shadow the module '{name}'; choose another --name")
    if not _VERSION.match(version):
        raise PackagingError(f"version '{version}' is not a Python package version like 0.0.1 or 1.2rc1")
    if server is None:
        host = project.server.host
        if host in _WILDCARD_HOSTS:
            raise PackagingError(
                f"the project's server listens on '{host}', which is no address for analysts to connect to; "
                "pass --server grpc+tls://HOST:PORT"
            )
        server = f"grpc://{host}:{project.server.port}"
    if not server.startswith(URL_SCHEMES):
        raise PackagingError(f"server '{server}' must start with {', '.join(URL_SCHEMES)}")
    profile = profile or project.server.profile or "access"
    try:
        project.profile(profile)
    except ConfigError as exc:
        raise PackagingError(str(exc)) from None
    return PackageSpec(project, name, version, server, profile, requires or client_requirement())


def project_view(spec: PackageSpec) -> dict[str, Any]:
    """The package's ``config()``: what the profile's users may know about the project."""
    project = spec.project
    datasets = {}
    for name, grant in project.profile(spec.profile).datasets.items():
        destination = project.destinations[project.datasets[name].destination]
        contract = dict(grant.contract) if isinstance(grant.contract, dict) else grant.contract
        datasets[name] = {"destination": destination.name, "destination_type": destination.type,
                          "contract": contract, "write": grant.write}
    return {
        "format": PACKAGE_FORMAT,
        "name": project.name,
        "package": spec.name,
        "description": summary(project.description),
        "server": spec.server,
        "profile": spec.profile,
        "datasets": datasets,
        "built_by": f"flight-share {client_version() or '(checkout)'}",
    }


def summary(text: str | None) -> str | None:
    """One line (package metadata's Summary), no control characters."""
    if not text:
        return None
    return " ".join("".join(c if c.isprintable() else " " for c in text).split()) or None


def write_package(spec: PackageSpec, out: Path, force: bool = False) -> list[Path]:
    """Write the package into ``out``; refuses a folder with other content unless ``force``."""
    out = out.resolve()
    if out.exists() and not out.is_dir():
        raise PackagingError(f"{out} exists and is not a folder")
    if out.exists() and any(out.iterdir()):
        if not force:
            raise PackagingError(f"{out} is not empty; choose another --out or pass --force to overwrite")
        for stale in (out / spec.name, out / "build", *out.glob("*.egg-info")):
            if stale.is_dir():
                shutil.rmtree(stale)
    module = out / spec.name
    module.mkdir(parents=True, exist_ok=True)
    files = {
        out / "pyproject.toml": _pyproject(spec),
        out / "README.md": _readme(spec),
        module / "__init__.py": _init(spec),
        module / "_project.py": _project_module(spec),
        out / ".gitignore": "build/\ndist/\n*.egg-info/\n__pycache__/\n",
    }
    for path, text in files.items():
        path.write_text(text)
    return list(files)


def _toml(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _pyproject(spec: PackageSpec) -> str:
    description = summary(spec.project.description) or f"Datasets of the dlt project {spec.project.name}"
    return textwrap.dedent(f"""\
        # Written by `flight-share package`: a data package for analysts. It depends on the flight-share
        # client only (pyarrow, pandas), not on dlt or the destinations' drivers.
        [build-system]
        requires = ["setuptools>=68"]
        build-backend = "setuptools.build_meta"

        [project]
        name = {_toml(spec.name)}
        version = {_toml(spec.version)}
        description = {_toml(description)}
        readme = "README.md"
        requires-python = ">=3.10"
        dependencies = [
            {_toml(spec.requires)},
        ]

        [project.entry-points.{ENTRY_POINT_GROUP}]
        {ENTRY_POINT_NAME} = {_toml(spec.name)}

        [tool.setuptools]
        packages = [{_toml(spec.name)}]
        """)


def _docstring(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"""', '\\"\\"\\"')


def _first_dataset(spec: PackageSpec) -> str:
    return next(iter(spec.project.profile(spec.profile).datasets), "dataset_name")


def _init(spec: PackageSpec) -> str:
    name, prefix = spec.name, env_prefix(spec.name)
    description = summary(spec.project.description) or f"The datasets of the dlt project {spec.project.name}."
    dataset = _first_dataset(spec)
    doc = _docstring(textwrap.dedent(f"""\
        {description}

        A flight-share data package: the datasets of project {spec.project.name} for profile "{spec.profile}",
        served at {spec.server}.

        >>> import {name}
        >>>
        >>> print({name}.catalog()) # list datasets
        >>> print({name}.catalog().{dataset}) # lists tables in dataset
        >>> df_ = {name}.catalog().{dataset}.table_name.df() # reads table

        {prefix}_URL overrides the server address. Credentials are never part of the package: set
        {prefix}_TOKEN or FLIGHT_SHARE_TOKEN (or ..._USERNAME and ..._PASSWORD), or put a token into
        a file named by {prefix}_TOKEN_FILE or FLIGHT_SHARE_TOKEN_FILE, or ~/.config/flight-share/tokens/{name}.
        """))
    return f'''"""{doc}"""

import os

from client import Catalog
from client.data_packages import PackageConfig, PackageContext, package_context, server_side_only

from {name}._project import PROJECT

__all__ = ["access_profile", "context", "config", "entities", "runner", "catalog"]


def access_profile() -> str:
    """The profile assigned to users who import this package (the server decides what they may do)."""
    return {spec.profile!r}


def context() -> PackageContext:
    """Returns the context of this package: its directory, profile, project configuration and server."""
    return package_context(__name__, os.path.dirname(__file__), access_profile(), PROJECT)


def config() -> PackageConfig:
    """Returns the project configuration as this package's users see it: datasets, contracts, server."""
    return context().project


def entities():
    """Creating sources, destinations and pipelines needs the project itself: not available here."""
    raise server_side_only("entities", __name__)


def runner():
    """Running the project's pipelines needs the project itself: not available here."""
    raise server_side_only("runner", __name__)


def catalog() -> Catalog:
    """Returns a catalogue with available datasets, which can be read and written to"""
    return context().catalog()
'''


def _project_module(spec: PackageSpec) -> str:
    body = pprint.pformat(project_view(spec), indent=1, width=100, sort_dicts=False)
    return ('"""The project as this package\'s users see it, written by `flight-share package`. No secrets."""\n\n'
            f"PROJECT = {body}\n")


def _readme(spec: PackageSpec) -> str:
    name, prefix = spec.name, env_prefix(spec.name)
    description = summary(spec.project.description) or f"The datasets of the dlt project {spec.project.name}."
    grants = spec.project.profile(spec.profile).datasets
    datasets = "\n".join(f"- `{d}`" + ("" if g.write else " (read-only)") for d, g in grants.items()) or "- (none)"
    dataset = _first_dataset(spec)
    return f"""# {name}

{description}

Datasets of the dlt project `{spec.project.name}`, shared by a flight-share server at `{spec.server}`
for profile `{spec.profile}`:

{datasets}

```python
import {name} as dlt_project

my_catalog = dlt_project.catalog()       # the datasets and their tables
print(my_catalog)
df = my_catalog.{dataset}["table_name"].df()   # pandas; .arrow() for Arrow, .sql("SELECT ...") on a dataset
print(my_catalog.{dataset}.save(df, table_name="my_results"))   # share results back, under the contract
```

Set `{prefix}_URL` to use another server. Credentials are never part of this package: set `{prefix}_TOKEN`
or `FLIGHT_SHARE_TOKEN` (or `..._USERNAME` and `..._PASSWORD`), or put a token into the file named by
`{prefix}_TOKEN_FILE` or `FLIGHT_SHARE_TOKEN_FILE`, or into `~/.config/flight-share/tokens/{name}`.
"""
