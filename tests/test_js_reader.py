"""A non-Python, non-pyarrow reader: Node.js speaking Flight over gRPC from Flight.proto (tests/js).

The test setup installs the reader's npm packages (``npm ci`` from the committed package-lock.json)
and runs it as a subprocess against a real server; its JSON answer is compared with what our Python
client reads.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from client import connect
from flight_server.testing.servers import ServerProcess

JS_DIR = Path(__file__).resolve().parent / "js"
EVENTS = "github_events_dataset"


@pytest.fixture(scope="module")
def node() -> str:
    """node, with the reader's packages installed by npm ci."""
    node, npm = shutil.which("node"), shutil.which("npm")
    assert node and npm, "Node.js and npm are needed for the JavaScript reader test (apt-get install nodejs npm)"
    installed = JS_DIR / "node_modules" / ".package-lock.json"
    # one installer at a time: pytest-xdist workers share tests/js/node_modules (npm ci empties it first)
    with open(JS_DIR / ".npm-ci.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not installed.exists() or installed.stat().st_mtime < (JS_DIR / "package-lock.json").stat().st_mtime:
            result = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=JS_DIR, capture_output=True,
                                    text=True, timeout=600)
            assert result.returncode == 0, f"npm ci failed:\n{result.stdout}\n{result.stderr}"
    return node


def _read(node: str, server: ServerProcess, table: str, column: str, env: dict[str, str] | None = None) -> dict:
    result = subprocess.run(
        [node, str(JS_DIR / "flight_reader.mjs"), f"127.0.0.1:{server.port}", EVENTS, table, column],
        capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})},
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_js_reader_lists_flights_and_reads_a_table(node: str, server: ServerProcess) -> None:
    answer = _read(node, server, "issues_event", "payload__issue__title")
    with connect(server.url) as catalog:
        table = catalog[EVENTS]["issues_event"]
        expected = table.arrow()
        listed = {f"{d}.{t}" for d in catalog.datasets for t in catalog[d].tables}
    assert set(answer["flights"]) == listed
    assert answer["rows"] == answer["total_records"] == expected.num_rows > 0
    assert answer["schema"] == answer["columns"] == expected.schema.names
    assert answer["values"] == expected.column("payload__issue__title").to_pylist()
    assert answer["messages"] >= 2  # the schema, then record batches


def test_js_reader_reads_integers_of_a_child_table(node: str, server: ServerProcess) -> None:
    answer = _read(node, server, "push_event__payload__commits", "_dlt_list_idx")
    with connect(server.url) as catalog:
        expected = catalog[EVENTS]["push_event__payload__commits"].arrow().column("_dlt_list_idx").to_pylist()
    assert [int(v) for v in answer["values"]] == expected and len(expected) > 0


def test_js_reader_reports_a_missing_table(node: str, server: ServerProcess) -> None:
    result = subprocess.run([node, str(JS_DIR / "flight_reader.mjs"), f"127.0.0.1:{server.port}", EVENTS, "nope", "id"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert f"no flight {EVENTS}/nope among" in result.stderr
