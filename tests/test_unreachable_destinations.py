"""A destination that cannot be reached is named, never located (issue 22 §1).

With the S3 test server stopped, reads, SQL, the catalog and saves of a Delta dataset on S3 failed with the
store's endpoint URL, bucket and prefix in the message. The client is told which destination (by its name
in the project) and which dataset cannot be reached, and that a retry may help - not where it lives. The same
for a PostgreSQL destination whose port is closed.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest

from client import connect
from client.errors import FlightShareError, ServerUnavailableError
from flight_server.testing.servers import ServerProcess
from flight_server.testing.services import S3Server, free_port
from tests.test_owner_data import DATASET, Owner, make_owner

pytestmark = pytest.mark.slow


@pytest.fixture()
def s3() -> Iterator[S3Server]:
    """An S3 test server of this test's own: the test stops it."""
    server = S3Server().start()
    try:
        yield server
    finally:
        server.stop()


def _calls(catalog) -> list:  # noqa: ANN001 - the client's catalog
    dataset = lambda: catalog[DATASET]  # noqa: E731
    return [
        ("read", lambda: dataset().table("items").arrow()),
        ("sql", lambda: dataset().sql("SELECT count(*) FROM items").arrow()),
        ("save", lambda: dataset().save(pa.table({"id": [9], "v": ["z"]}), table_name="items")),
        ("new table", lambda: dataset().save(pa.table({"id": [9]}), table_name="other")),
    ]


def _failures(catalog, hidden: list[str]) -> list[str]:  # noqa: ANN001
    """Every call's error text; each must name the destination and hide ``hidden``."""
    texts, problems = [], []
    for what, call in _calls(catalog):
        with pytest.raises(FlightShareError) as failed:
            call()
        text = str(failed.value)
        texts.append(text)
        leaked = [h for h in hidden if h.lower() in text.lower()]
        if leaked:
            problems.append(f"{what}: {text!r} shows {leaked}")
        if "owner_dest" not in text:
            problems.append(f"{what}: {text!r} does not name the destination")
        if not isinstance(failed.value, ServerUnavailableError):
            problems.append(f"{what}: {type(failed.value).__name__}, not ServerUnavailableError (a retry may work)")
    assert not problems, "\n".join(problems)
    return texts


def test_a_stopped_s3_store_is_named_not_located(request: pytest.FixtureRequest, tmp_path: Path,
                                                 s3: S3Server) -> None:
    owner: Owner = make_owner("delta_s3", request, tmp_path / "owner")
    owner.run("p", pa.table({"id": [1, 2], "v": ["a", "b"]}), tmp_path / "pipelines", name="items")
    owner.project.write_text(owner.project.read_text().replace("owner_data: {contract: freeze}",
                                                               "owner_data: {contract: evolve}"))
    with ServerProcess(owner.project, env=owner.env) as server:
        catalog = connect(server.url)
        assert catalog[DATASET].table("items").arrow().num_rows == 2
        s3.stop()
        hidden = [s3.endpoint_url, f"{s3.host}:{s3.port}", s3.bucket, owner.delta_options["_base"].rsplit("/", 1)[-1], "s3://", "http://"]
        _failures(connect(server.url), hidden)
        assert server.alive, server.output()


def test_a_closed_postgres_port_is_named_not_located(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    owner: Owner = make_owner("postgres", request, tmp_path / "owner")
    port = str(free_port())  # nothing listens there
    env = {**owner.env, "PG_PORT": port}
    owner.project.write_text(owner.project.read_text().replace("owner_data: {contract: freeze}",
                                                               "owner_data: {contract: evolve}"))
    with ServerProcess(owner.project, env=env) as server:
        hidden = [f":{port}", f"port {port}", owner.env.get("PG_HOST", "127.0.0.1")]
        _failures(connect(server.url), hidden)
        assert server.alive, server.output()
