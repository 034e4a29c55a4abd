"""A data engineer's own data, as ordinary dlt pipelines load it, served from a dlt+ project file on every
destination kind: duckdb, SQLite through dlt's sqlalchemy destination, Delta (dlt+'s ``type: delta``, local and
on the S3 test server), Delta tables found by their log in a plain ``filesystem`` destination, and PostgreSQL.

Two pipelines with their own dlt schemas load into one dataset: ``shop`` (nested orders -> a child table,
merged on a primary key over two loads, the second adding a column) and ``crm`` (customers with a decimal
of fixed precision, a tz timestamp and JSON, merged on its key). Every table read through the server equals
the destination's own read; rows read back save back under ``freeze``; a default save into a merge table
merges; and afterwards the owner's pipeline, from a fresh working folder, still loads and evolves.
"""

from __future__ import annotations

import datetime
import decimal
import hashlib
import json
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import dlt
import pyarrow as pa
import pytest

from client import InvalidRequestError, PipelineStepFailed, connect
from flight_server.testing.servers import ServerProcess, cli, environment

KINDS = ["duckdb", "sqlite", "delta_local", "delta_s3", "filesystem_delta", "postgres"]
DATASET = "owner_data"
DLT_COLUMNS = ("_dlt_id", "_dlt_load_id", "_dlt_parent_id", "_dlt_root_id", "_dlt_list_idx")
UTC = datetime.UTC


@dataclass
class Owner:
    """One destination kind: the project file that serves it and what the owner's pipelines use."""

    kind: str
    root: Path
    destination: Callable[[], Any]  # the owner's dlt destination
    env: dict[str, str] = field(default_factory=dict)
    table_format: str | None = None
    delta_options: dict[str, str] | None = None  # where the destination's own read is deltalake's

    @property
    def project(self) -> Path:
        return self.root / "dlt.yml"

    def run(self, pipeline_name: str, data: Any, pipelines_dir: Path, **hints: Any) -> None:
        """What the owner's pipeline does (dlt's defaults, the resource's hints)."""
        with environment(self.env):
            pipeline = dlt.pipeline(pipeline_name, destination=self.destination(), dataset_name=DATASET,
                                    pipelines_dir=str(pipelines_dir))
            resource = dlt.resource(data, table_format=self.table_format, **hints)
            deadline = time.monotonic() + 60
            while True:
                try:
                    # a package left pending by a failed attempt is loaded as it is (dlt's resume)
                    info = pipeline.load() if pipeline.has_pending_data else pipeline.run(resource)
                    info.raise_on_failed_jobs()
                    if not pipeline.has_pending_data:
                        return
                    assert time.monotonic() < deadline, "the owner's package stays pending"
                except Exception as exc:
                    # a duckdb file is one process's at a time: the owner's load meets a server read now and
                    # then (README, "Destinations"), fails before writing anything, and runs again
                    if self.kind != "duckdb" or "lock" not in str(exc).lower() or time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)

    def read(self, table: str, schema: str) -> list[dict[str, Any]]:
        """The destination's own read of a table: dlt's dataset, or deltalake for Delta tables (dlt reads
        those through duckdb's delta extension, downloaded at run time: not reachable here)."""
        with environment(self.env):
            if self.delta_options is not None:
                from deltalake import DeltaTable

                base = self.delta_options.pop("_base")
                try:
                    data = DeltaTable(f"{base}/{DATASET}/{table}", storage_options=self.delta_options or None)
                    rows = data.to_pyarrow_table().to_pylist()
                finally:
                    self.delta_options["_base"] = base
            else:
                rows = dlt.dataset(self.destination(), DATASET, schema=schema)[table].arrow().to_pylist()
        return _sorted(rows)

    def stored_contract(self, schema: str) -> Any:
        with environment(self.env):
            stored = dlt.dataset(self.destination(), DATASET, schema=schema).schema
        return stored.settings.get("schema_contract"), {
            name: t.get("write_disposition") for name, t in stored.tables.items() if not name.startswith("_dlt")}


def _sorted(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows in one order, JSON compared as JSON: PostgreSQL prints jsonb as ``{"a": 1}``, dlt's read
    re-serializes it as ``{"a":1}`` - the same value."""
    rows = [{k: json.loads(v) if k == "profile" and isinstance(v, str) else v for k, v in r.items()} for r in rows]
    return sorted(rows, key=lambda r: (str(r.get("_dlt_id")), str(r)))


def _without_dlt(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(({k: v for k, v in r.items() if k not in DLT_COLUMNS} for r in rows), key=str)


def _project(root: Path, destination: str) -> None:
    """A dlt+ project file: the owner's two pipelines name the dataset; the access profile freezes it."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "dlt.yml").write_text(textwrap.dedent("""
        project: {name: owners}
        destinations:
        %s
        pipelines:
          shop_pipeline: {source: shop, destination: owner_dest, dataset_name: owner_data}
          crm_pipeline: {source: crm, destination: owner_dest, dataset_name: owner_data}
        profiles:
          access:
            datasets:
              owner_data: {contract: freeze}
        server: {anonymous_profile: access}
    """) % textwrap.indent(destination, "  "))


def make_owner(kind: str, request: pytest.FixtureRequest, root: Path) -> Owner:
    entry, owner = owner_destination(kind, request, root)
    _project(root, entry)
    return owner


def owner_destination(kind: str, request: pytest.FixtureRequest, root: Path, name: str = "owner_dest",
                      store: str = "shop", lake: str = "lake", s3_prefix: str | None = None) -> tuple[str, Owner]:
    """A destination of ``kind`` as a dlt+ project file declares it (the entry ``name:`` of its ``destinations``),
    and the owner whose pipelines load into it. Kinds: those of :data:`KINDS`, and ``filesystem`` (dlt's plain
    file layout, no table format). ``store``: the database file's stem; ``lake``: the local folder's name;
    ``s3_prefix``: the folder in the S3 test server's bucket. The S3 server and PostgreSQL are shared by the
    tests of one worker: an owner's S3 folder and PostgreSQL database are its own (named after ``root``), so
    no test sees another's tables. The owner is picklable (``functools.partial``
    destinations), so a worker process can run its pipelines."""
    own = "owner_" + hashlib.sha1(str(root).encode()).hexdigest()[:12]  # this owner's, on the shared servers
    s3_prefix = s3_prefix or f"{own}_lake"
    if kind == "duckdb":
        return (f"{name}: {{type: duckdb, credentials: '{{project_dir}}/{store}.duckdb'}}\n",
                Owner(kind, root, partial(dlt.destinations.duckdb, str(root / f"{store}.duckdb"))))
    if kind == "sqlite":
        return (f"{name}: {{type: sqlalchemy, credentials: 'sqlite:///{{project_dir}}/{store}.db'}}\n",
                Owner(kind, root, partial(dlt.destinations.sqlalchemy, f"sqlite:///{root / f'{store}.db'}")))
    if kind in ("delta_local", "filesystem_delta", "filesystem"):
        # dlt+'s own type for a folder of Delta tables; or dlt's plain filesystem type (Delta tables found by their
        # log, or dlt's plain parquet/jsonl/csv layout)
        kind_type = "delta" if kind == "delta_local" else "filesystem"
        delta = kind != "filesystem"
        return (f"{name}: {{type: {kind_type}, bucket_url: '{{project_dir}}/{lake}'}}\n",
                Owner(kind, root, partial(dlt.destinations.filesystem, str(root / lake)),
                      table_format="delta" if delta else None,
                      delta_options={"_base": str(root / lake)} if delta else None))
    if kind == "delta_s3":
        s3 = request.getfixturevalue("s3")
        entry = textwrap.dedent(f"""\
            {name}:
              type: delta
              bucket_url: 's3://{{env.S3_BUCKET}}/{s3_prefix}'
              credentials:
                aws_access_key_id: '{{env.AWS_ACCESS_KEY_ID}}'
                aws_secret_access_key: '{{env.AWS_SECRET_ACCESS_KEY}}'
                endpoint_url: '{{env.S3_ENDPOINT_URL}}'
                region_name: '{{env.S3_REGION}}'
        """)
        options = {"AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key,
                   "AWS_ENDPOINT_URL": s3.endpoint_url, "AWS_REGION": s3.region, "AWS_ALLOW_HTTP": "true",
                   "_base": f"s3://{s3.bucket}/{s3_prefix}"}
        return entry, Owner(kind, root, partial(dlt.destinations.filesystem, f"s3://{s3.bucket}/{s3_prefix}",
                                                credentials=s3.credentials),
                            env=s3.env, table_format="delta", delta_options=options)
    assert kind == "postgres", kind
    pg = request.getfixturevalue("postgres").database_named(own)
    entry = textwrap.dedent(f"""\
        {name}:
          type: postgres
          credentials:
            host: '{{env.PG_HOST}}'
            port: '{{env.PG_PORT}}'
            username: '{{env.PG_USER}}'
            password: '{{env.PG_PASSWORD}}'
            database: '{{env.PG_DATABASE}}'
    """)
    return entry, Owner(kind, root, partial(dlt.destinations.postgres, pg.url), env=pg.env)


def orders(version: int) -> list[dict[str, Any]]:
    """Nested orders; the second load updates ids 2-3, adds 4-5 and a column (schema evolution)."""
    ids = range(0, 4) if version == 1 else range(2, 6)
    rows = [{"id": i, "name": f"order {i} v{version}", "items": [{"sku": f"s{i}-{n}", "qty": n} for n in range(1, 3)]}
            for i in ids]
    if version == 2:
        for row in rows:
            row["note"] = f"note {row['id']}"
    return rows


def customers(version: int) -> list[dict[str, Any]]:
    base = datetime.datetime(2024, 5, 1, 8, 30, tzinfo=UTC)
    return [{"cid": i, "amount": decimal.Decimal(f"{i * 10 + version}.1234"),
             "seen_at": base + datetime.timedelta(hours=i, minutes=version),
             "profile": {"tier": "gold" if i % 2 else "silver", "tags": [version, i]}}
            for i in range(3 + version)]


CUSTOMER_COLUMNS = {"amount": {"data_type": "decimal", "precision": 12, "scale": 4},
                    "profile": {"data_type": "json"}}


@pytest.fixture(scope="module", params=KINDS)
def owner(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Owner, ServerProcess]]:
    owner = make_owner(request.param, request, tmp_path_factory.mktemp(request.param))
    pipelines = owner.root / "owner_pipelines"
    for version in (1, 2):
        owner.run("shop_pipeline", orders(version), pipelines, name="orders", primary_key="id",
                  write_disposition="merge")
        owner.run("crm_pipeline", customers(version), pipelines, name="customers", primary_key="cid",
                  write_disposition="merge", columns=CUSTOMER_COLUMNS)
    assert cli("check", "--project", str(owner.project), env=owner.env, check=False).returncode == 0
    with ServerProcess(owner.project, env=owner.env) as server:
        yield owner, server
        assert server.alive, server.output()


def test_every_table_of_both_schemas_reads_as_the_destination_reads_it(owner: tuple[Owner, ServerProcess]) -> None:
    data, server = owner
    with connect(server.url) as catalog:
        dataset = catalog[DATASET]
        assert sorted(dataset.tables) == ["customers", "orders", "orders__items"]
        for table, schema in (("orders", "shop"), ("orders__items", "shop"), ("customers", "crm")):
            assert _sorted(dataset[table].arrow().to_pylist()) == data.read(table, schema), table
        got = _without_dlt(dataset.orders.arrow().to_pylist())
        assert len(got) == 6 and {r["id"]: r["note"] for r in got}[5] == "note 5"  # merged, evolved
        assert {r["id"]: r["name"] for r in got}[2] == "order 2 v2"
        # the crm schema's hints survive the trip: decimal(12,4), tz timestamps
        schema = dataset.customers.schema
        assert schema.field("amount").type == pa.decimal128(12, 4)
        # (SQLite keeps no time zone: dlt reads its timestamps naive, and so does the server)
        assert schema.field("seen_at").type == pa.timestamp("us", tz=None if data.kind == "sqlite" else "UTC")
        assert dataset.sql("SELECT count(*) AS n FROM customers").arrow().column("n")[0].as_py() == 5
        # the load history of both pipelines: readable, in SQL too, never listed as a table
        loads = dataset.loads().arrow()
        assert loads.num_rows == 4 and set(loads.column("schema_name").to_pylist()) == {"shop", "crm"}
        assert dataset.sql("SELECT count(*) AS n FROM _dlt_loads WHERE status = 0").arrow().column("n")[0].as_py() == 4


def test_rows_read_back_save_back_under_freeze(owner: tuple[Owner, ServerProcess]) -> None:
    data, server = owner
    with connect(server.url) as catalog:
        dataset = catalog[DATASET]
        before = dataset.customers.arrow()
        info = dataset.save(before, table_name="customers")  # the default: merge, like the stored table
        assert "LOADED" in str(info)
        after = catalog[DATASET].customers.arrow()
        assert _without_dlt(after.to_pylist()) == _without_dlt(before.to_pylist())
        assert after.schema.equals(before.schema)
        # a JSON column takes JSON text: anything else is refused before any destination sees it
        broken = before.slice(0, 1).set_column(before.schema.get_field_index("profile"), "profile",
                                               pa.array(["not json {"], before.schema.field("profile").type))
        with pytest.raises(InvalidRequestError, match=r"column 'profile' .* is not JSON"):
            dataset.save(broken, table_name="customers")
        assert _without_dlt(catalog[DATASET].customers.arrow().to_pylist()) == _without_dlt(before.to_pylist())
        # freeze still means freeze: a new column is refused with dlt's text
        with pytest.raises(PipelineStepFailed, match="Trying to add column extra to table customers"):
            dataset.save(pa.table({"cid": [1], "extra": [1]}), table_name="customers")


def test_a_default_save_into_a_merge_table_merges_on_its_stored_key(owner: tuple[Owner, ServerProcess]) -> None:
    data, server = owner
    with connect(server.url) as catalog:
        dataset = catalog[DATASET]
        row = dataset.customers.arrow().filter(pa.compute.equal(pa.compute.field("cid"), 1)).slice(0, 1)
        changed = row.set_column(row.schema.get_field_index("amount"), "amount",
                                 pa.array([decimal.Decimal("99.9999")], pa.decimal128(12, 4)))
        dataset.save(changed, table_name="customers")
        rows = {r["cid"]: r for r in catalog[DATASET].customers.arrow().to_pylist()}
        assert len(rows) == 5 and rows[1]["amount"] == decimal.Decimal("99.9999")
        assert rows[0]["amount"] == decimal.Decimal("2.1234")


def test_the_owners_pipelines_keep_their_schema_and_evolve_from_a_fresh_folder(owner: tuple[Owner, ServerProcess]) -> None:
    data, server = owner
    # what the saves may not change: the owner's contract (none) and write dispositions
    contract, dispositions = data.stored_contract("crm")
    assert contract is None and dispositions["customers"] == "merge"
    fresh = data.root / f"fresh_{datetime.datetime.now().timestamp()}"
    more = [{**customers(2)[0], "cid": 100, "region": "north"}]  # a new column, from a new working folder
    data.run("crm_pipeline", more, fresh, name="customers", primary_key="cid", write_disposition="merge",
             columns=CUSTOMER_COLUMNS)
    data.run("shop_pipeline", [{"id": 50, "name": "late", "items": [], "channel": "web"}], fresh, name="orders",
             primary_key="id", write_disposition="merge")
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=15)
    with connect(server.url) as catalog:
        while True:  # the server sees new loads within seconds (its stored schema is re-read)
            customers_read = catalog[DATASET].customers.arrow()
            if "region" in customers_read.column_names or datetime.datetime.now() > deadline:
                break
            catalog.refresh()
        assert {r["cid"]: r.get("region") for r in customers_read.to_pylist()}[100] == "north"
        assert _sorted(catalog[DATASET].customers.arrow().to_pylist()) == data.read("customers", "crm")
        assert 50 in catalog[DATASET].orders.arrow().column("id").to_pylist()


def test_a_broken_load_record_on_delta_is_left_out_of_the_history(tmp_path: Path) -> None:
    """dlt keeps a Delta dataset's load history as one JSON file per load: a file that is not one of dlt's
    records (truncated, garbage) is left out, and the history and the tables stay readable."""
    data = make_owner("delta_local", None, tmp_path / "lake-owner")  # type: ignore[arg-type]
    for version in (1, 2):
        data.run("crm_pipeline", customers(version), tmp_path / "pipelines", name="customers", primary_key="cid",
                 write_disposition="merge", columns=CUSTOMER_COLUMNS)
    loads = data.root / "lake" / DATASET / "_dlt_loads"
    (loads / "crm__9999999999.1.jsonl").write_text('{"load_id": "17')  # a half-written record
    (loads / "junk.jsonl").write_text("not json at all\n")
    with ServerProcess(data.project) as server, connect(server.url) as catalog:
        dataset = catalog[DATASET]
        assert dataset.loads().arrow().num_rows == 2
        assert dataset.sql("SELECT count(*) AS n FROM _dlt_loads").arrow().column("n")[0].as_py() == 2
        assert dataset.customers.arrow().num_rows == 5
