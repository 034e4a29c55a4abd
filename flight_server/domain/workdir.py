"""The puts folder: where each save's dlt pipeline works, one folder per server process.

A save works in ``<data_dir>/puts/<process>/save_<table>_pipeline-<id>`` and removes its folder when it
ends; a server that crashed (``kill -9``, the machine) leaves its folders behind (issue 22). Each server
process holds an exclusive ``flock`` on ``<process>/.lock`` for as long as it lives - the kernel drops it
when the process ends, however it ends - so at start a server removes every process folder whose lock it
can take (its owner is gone) and never one of a replica still running on the same data folder. Folders of
the earlier layout (saves directly in ``puts/``) are removed too. Local disks only: ``flock`` on network
file systems may not exclude other hosts.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import shutil
import socket
import uuid
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger("flight_share.server")

LOCK = ".lock"
_LEGACY = re.compile(r"^save_.+_pipeline-[0-9a-f]{32}$")  # a save's folder directly in puts/ (before this layout)
_HELD: list[int] = []  # lock descriptors of this process's folders: open for as long as the process lives


def claim_work_dir(root: Path, keep: Iterable[Path] = ()) -> Path:
    """A new folder of this process under ``root`` (locked while it lives); crashed processes' folders removed,
    except the save folders in ``keep`` (saves a crash interrupted: save_journal.py finishes them from there)."""
    root.mkdir(parents=True, exist_ok=True)
    own = root / f"{socket.gethostname()[:40]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    own.mkdir()
    fd = os.open(own / LOCK, os.O_CREAT | os.O_RDWR, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    _HELD.append(fd)
    sweep(root, keep=own, pending=keep)
    return own


def sweep(root: Path, keep: Path | None = None, pending: Iterable[Path] = ()) -> list[Path]:
    """Remove the folders under ``root`` that no running server process holds; returns what was removed.

    A folder in ``pending`` (a save to finish) stays, and so does its process folder with its lock file, so
    a later sweep looks again once the save is finished and its folder gone."""
    removed = []
    kept = {Path(p).resolve() for p in pending}
    for entry in sorted(root.iterdir()):
        if entry == keep or not entry.is_dir():
            continue
        if (entry / LOCK).exists():
            if not _owner_gone(entry / LOCK):
                continue
        elif not _LEGACY.match(entry.name):
            continue  # not a folder this code made: left alone
        folder = entry.resolve()
        if folder in kept:
            continue
        inside = {p for p in kept if folder in p.parents}
        if inside:
            for child in entry.iterdir():
                if child.name == LOCK or child.resolve() in inside:
                    continue
                if child.is_dir():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)
                removed.append(child)
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    if removed:
        log.warning("removed %d upload folder(s) left by server processes that ended without cleaning up: %s",
                    len(removed), ", ".join(p.name for p in removed))
    return removed


def _owner_gone(lock: Path) -> bool:
    try:
        fd = os.open(lock, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False  # a live server holds it
    except OSError:
        return False
    finally:
        os.close(fd)  # closing drops the lock we may have taken
    return True
