"""The saves' journal: what a crash of the server leaves to finish, and which saves a client already made.

A save's load step is several commits at the destination (dlt's data jobs, then its ``_dlt_loads`` record,
then the writer's bookkeeping), and a ``kill -9`` between them left rows whose load id ``_dlt_loads`` did
not know, while the client, which got no answer, sent the save again and stored it twice (issue 22 §4).

So before the load step a save writes an entry here (atomically: a temporary file, fsync, rename) naming
its dataset, its load packages, the pipelines folder that holds them (kept until the save is finished)
and the schema it was checked against; once answered, the entry holds the answer. At the server's start
(and before the next save into the dataset, if the destination was away) an entry without an answer is
finished with dlt's own resume - a package loaded half way is loaded again from where it stopped: jobs
done are skipped, the ``_dlt_loads`` record is written - so the save is wholly there, never half.

Entries are keyed by the client's ``save_id`` with the caller (its user; an anonymous caller by its
fair-share key), profile, dataset and table: natural ids ("daily-2026-12-06") chosen by two users are two
saves. A save sent again by the same caller with the same id gets the first answer and stores nothing - if it
is the same request: the entry carries the request's fingerprint (:func:`fingerprint`: write disposition,
primary key, the upload's Arrow schema; its row count is the entry's ``rows``), and a reused id whose request
differs is refused rather than answered as done (the writer's ``SaveIdReused``). Answered entries are kept
:data:`KEEP_SECONDS` (a client retries within minutes), at most :data:`KEEP_ENTRIES`, holding the answer only;
a save sent without an id (plain pyarrow, Flight SQL ingest) is forgotten once answered.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

log = logging.getLogger("flight_share.saves")

#: the journal's folder, beside the server processes' folders under ``<data_dir>/puts``
SAVES = "saves"
KEEP_SECONDS = 24 * 3600
KEEP_ENTRIES = 10_000


@dataclass
class Entry:
    """One save, from its load step on."""

    key: str
    dataset: str
    table: str
    pipeline_name: str
    folder: str  # the save's pipelines folder: its normalized packages, kept until the save is finished
    load_ids: list[str]
    schema_name: str
    before: dict[str, Any] | None  # the stored schema the upload was checked against (schema, version, hash)
    packaged: list[str]  # the version hashes of the packages' schemas
    rows: int
    bytes: int
    answer: dict[str, Any] | None = None  # the LoadInfo answered (JSON); None while unfinished
    # what the client asked for (fingerprint()); None in entries written before it was kept
    request: dict[str, Any] | None = None
    attempts: int = 0  # recoveries tried
    at: float = field(default_factory=time.time)
    process: list[Any] = field(default_factory=lambda: list(this_process()))  # who runs it: host, pid, start


def this_process() -> tuple[str, int, str]:
    """This process, told apart from a later one with the same pid (its start time in ``/proc``)."""
    return socket.gethostname(), os.getpid(), _started(os.getpid())


def _started(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def running_elsewhere(entry: Entry) -> bool:
    """True while the process that wrote ``entry`` may still be running it - another replica sharing the
    data folder, or this process: only a dead process's saves are recovered. A process on another host
    cannot be checked from here: its saves are left to that host."""
    host, pid, started = entry.process
    if host != socket.gethostname():
        return True
    if pid == os.getpid() and started == _started(os.getpid()):
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return bool(_started(int(pid)) == started)


def fingerprint(write_disposition: str | None, primary_key: Sequence[str], schema: pa.Schema) -> dict[str, Any]:
    """What a save asked for, known before any row is read: the write disposition and primary key as sent,
    and a hash of the upload's Arrow schema (names, types, nullability; no metadata). The row count is
    compared once the upload was read (``Entry.rows``)."""
    fields = [[f.name, str(f.type), f.nullable] for f in schema]
    return {"write_disposition": write_disposition, "primary_key": list(primary_key),
            "schema": hashlib.sha256(json.dumps(fields).encode()).hexdigest()[:32]}


_PARTS = {"write_disposition": "write disposition", "primary_key": "primary key", "schema": "columns"}


def differences(entry: Entry, request: dict[str, Any], rows: int | None = None) -> list[str]:
    """What of ``request`` (and its row count, once read) differs from the save ``entry`` recorded; empty for
    the same save, or for an entry that recorded no request."""
    if entry.request is None:
        return []
    differ = [_PARTS[k] for k in _PARTS if entry.request.get(k) != request.get(k)]
    if rows is not None and rows != entry.rows:
        differ.append("row count")
    return differ


class SaveJournal:
    """Entries as one JSON file each under ``root`` (the server's data folder)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._lock = threading.Lock()  # short: file names and renames only (writer.py, lock rank 3)

    @staticmethod
    def key(user: str, profile: str, dataset: str, table: str, save_id: str | None) -> str:
        """The entry's key: the client's id within its caller, profile, dataset and table (another user or
        profile cannot reach the answer; an id reused for another table is another save), or a fresh one
        without an id."""
        if not save_id:
            return uuid.uuid4().hex
        return hashlib.sha256(json.dumps([user, profile, dataset, table, save_id]).encode()).hexdigest()[:40]

    def _path(self, key: str) -> Path:
        return self.root / f"{key}.json"

    def write(self, entry: Entry) -> None:
        """Store the entry durably (it is on disk when this returns)."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self._path(entry.key)
        temporary = path.with_suffix(f".{uuid.uuid4().hex}.tmp")
        with temporary.open("w") as file:
            json.dump(asdict(entry), file)
            file.flush()
            os.fsync(file.fileno())
        with self._lock:
            os.replace(temporary, path)
        directory = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    def get(self, key: str) -> Entry | None:
        try:
            return Entry(**json.loads(self._path(key).read_text()))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError):  # a torn or foreign file: not an entry
            log.warning("ignoring the unreadable save journal entry %s", key)
            return None

    @contextlib.contextmanager
    def claim(self, key: str) -> Iterator[bool]:
        """An exclusive hold of an entry for its recovery (False: another process recovers it now)."""
        try:
            file = self._path(key).open("r")
        except FileNotFoundError:
            yield False
            return
        with file:
            try:
                fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                yield False
                return
            yield True

    def drop(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def entries(self) -> list[Entry]:
        if not self.root.is_dir():
            return []
        found = [self.get(p.stem) for p in sorted(self.root.glob("*.json"))]
        return [e for e in found if e is not None]

    def unfinished(self, dataset: str | None = None) -> list[Entry]:
        """Entries of saves a crash interrupted (oldest first), of one dataset or all."""
        return sorted((e for e in self.entries() if e.answer is None and dataset in (None, e.dataset)),
                      key=lambda e: e.at)

    def prune(self) -> None:
        """Forget answers older than KEEP_SECONDS, and the oldest beyond KEEP_ENTRIES."""
        answered = sorted((e for e in self.entries() if e.answer is not None), key=lambda e: e.at)
        cutoff = time.time() - KEEP_SECONDS
        for index, entry in enumerate(answered):
            if entry.at < cutoff or index < len(answered) - KEEP_ENTRIES:
                self.drop(entry.key)
        for stray in self.root.glob("*.tmp") if self.root.is_dir() else ():
            stray.unlink(missing_ok=True)  # a write the crash interrupted: its entry was never made
