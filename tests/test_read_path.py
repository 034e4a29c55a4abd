"""The read path against a real server process: catalog, datasets, tables, SQL, errors."""

from __future__ import annotations

import json

import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.flight as flight
import pytest

from client import Catalog, InvalidRequestError, NotFoundError, connect, protocol
from flight_server.cli.demo import CHILD_TABLES, EVENT_TABLES
from flight_server.testing.servers import InProcessServer, ServerProcess, wait_until

ALL_TABLES = [*EVENT_TABLES, *CHILD_TABLES]


def test_print_catalog_reads_like_the_seed(catalog: Catalog, demo_project) -> None:
    """print(catalog) names project, profile, and dataset@destination[location] lines."""
    lines = str(catalog).splitlines()
    assert lines[0] == "Datasets in project dlt_example_project for profile access:"
    data = demo_project.parent / "_data"
    assert lines[1] == f"github_events_dataset@lake[duckdb:///{str(data / 'lake.duckdb').lstrip('/')}]"
    assert lines[2] == f"reports_dataset@warehouse[duckdb:///{str(data / 'warehouse.duckdb').lstrip('/')}]"


def test_print_dataset_lists_tables_under_logical_schema(catalog: Catalog, demo_project) -> None:

    text = str(catalog.github_events_dataset).splitlines()
    # the real version, as stored by dlt (read here with duckdb directly from a copy of the file)
    info = catalog.github_events_dataset.info
    assert text[0] == f"Dataset github_events_dataset tables in logical schema events@v{info.schema_version}"
    assert info.schema_version and info.schema_version >= 1
    assert sorted(text[1:]) == sorted(ALL_TABLES)
    assert catalog["github_events_dataset"].tables == catalog.github_events_dataset.tables


def test_attribute_and_item_access_and_completion(catalog: Catalog) -> None:
    assert {"github_events_dataset", "reports_dataset"} <= set(dir(catalog))
    ds = catalog["github_events_dataset"]
    assert "issues_event" in dir(ds)
    assert ds["issues_event"].name == ds.issues_event.name == "issues_event"
    # attribute access never hides a method
    assert callable(catalog.refresh) and callable(ds.sql)


def test_table_reads_as_pandas_arrow_and_batches(catalog: Catalog) -> None:
    table = catalog.github_events_dataset.issues_event
    arrow = table.arrow()
    df = table.df()
    batches = list(table.iter_batches())
    assert isinstance(df, pd.DataFrame) and isinstance(arrow, pa.Table)
    assert arrow.num_rows == len(df) == sum(b.num_rows for b in batches) == table.row_count() > 0
    assert arrow.schema.equals(table.schema)
    assert {"id", "created_at", "payload__issue__title", "_dlt_load_id", "_dlt_id"} <= set(arrow.column_names)
    assert pa.types.is_timestamp(arrow.schema.field("created_at").type)


def test_select_limit_head(catalog: Catalog) -> None:
    table = catalog.github_events_dataset.push_event
    small = table.select("id", "created_at").limit(3).arrow()
    assert small.column_names == ["id", "created_at"] and small.num_rows == 3
    assert len(table.head()) == 5
    assert table.select("id").schema.names == ["id"]


def test_child_tables_link_to_parents(catalog: Catalog) -> None:
    ds = catalog.github_events_dataset
    commits = ds.push_event__payload__commits.arrow()
    parents = set(ds.push_event.select("_dlt_id").arrow().column("_dlt_id").to_pylist())
    assert commits.num_rows > 0
    assert set(commits.column("_dlt_parent_id").to_pylist()) <= parents


def test_sql_relation(catalog: Catalog) -> None:
    ds = catalog.github_events_dataset
    rel = ds.sql("SELECT payload__action AS action, count(*) AS n FROM issues_event GROUP BY 1 ORDER BY 1")
    df = rel.df()
    assert df["n"].sum() == ds.issues_event.row_count()
    assert rel.schema.names == ["action", "n"]
    assert sum(b.num_rows for b in rel.iter_batches()) == len(df)
    joined = ds.sql(
        "SELECT count(*) AS n FROM push_event p JOIN push_event__payload__commits c ON c._dlt_parent_id = p._dlt_id"
    ).arrow()
    assert joined.column("n")[0].as_py() == ds.push_event__payload__commits.row_count()


def test_polars_and_pandas_read_through_arrow(catalog: Catalog) -> None:
    table = catalog.github_events_dataset.watch_event
    frame = pl.from_arrow(table.arrow())
    assert frame.height == table.row_count()
    streamed = pl.DataFrame(table)  # via the Arrow PyCapsule stream protocol
    assert streamed.height == frame.height
    assert frame["id"].to_list() == table.df()["id"].tolist()


def test_plain_pyarrow_flight_client(server: ServerProcess) -> None:
    """A bare pyarrow FlightClient lists, reads and asks for schemas without the project's client."""
    client = flight.connect(server.url)
    infos = list(client.list_flights())
    paths = {tuple(p.decode() for p in i.descriptor.path) for i in infos}
    assert {("github_events_dataset", t) for t in ALL_TABLES} == paths
    for info in infos:
        table = client.do_get(info.endpoints[0].ticket).read_all()
        assert table.schema.equals(info.schema)
        # the listing answers from the catalog without reading data: counts come with GetFlightInfo
        assert info.total_records == -1
        assert table.num_rows == client.get_flight_info(info.descriptor).total_records
    only = list(client.list_flights(b"github_events_dataset"))
    assert len(only) == len(ALL_TABLES)
    descriptor = flight.FlightDescriptor.for_path("github_events_dataset", "fork_event")
    assert client.get_schema(descriptor).schema.equals(client.get_flight_info(descriptor).schema)


def test_json_command_descriptor_projection_limit_and_sql(server: ServerProcess) -> None:
    client = flight.connect(server.url)
    read = flight.FlightDescriptor.for_command(json.dumps(
        {"v": 1, "op": "read", "dataset": "github_events_dataset", "table": "push_event", "columns": ["id"], "limit": 7}
    ).encode())
    info = client.get_flight_info(read)
    table = client.do_get(info.endpoints[0].ticket).read_all()
    assert table.column_names == ["id"] and table.num_rows == 7 == info.total_records
    sql = flight.FlightDescriptor.for_command(protocol.encode_command(
        protocol.SqlCommand("github_events_dataset", "SELECT count(*) AS n FROM fork_event")))
    info = client.get_flight_info(sql)
    assert client.do_get(info.endpoints[0].ticket).read_all().column("n")[0].as_py() > 0


def test_actions(server: ServerProcess) -> None:
    client = flight.connect(server.url)
    assert {a.type for a in client.list_actions()} == {"list-datasets", "health"}
    body = next(iter(client.do_action(flight.Action("list-datasets", b"")))).body.to_pybytes()
    info = protocol.CatalogInfo.from_bytes(body)
    assert info.project == "dlt_example_project" and info.profile == "access"
    events = {d.name: d for d in info.datasets}["github_events_dataset"]
    assert events.schema_name == "events" and set(events.tables) == set(ALL_TABLES)
    assert events.destination == "lake" and events.location.startswith("duckdb:///")
    health = json.loads(next(iter(client.do_action(flight.Action("health", b"")))).body.to_pybytes())
    assert health["status"] == "ok"


@pytest.mark.parametrize(
    "descriptor, code_error, text",
    [
        (flight.FlightDescriptor.for_path("no_such_dataset", "t"), pa.ArrowKeyError, "Dataset 'no_such_dataset' not found"),
        (flight.FlightDescriptor.for_path("github_events_dataset", "nope"), pa.ArrowKeyError, "Table 'nope' not found in dataset 'github_events_dataset'"),
        (flight.FlightDescriptor.for_path("only_one_part"), pa.ArrowInvalid, "path descriptor must be [dataset, table]"),
        (flight.FlightDescriptor.for_command(b"{not json"), pa.ArrowInvalid, "command is not UTF-8 JSON"),
        (flight.FlightDescriptor.for_command(b'{"op": "read", "dataset": "github_events_dataset"}'), pa.ArrowInvalid, "command key 'table'"),
        (flight.FlightDescriptor.for_command(b'{"op": "delete"}'), pa.ArrowInvalid, "command key 'op' must be one of"),
        (flight.FlightDescriptor.for_command(b'{"op": "read", "dataset": "d", "table": "t", "x": 1}'), pa.ArrowInvalid, "unknown key(s) ['x']"),
        (flight.FlightDescriptor.for_command(protocol.encode_command(protocol.SqlCommand("github_events_dataset", "DELETE FROM issues_event"))), pa.ArrowInvalid, "only SELECT queries are allowed"),
    ],
)
def test_bad_requests_get_clear_codes_and_the_server_stays_up(server: ServerProcess, descriptor, code_error, text) -> None:
    client = flight.connect(server.url)
    with pytest.raises(code_error) as info:
        client.get_flight_info(descriptor)
    message = str(info.value)
    assert text in message
    assert "Traceback" not in message and ".py" not in message
    assert server.alive
    assert list(client.list_flights(b"github_events_dataset"))


def test_client_errors_are_typed(catalog: Catalog) -> None:
    with pytest.raises(NotFoundError) as err:
        catalog["nope"]
    assert err.value.dataset == "nope" and "github_events_dataset" in str(err.value)
    with pytest.raises(NotFoundError) as err:
        catalog.github_events_dataset.issues_event.select("zzz").arrow()
    assert err.value.table == "issues_event" and "zzz" in str(err.value)
    with pytest.raises(InvalidRequestError) as err:
        catalog.github_events_dataset.sql("SELECT * FROM read_csv('/etc/passwd')").arrow()
    assert "read_csv" in str(err.value)
    with pytest.raises(AttributeError):
        catalog.nope


def test_notebook_html(catalog: Catalog) -> None:
    assert "github_events_dataset" in catalog._repr_html_()
    assert "issues_event" in catalog.github_events_dataset._repr_html_()
    assert "created_at" in catalog.github_events_dataset.issues_event._repr_html_()


def test_empty_dataset_is_listed(catalog: Catalog) -> None:
    reports = catalog.reports_dataset
    assert reports.tables == []
    assert str(reports).splitlines()[0].startswith("Dataset reports_dataset tables in logical schema out_source")


def test_sql_the_engine_rejects_is_invalid_argument_not_internal(catalog: Catalog, server: ServerProcess) -> None:
    with pytest.raises(InvalidRequestError) as err:
        catalog.github_events_dataset.sql("SELECT no_such_column FROM issues_event").arrow()
    assert "no_such_column" in str(err.value) and "internal" not in str(err.value)
    client = flight.connect(server.url)
    sql = flight.FlightDescriptor.for_command(protocol.encode_command(
        protocol.SqlCommand("github_events_dataset", "SELECT 'x' + 1 FROM issues_event")))
    with pytest.raises(pa.ArrowInvalid) as raw:
        client.get_flight_info(sql)
    assert "flight_server" not in str(raw.value)
    assert server.alive


def test_a_hot_table_is_served_from_memory_and_a_load_makes_it_stale(demo_project, tmp_path) -> None:
    """Read twice, a table is kept as Arrow in server memory; the same bytes come back; a save
    changes the data version so the next read sees the new rows."""
    import shutil

    shutil.copytree(demo_project.parent, tmp_path / "p")
    with ServerProcess(tmp_path / "p" / "dlt.yml") as proc, connect(proc.url) as cat:
        table = cat.github_events_dataset.push_event
        first = table.arrow()
        table.arrow()  # the second request makes it hot: filled in the background
        wait_until(lambda: "cached github_events_dataset.push_event" in proc.output(), "push_event cached")
        client = flight.connect(proc.url)
        info = client.get_flight_info(flight.FlightDescriptor.for_path("github_events_dataset", "push_event"))
        assert len(info.endpoints) == 1 and info.total_bytes > 0
        assert client.do_get(info.endpoints[0].ticket).read_all().equals(first)
        assert table.select("id").limit(3).arrow().equals(first.select(["id"]).slice(0, 3))
        # a write to a cached table: the cached copy is dropped, reads see the new rows at once
        reports = cat.reports_dataset
        reports.save(pd.DataFrame({"n": [1]}), table_name="marker")
        reports.marker.arrow()
        reports.marker.arrow()
        wait_until(lambda: "cached reports_dataset.marker" in proc.output(), "marker cached")
        reports.save(pd.DataFrame({"n": [2]}), table_name="marker")
        assert sorted(reports.marker.arrow().column("n").to_pylist()) == [1, 2]
        assert table.arrow().equals(first)
        assert proc.alive


def test_the_cache_budget_holds_while_a_table_loads(demo_project, tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    """Regression: the cache checked its budget after loading a whole table (estimated from a sample of
    short rows), so a table with one huge value past the sample grew the server on every read. A fill
    stops once its batches pass the budget, and is not tried again at that data version.

    In process (InProcessServer, the code path of ``serve``), so that the test can wait for a background fill
    to end (the cache's own state) instead of guessing how long one takes; the memory sampled is therefore
    the client's and the server's together."""
    import logging
    import shutil

    import psutil

    shutil.copytree(demo_project.parent, tmp_path / "p")
    project = tmp_path / "p" / "dlt.yml"
    project.write_text(project.read_text().replace("server:\n", "server:\n  cache_bytes: 5000000\n", 1))
    big = "x" * (60 << 20)
    df = pd.DataFrame({"n": range(20_001), "v": ["short"] * 20_000 + [big]})
    caplog.set_level(logging.INFO, logger="flight_share.cache")
    with InProcessServer(project) as unit, connect(unit.url) as cat:
        cache = unit.server.cache
        fills: list[object] = []
        fill = cache._fill

        def counted_fill(*args: object) -> None:
            fills.append(args[-1])
            fill(*args)

        cache._fill = counted_fill  # type: ignore[method-assign]  # the fill thread's target, looked up per fill
        cat.reports_dataset.save(df, table_name="lumpy")
        this_process = psutil.Process()
        table = cat.reports_dataset.lumpy
        rss = []
        for _ in range(8):
            assert table.arrow().num_rows == 20_001
            # a fill this read started (in GetFlightInfo, before the rows were sent) is still listed until it ends
            wait_until(lambda: not cache._filling, "the background fill ended")
            rss.append(this_process.memory_info().rss)
        refused = [r.getMessage() for r in caplog.records if r.name == "flight_share.cache"]
        assert len(fills) == 1, fills  # the second read started the only fill
        assert [m for m in refused if "reports_dataset.lumpy" in m] == [
            "not caching reports_dataset.lumpy: larger than the budget of 5000000 bytes"]
        assert cache.used == 0
        # reads after the first few hold steady: no fill per read (before the fix each read grew it by >100 MB)
        assert rss[-1] - rss[3] < 80 << 20, [r >> 20 for r in rss]


def test_where_and_order_by_read_like_dlts_relation(catalog: Catalog) -> None:
    """``Table.where`` / ``order_by`` (the shape of dlt's Relation): one SELECT through the sandbox, its plain
    filters and limit pushed to the destination; the answer is the table's rows, filtered and sorted."""
    import pyarrow.compute as pc

    table = catalog.github_events_dataset.issues_event
    everything = table.select("id", "payload__action").arrow()
    opened = everything.filter(pc.equal(everything["payload__action"], "opened"))
    query = table.select("id", "payload__action").where("payload__action", "eq", "opened").order_by("id", "desc")
    assert query.arrow().to_pylist() == opened.sort_by([("id", "descending")]).to_pylist()
    assert query.limit(3).arrow().to_pylist() == opened.sort_by([("id", "descending")]).slice(0, 3).to_pylist()
    assert len(query.head(2)) == 2
    some = everything.column("id").to_pylist()[:3]
    picked = table.where("id", "in", some).select("id").order_by("id").arrow().column("id").to_pylist()
    assert picked == sorted(some)
    raw = table.where("payload__action = 'opened' AND id IS NOT NULL").select("id").arrow()
    assert raw.num_rows == opened.num_rows
    assert table.where("payload__action", "eq", None).arrow().num_rows == everything["payload__action"].null_count
    hostile = "x' OR '1'='1"
    assert table.where("payload__action", "eq", hostile).arrow().num_rows == 0  # a value stays a value
    with pytest.raises(ValueError, match="operator 'like' is not one of"):
        table.where("id", "like", "a%")
    # found by review: an empty list, None in a list, numpy scalars
    import numpy as np

    assert table.where("id", "in", []).arrow().num_rows == 0
    assert table.where("id", "not_in", []).arrow().num_rows == everything.num_rows
    assert table.where("id", "in", [some[0], None]).select("id").arrow().column("id").to_pylist() == [some[0]]
    assert table.where("id", "eq", np.int64(some[0])).arrow().num_rows == 1
