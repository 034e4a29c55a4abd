"""dlt+ project files, served as they are: a ``dlt.yml`` in dlt+'s format read into flight-share's model.

What is followed (dlt+ 0.17's project loader, and its documentation):

- sections ``project``, ``sources``, ``destinations``, ``datasets``, ``pipelines``, ``profiles``, ``runtime``,
  ``caches``, ``transformations``; flight-share adds ``users`` and ``server``. Unknown keys are warnings.
- a profile's section is deep-merged over the project (any section, destinations and credentials
  included). Profiles ``access`` and ``tests`` and the default profile (``project.default_profile``,
  ``dev``) exist without being declared. The server reads the project as the **access** profile sees it
  (the profile dlt+'s data packages use), and every profile's own ``datasets.<name>.contract`` is that
  profile's contract on the dataset; every profile sees every dataset, as in dlt+'s catalog
  (``write: false`` under a profile's dataset makes it read-only for that profile).
- project settings: ``name`` (default: the project folder's name), ``project_dir`` (the file's folder),
  ``data_dir`` (``<project_dir>/_data/<profile>``), ``local_dir`` (``<data_dir>/local``); every string may
  hold ``{project_dir}``, ``{data_dir}``, ``{local_dir}``, ``{name}``, ``{current_profile}`` and
  ``{env.NAME}``. An unknown placeholder, or an unset variable, is a problem (dlt+ leaves the text or an
  empty string in place, which only fails later).
- a destination is ``type`` (or, without one, its name is the type) plus dlt's configuration for
  ``destination.<name>``: ``credentials`` (duckdb: a path, or a mapping with ``database``), ``bucket_url``
  (filesystem). ``type: delta`` is a filesystem destination holding Delta tables. Settings missing from the
  file come from ``.dlt/<profile>.secrets.toml``, then ``.dlt/secrets.toml``, then ``.dlt/config.toml``
  (sections ``[destination.<name>]``), as dlt+ layers them; values read from those files count as secrets.
- **where local data is**: dlt resolves a relative duckdb database (none: ``<destination name>.duckdb``) and
  a relative local ``bucket_url`` against its run context's ``local_dir`` (``WithLocalFiles.make_location``),
  and dlt+ sets ``local_dir`` per profile. The served data is what the owner's pipelines wrote, with the
  owner's profile (:func:`owner_profile`: dlt's pinned profile, else ``project.default_profile``, else
  ``dev``), so such a value - with its placeholders - is read in the owner's run context: the file as that
  profile sees it, then its settings files. Only a location the access profile sets itself (its own
  ``destinations`` section or ``.dlt/access.secrets.toml``) is read in the access profile's run context, as
  dlt+ reads it for the data packages. Everything else (credentials, contracts) is the access profile's.
- a dataset is ``destination: [names]`` and an optional ``contract``; a pipeline's ``dataset_name`` is a
  dataset on the pipeline's destination too.

The result is the same plain mapping a flight-share (``format_version: 1``) file holds, so one validation
(``flight_server.domain.config``) reads both.
"""

from __future__ import annotations

import copy
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

DLT_PLUS_SECTIONS = ("project", "sources", "destinations", "datasets", "pipelines", "profiles", "runtime", "caches",
                     "transformations")
FLIGHT_SHARE_SECTIONS = ("users", "server")
#: dlt+ sections flight-share reads nothing from: reported once each, so no key goes unmentioned
RUN_ONLY_SECTIONS = ("sources", "runtime", "caches", "transformations")
SERVED_PROFILE = "access"
IMPLICIT_PROFILES = ("access", "tests")
DEFAULT_PROFILE = "dev"
PIN_FILE = "profile-name"  # dlt's pinned profile, in the project's .dlt folder
PROJECT_SETTINGS = ("name", "description", "default_profile", "project_dir", "data_dir", "local_dir",
                    "allow_undefined_entities")
# dlt+'s destination types that are stored as another dlt type; every other type is dlt's own
STORED_AS = {"delta": "filesystem"}
# keys of a destination flight-share reads; the rest of dlt's settings are for dlt's own loads
_DESTINATION_KEYS = ("type", "credentials", "bucket_url", "location", "table_format")
_DATASET_KEYS = ("destination", "contract", "schema_name")
_GRANT_KEYS = ("contract", "write", "destination", "schema_name")
_FIELD = re.compile(r"\{([^{}]*)\}")


def is_dlt_plus(raw: Mapping[str, Any]) -> bool:
    """A file without flight-share's own ``format_version`` is read as dlt+ writes it."""
    return "format_version" not in raw


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``override`` merged into a copy of ``base``: mappings key by key, anything else replaced (dlt+'s profile
    merge; dlt's own ``update_dict_nested``, on copies since it merges in place and shares values)."""
    # imported here: the client-side CLI commands load the project file and must not pay for importing dlt
    from dlt.common.utils import update_dict_nested

    return update_dict_nested(copy.deepcopy(dict(base)), copy.deepcopy(dict(override)))


class Interpolator:
    """``{setting}`` and ``{env.NAME}`` in strings (dlt+'s placeholders); ``{env.NAME}`` is left for the
    project reader, which substitutes it and remembers secret values."""

    def __init__(self, settings: Mapping[str, str], report: Any) -> None:
        self.settings = settings
        self.report = report

    def __call__(self, value: Any, key: str) -> Any:
        if isinstance(value, dict):
            return {k: self(v, f"{key}.{k}") for k, v in value.items()}
        if isinstance(value, list):
            return [self(v, f"{key}[{i}]") for i, v in enumerate(value)]
        if not isinstance(value, str) or "{" not in value:
            return value

        def repl(m: re.Match[str]) -> str:
            name = m.group(1)
            if name.startswith("env."):
                return m.group(0)
            if name in self.settings:
                return self.settings[name]
            allowed = ", ".join("{" + s + "}" for s in (*self.settings, "env.NAME"))
            self.report(key, f"unknown placeholder '{{{name}}}'; allowed: {allowed}")
            return m.group(0)

        return _FIELD.sub(repl, value)


def _toml(path: Path, report: Any) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        report(str(path), f"cannot read {path.name}: {exc}")
        return {}


def _settings_files(project_dir: Path, profile: str, report: Any) -> tuple[list[dict[str, Any]], set[str]]:
    """dlt's settings files of the project, highest precedence first, and the secret values they hold."""
    folder = project_dir / ".dlt"
    secret_docs = [_toml(folder / f"{profile}.secrets.toml", report), _toml(folder / "secrets.toml", report)]
    secrets: set[str] = set()

    def collect(value: Any) -> None:
        if isinstance(value, dict):
            for v in value.values():
                collect(v)
        elif isinstance(value, str):
            secrets.add(value)

    for doc in secret_docs:
        collect(doc)
    return [*secret_docs, _toml(folder / "config.toml", report)], secrets


def _from_settings(docs: list[dict[str, Any]], name: str, key: str) -> Any:
    """``destination.<name>.<key>`` from the first settings file that has it."""
    for doc in docs:
        section = (doc.get("destination") or {}).get(name) or {}
        if isinstance(section, dict) and key in section:
            return section[key]
    return None


def owner_profile(project_dir: Path, default_profile: str = DEFAULT_PROFILE) -> str:
    """The profile the owner's pipelines run with: the one pinned in ``.dlt/profile-name`` (dlt's pin file,
    ``dlt/_workspace/profile.py``), else the project's ``default_profile`` (``dev``)."""
    try:
        pinned = (project_dir / ".dlt" / PIN_FILE).read_text().strip().splitlines()
    except OSError:
        pinned = []
    return pinned[0].strip() if pinned and pinned[0].strip() else default_profile


class _RunContext:
    """One profile's run context as dlt+ builds it: ``data_dir`` (``<project>/_data/<profile>``), ``local_dir``
    (``<data_dir>/local``, where dlt puts relative duckdb files and local buckets), the placeholders, and the
    settings files (``.dlt/<profile>.secrets.toml``, ``.dlt/secrets.toml``, ``.dlt/config.toml``)."""

    def __init__(self, profile: str, project_dir: str, name: str, default_profile: str,
                 project: Mapping[str, Any], report: Any) -> None:
        self.profile = profile
        self.settings = {"project_dir": project_dir, "name": name, "current_profile": profile,
                         "default_profile": default_profile}
        self.interpolate = Interpolator(self.settings, report)
        self.settings["data_dir"] = str(Path(project_dir, self.interpolate(
            project.get("data_dir") or os.path.join("_data", profile), "project.data_dir")))
        self.settings["local_dir"] = str(Path(project_dir, self.interpolate(
            project.get("local_dir") or os.path.join(self.settings["data_dir"], "local"), "project.local_dir")))
        self.docs, self.secrets = _settings_files(Path(project_dir), profile, report)


class _Located:
    """Where a destination's location setting (duckdb database, ``bucket_url``) comes from, and so in which
    run context dlt resolves it: a value the served (access) profile sets itself is read as dlt+ reads it for
    that profile; any other value as the owner's pipelines read it, with the owner's profile, since the
    served data is what they wrote."""

    def __init__(self, access_override: Any, owner_body: Any, access: _RunContext, owner: _RunContext) -> None:
        self.access_override = access_override if isinstance(access_override, dict) else {}
        self.owner_body = owner_body if isinstance(owner_body, dict) else {}
        self.access = access
        self.owner = owner

    def find(self, name: str, pick: Callable[[Mapping[str, Any]], Any]) -> tuple[Any, _RunContext]:
        """``pick(settings of the destination)``, first found: the access profile's own section, the file as
        the owner's profile sees it, ``.dlt/access.secrets.toml``, then the owner's settings files."""
        sources = [(self.access_override, self.access), (self.owner_body, self.owner),
                   (_section(self.access.docs[0], name), self.access),
                   *((_section(doc, name), self.owner) for doc in self.owner.docs)]
        for body, context in sources:
            value = pick(body)
            if value is not None:
                return value, context
        return None, self.owner


def _section(doc: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    section = (doc.get("destination") or {}).get(name) if isinstance(doc.get("destination"), dict) else None
    return section if isinstance(section, dict) else {}


def to_flight_share(raw: dict[str, Any], file: Path, report: Any, warn: Any, secrets: set[str]) -> dict[str, Any]:
    """A dlt+ project file as the mapping of a flight-share project file (see the module docstring).

    ``report(key, problem)`` records a problem, ``warn(key, text)`` a warning; values read from the
    secrets files are added to ``secrets``.
    """
    report = _once(report)  # the served and the owner's run contexts read the same settings: said once
    for key in raw:
        if key not in DLT_PLUS_SECTIONS + FLIGHT_SHARE_SECTIONS:
            warn(str(key), f"unknown section '{key}' (dlt+ sections: {', '.join(DLT_PLUS_SECTIONS)}; "
                           f"flight-share's: {', '.join(FLIGHT_SHARE_SECTIONS)})")
    for key in RUN_ONLY_SECTIONS:
        if raw.get(key):
            warn(key, f"not used by flight-share: it serves the datasets; '{key}' is for dlt+'s own runs")
    raw_profiles = raw.get("profiles") or {}
    if not isinstance(raw_profiles, dict):
        report("profiles", "must be a mapping of profile names")
        raw_profiles = {}
    project = raw.get("project") or {}
    if not isinstance(project, dict):
        report("project", "must be a mapping")
        project = {}
    default_profile = project.get("default_profile") or DEFAULT_PROFILE
    profile_names = [*raw_profiles, *(p for p in (*IMPLICIT_PROFILES, default_profile) if p not in raw_profiles)]

    # the project as the served profile sees it: its overrides deep-merged over the whole file
    base = {k: v for k, v in raw.items() if k != "profiles"}
    served = deep_merge(base, raw_profiles.get(SERVED_PROFILE) or {})
    project = served.get("project") or {}
    for key in project:
        if key not in PROJECT_SETTINGS:
            warn(f"project.{key}", f"unknown project setting '{key}'; known: {', '.join(PROJECT_SETTINGS)}")
    project_dir = str(Path(project.get("project_dir") or file.parent).resolve())
    # the folder's name, as a name flight-share (and Flight SQL's catalog) accepts: "my-project" -> "my_project"
    name = project.get("name") or re.sub(r"\W", "_", Path(project_dir).name).lstrip("0123456789") or "project"
    owner = owner_profile(Path(project_dir), default_profile)
    owner_view = deep_merge(base, raw_profiles.get(owner) or {}) if owner != SERVED_PROFILE else served
    contexts = {p: _RunContext(p, project_dir, name, default_profile, view.get("project") or {}, report)
                for p, view in ((SERVED_PROFILE, served), (owner, owner_view))}
    for p in contexts:
        secrets.update(contexts[p].secrets)

    access_overrides = _mapping((raw_profiles.get(SERVED_PROFILE) or {}).get("destinations"), "destinations", report)
    raw_owner_destinations = owner_view.get("destinations")
    owner_destinations: dict[str, Any] = raw_owner_destinations if isinstance(raw_owner_destinations, dict) else {}
    destinations = {}
    for d_name, body in _mapping(served.get("destinations"), "destinations", report).items():
        located = _Located(access_overrides.get(d_name), owner_destinations.get(d_name),
                           contexts[SERVED_PROFILE], contexts[owner])
        destinations[d_name] = _destination(d_name, body, located, report, warn)
    datasets: dict[str, Any] = {}
    for ds_name, body in _mapping(served.get("datasets"), "datasets", report).items():
        body = _mapping(body, f"datasets.{ds_name}", report)
        for key in body:
            if key not in _DATASET_KEYS:
                warn(f"datasets.{ds_name}.{key}", f"unknown key '{key}'; known: {', '.join(_DATASET_KEYS)}")
        datasets[ds_name] = {k: body[k] for k in ("destination", "schema_name") if k in body}
        if "destination" not in body:
            datasets[ds_name]["destination"] = _pipeline_destinations(served, ds_name)
    for p_name, pipeline in _mapping(served.get("pipelines"), "pipelines", report).items():
        pipeline = _mapping(pipeline, f"pipelines.{p_name}", report)
        p_dataset, dest = pipeline.get("dataset_name"), pipeline.get("destination")
        if isinstance(p_dataset, str) and p_dataset and p_dataset not in datasets and isinstance(dest, str):
            datasets[p_dataset] = {"destination": [dest]}  # named only by a pipeline: a dataset too

    profiles: dict[str, Any] = {}
    for p_name in profile_names:
        override = raw_profiles.get(p_name) or {}
        if not isinstance(override, dict):
            report(f"profiles.{p_name}", "must be a mapping")
            override = {}
        merged = deep_merge(_mapping(raw.get("datasets"), "datasets", report), override.get("datasets") or {})
        grants: dict[str, Any] = {}
        for ds_name in datasets:
            body = merged.get(ds_name) or {}
            if not isinstance(body, dict):
                continue  # reported with the dataset
            for key in body:
                if key not in _GRANT_KEYS and key not in _DATASET_KEYS:
                    warn(f"profiles.{p_name}.datasets.{ds_name}.{key}", f"unknown key '{key}'")
            grants[ds_name] = {k: body[k] for k in ("contract", "write") if k in body}
        for ds_name in (override.get("datasets") or {}):
            if ds_name not in datasets:
                report(f"profiles.{p_name}.datasets.{ds_name}",
                       f"dataset '{ds_name}' is not defined; defined: {', '.join(sorted(datasets)) or '(none)'}")
        profiles[p_name] = {"datasets": grants}

    return {
        "project": {"name": name, **({"description": project["description"]} if "description" in project else {})},
        "destinations": destinations,
        "datasets": datasets,
        "profiles": profiles,
        **{k: served[k] for k in FLIGHT_SHARE_SECTIONS if k in served},
    }


def _once(report: Any) -> Any:
    seen: set[tuple[str, str]] = set()

    def once(key: str, problem: str) -> None:
        if (key, problem) not in seen:
            seen.add((key, problem))
            report(key, problem)
    return once


def _mapping(value: Any, key: str, report: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        report(key, f"must be a mapping, got {type(value).__name__}")
        return {}
    return value


def _pipeline_destinations(served: Mapping[str, Any], dataset: str) -> list[str]:
    """The destinations of the pipelines that load a dataset (dlt+ infers a dataset's destination so)."""
    found = []
    for pipeline in (served.get("pipelines") or {}).values():
        if isinstance(pipeline, dict) and pipeline.get("dataset_name") == dataset and isinstance(pipeline.get("destination"), str):
            found.append(pipeline["destination"])
    return found


def _database(credentials: Any) -> Any:
    """The duckdb database path in dlt's ``credentials`` (a path, or a mapping with ``database``)."""
    return credentials.get("database") if isinstance(credentials, dict) else credentials


def _destination(name: str, body: Any, located: _Located, report: Any, warn: Any) -> dict[str, Any]:
    key = f"destinations.{name}"
    body = _mapping(body, key, report)
    body = located.access.interpolate(body, key)
    dlt_type = body.get("type") or name
    kind = STORED_AS.get(dlt_type, dlt_type)  # the project reader reports a type it does not serve
    for k in body:
        if k not in _DESTINATION_KEYS:
            warn(f"{key}.{k}", f"'{k}' is a setting of dlt's loads into this destination; flight-share does not use it")
    credentials = body.get("credentials")
    if credentials is None:
        credentials = _from_settings(located.access.docs, name, "credentials")
    out: dict[str, Any] = {"type": kind}
    if dlt_type == "delta":
        out["table_format"] = "delta"
    elif "table_format" in body:
        out["table_format"] = body["table_format"]
    if kind == "duckdb":
        if isinstance(credentials, dict):
            for k in credentials:
                if k != "database":
                    warn(f"{key}.credentials.{k}", f"'{k}' is a duckdb connection setting of dlt's loads; flight-share does not use it")
        if "location" in body:  # flight-share's own key (relative to the project folder)
            location = body["location"]
            if isinstance(location, str) and not os.path.isabs(location) and "{env." not in location:
                location = str(Path(located.access.settings["project_dir"], location))
        else:  # dlt's: <local_dir>/<destination name>.duckdb by default, relative paths under local_dir
            database, context = located.find(name, lambda b: _database(b.get("credentials")))
            database = context.interpolate(database, f"{key}.credentials")
            location = database
            if isinstance(database, str) and database.startswith(":"):  # dlt's :pipeline:, :memory:, :external:
                report(f"{key}.credentials", f"'{database}' names no file flight-share can find (':pipeline:' is a "
                                             "pipeline's working folder); give the database's path")
            elif not (isinstance(database, str) and ("://" in database or "{env." in database)):
                location = dlt_location("duckdb", database or None, name, context.settings["local_dir"])
        out["location"] = location
    elif kind == "filesystem":
        if "location" in body and "bucket_url" not in body:  # flight-share's own key (relative to the project folder)
            bucket_url = body["location"]
            if isinstance(bucket_url, str) and "://" not in bucket_url and not os.path.isabs(bucket_url) and "{env." not in bucket_url:
                bucket_url = str(Path(located.access.settings["project_dir"], bucket_url))
        else:
            bucket_url, context = located.find(name, lambda b: b.get("bucket_url"))
            bucket_url = context.interpolate(bucket_url, f"{key}.bucket_url")
            if isinstance(bucket_url, str) and bucket_url and "{env." not in bucket_url:
                bucket_url = dlt_location("filesystem", bucket_url, name, context.settings["local_dir"])
        if bucket_url is not None:
            out["bucket_url"] = bucket_url
        if credentials is not None:
            out["credentials"] = credentials
    else:
        if credentials is not None:
            out["credentials"] = credentials
    return out


def dlt_location(kind: str, configured: str | None, destination_name: str, local_dir: str) -> str:
    """A duckdb database path or a local filesystem ``bucket_url`` as dlt resolves it in a run context whose
    ``local_dir`` is ``local_dir``: absolute stays, relative goes under ``local_dir``; a bucket URL with a
    scheme (``s3://``, an absolute ``file://``) is returned as given."""
    if kind == "duckdb":
        return _duckdb_location(configured, destination_name, local_dir)
    if configured is None:  # the one caller passes the bucket_url it found
        raise ValueError(f"a {kind} destination has no bucket_url to locate")
    return _bucket_location(configured, destination_name, local_dir)


def _duckdb_location(configured: str | None, destination_name: str, local_dir: str) -> str:
    try:  # dlt's own resolution; imported here so that the client-only command line never imports dlt
        from dlt.common.storages.configuration import WithLocalFiles
        from dlt.destinations.impl.duckdb.configuration import DUCK_DB_NAME_PAT
    except ImportError:  # without the server's dependencies (`flight-share package`): dlt's rule, spelled out
        return configured if configured and os.path.isabs(configured) else os.path.join(local_dir, configured or f"{destination_name}.duckdb")
    # DuckDbClientConfiguration.on_resolved -> WithLocalFiles.make_location(database, "%s.duckdb"), which
    # takes an unset database (None) as dlt's own configuration passes it, though its annotation says str
    files = WithLocalFiles()
    files.local_dir, files.destination_name = local_dir, destination_name
    return files.make_location(configured, DUCK_DB_NAME_PAT)  # type: ignore[arg-type]


def _bucket_location(configured: str, destination_name: str, local_dir: str) -> str:
    try:  # as above
        from dlt.common.storages.configuration import FilesystemConfigurationWithLocalFiles
    except ImportError:
        if "://" in configured or os.path.isabs(configured):
            return configured
        return os.path.join(local_dir, configured.removeprefix("file:"))
    # FilesystemDestinationClientConfiguration -> FilesystemConfigurationWithLocalFiles.normalize_bucket_url:
    # a local path without a scheme (or a relative file: URL) is moved under local_dir, then made a file:// URL
    config = FilesystemConfigurationWithLocalFiles(bucket_url=configured)
    config.local_dir, config.destination_name = local_dir, destination_name
    config.normalize_bucket_url()
    if config.bucket_url == configured or not config.bucket_url.startswith("file:"):
        return configured  # a remote bucket, or a local one dlt left as it is (absolute)
    relocated = config.make_local_path(config.bucket_url)
    absolute = config.make_local_path(configured) if configured.startswith("file:") else configured
    return configured if relocated == os.path.normpath(absolute) else relocated
