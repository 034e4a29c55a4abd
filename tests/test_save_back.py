"""What a read returns, a save into the same table accepts back - and the owner's table keeps its shape (issue 21).

Ordinary dlt table shapes, loaded by the owner's own pipelines on each destination kind, then read through
the server and saved back under a profile that freezes columns and data types:

- tables the owner loaded from an Arrow table or a DataFrame (dlt gives them no ``_dlt_load_id`` / ``_dlt_id``):
  a save adds neither, so the owner's next load still passes;
- a variant column (``score__v_text``: a field that changed type between loads), a ``wei`` column, a ``time``
  column (Delta keeps it as text): each saves back as it was read;
- a parent table with nested rows: a merge would delete them (the rows read carry none), so it is refused up
  front in plain words and the child table is untouched; an append touches no child row;
- an ``scd2`` table: refused up front (dlt's history cannot take rows read back);
- every save's ``_dlt_loads`` record names a schema version that ``_dlt_version`` holds;
- a new table goes into a schema of the saves' own (``out_source``, dlt+'s name): the owner's next run, from
  its own state, cannot drop it.
"""

from __future__ import annotations

import datetime
import decimal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dlt
import pandas as pd
import pyarrow as pa
import pytest

from client import InvalidRequestError, connect
from flight_server.testing.servers import ServerProcess, environment
from tests.test_owner_data import DATASET, Owner, make_owner

pytestmark = pytest.mark.slow

KINDS = ["duckdb", "sqlite", "delta_local", "delta_s3", "postgres"]
# new tables allowed (a save's own), the owner's tables frozen in their columns and types
CONTRACT = "{contract: {tables: evolve, columns: freeze, data_type: freeze}}"
MERGE = {"write_disposition": "merge", "primary_key": "id"}


def _load(owner: Owner, pipelines: Path) -> None:
    """The owner's tables, each as an ordinary dlt pipeline makes it."""
    run = owner.run
    run("arrow_pipeline", pa.table({"id": [1, 2, 3], "v": ["a", "b", "c"]}), pipelines, name="from_arrow")
    run("arrow_pipeline", pd.DataFrame({"id": [1, 2], "v": ["x", "y"]}), pipelines, name="from_frame")
    run("dict_pipeline", [{"id": 1, "score": 1}, {"id": 2, "score": 2}], pipelines, name="variant")
    run("dict_pipeline", [{"id": 3, "score": "high"}], pipelines, name="variant")  # -> score__v_text
    run("dict_pipeline", [{"id": 1, "w": decimal.Decimal(10) ** 30}, {"id": 2, "w": decimal.Decimal(7)}], pipelines,
        name="wei_values", columns={"w": {"data_type": "wei"}})
    run("dict_pipeline", [{"id": 1, "t": datetime.time(10, 30, 15)}], pipelines, name="times")
    run("dict_pipeline", [{"id": 1, "name": "a", "kids": [{"k": 1}, {"k": 2}]}, {"id": 2, "name": "b", "kids": [{"k": 3}]}],
        pipelines, name="parent", **MERGE)
    if owner.table_format != "delta":  # dlt's Delta merge strategies are upsert and insert-only
        for names in (("a", "b"), ("a2", "b")):
            run("dict_pipeline", [{"id": i, "name": n} for i, n in enumerate(names)], pipelines, name="history",
                write_disposition={"disposition": "merge", "strategy": "scd2"}, primary_key="id")


@pytest.fixture(scope="module", params=KINDS)
def owner(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Owner, ServerProcess]]:
    owner = make_owner(request.param, request, tmp_path_factory.mktemp(f"save_back_{request.param}"))
    owner.project.write_text(owner.project.read_text().replace("owner_data: {contract: freeze}", f"owner_data: {CONTRACT}"))
    _load(owner, owner.root / "owner_pipelines")
    with ServerProcess(owner.project, env=owner.env) as server:
        yield owner, server
        assert server.alive, server.output()


def _stored(owner: Owner, schema: str) -> dict[str, Any]:
    """The owner's stored dlt schema as dlt reads it: tables with their hints and columns, the contract."""
    with environment(owner.env):
        stored = dlt.dataset(owner.destination(), DATASET, schema=schema).schema
    return {"contract": stored.settings.get("schema_contract"), "version": stored.version_hash,
            "tables": {n: {k: v for k, v in t.items() if k != "x-normalizer"} for n, t in stored.tables.items()}}


def _orphan_loads(owner: Owner) -> list[tuple[str, str]]:
    """``_dlt_loads`` records whose schema version ``_dlt_version`` does not hold."""
    with environment(owner.env):
        if owner.delta_options is not None:  # dlt keeps both as JSON files next to the tables
            import json

            import fsspec

            options = owner.delta_options
            base = options["_base"]
            fs = fsspec.filesystem("s3", key=options["AWS_ACCESS_KEY_ID"], secret=options["AWS_SECRET_ACCESS_KEY"],
                                   client_kwargs={"endpoint_url": options["AWS_ENDPOINT_URL"],
                                                  "region_name": options["AWS_REGION"]}) \
                if base.startswith("s3://") else fsspec.filesystem("file")
            root = f"{base}/{DATASET}"
            versions = {json.loads(fs.cat_file(f))["version_hash"] for f in fs.glob(f"{root}/_dlt_version/*.jsonl")}
            loads = [json.loads(fs.cat_file(f)) for f in fs.glob(f"{root}/_dlt_loads/*.jsonl")]
            return [(r["load_id"], r["schema_name"]) for r in loads if r["schema_version_hash"] not in versions]
        rows = dlt.dataset(owner.destination(), DATASET)(
            "SELECT l.load_id, l.schema_name FROM _dlt_loads l WHERE NOT EXISTS "
            "(SELECT 1 FROM _dlt_version v WHERE v.version_hash = l.schema_version_hash)").fetchall()
    return [tuple(r) for r in rows]


def _counts(catalog: Any, *tables: str) -> dict[str, int]:
    return {t: catalog[DATASET][t].arrow().num_rows for t in tables}


@pytest.mark.parametrize("table", ["from_arrow", "from_frame", "variant", "wei_values", "times"])
def test_a_read_saves_back_unchanged_and_the_owners_table_keeps_its_shape(owner: tuple[Owner, ServerProcess],
                                                                          table: str) -> None:
    data, server = owner
    schema = "arrow_pipeline" if table.startswith("from_") else "dict_pipeline"
    before = _stored(data, schema)
    with connect(server.url) as catalog:
        read = catalog[DATASET][table].arrow()
        catalog[DATASET].save(read, table_name=table)  # append: the table's disposition
        again = catalog[DATASET][table].arrow()
    assert again.schema.equals(read.schema), (again.schema, read.schema)
    assert again.num_rows == 2 * read.num_rows
    key = [c for c in read.column_names if not c.startswith("_dlt")]
    rows = sorted((tuple(r[c] for c in key) for r in read.to_pylist()), key=str)
    assert sorted((tuple(r[c] for c in key) for r in again.to_pylist()), key=str) == sorted(rows * 2, key=str)
    assert _stored(data, schema) == before  # no column added, no hint or contract changed
    assert _orphan_loads(data) == []


def test_the_owners_next_runs_load_after_saves(owner: tuple[Owner, ServerProcess]) -> None:
    data, server = owner
    fresh = data.root / f"fresh_{datetime.datetime.now().timestamp()}"
    with connect(server.url) as catalog:  # a save into each arrow-loaded table first
        for table in ("from_arrow", "from_frame"):
            catalog[DATASET].save(catalog[DATASET][table].arrow(), table_name=table)
    data.run("arrow_pipeline", pa.table({"id": [100], "v": ["late"]}), fresh, name="from_arrow")
    data.run("arrow_pipeline", pd.DataFrame({"id": [100], "v": ["late"]}), fresh, name="from_frame")
    data.run("dict_pipeline", [{"id": 100, "score": "late"}], fresh, name="variant")
    with connect(server.url) as catalog:
        for table in ("from_arrow", "from_frame", "variant"):
            assert 100 in catalog[DATASET][table].arrow().column("id").to_pylist(), table


def test_a_merge_into_a_parent_with_nested_rows_is_refused_and_an_append_keeps_them(
        owner: tuple[Owner, ServerProcess]) -> None:
    data, server = owner
    with connect(server.url) as catalog:
        dataset = catalog[DATASET]
        counts = _counts(catalog, "parent", "parent__kids")
        parents = dataset.parent.arrow()
        with pytest.raises(InvalidRequestError, match=r"nested data in child table\(s\) parent__kids.*nothing was written"):
            dataset.save(parents, table_name="parent")  # the default: merge, like the stored table
        assert _counts(catalog, "parent", "parent__kids") == counts
        dataset.save(parents.slice(0, 1), table_name="parent", write_disposition="append")
        assert _counts(catalog, "parent", "parent__kids") == {"parent": counts["parent"] + 1,
                                                              "parent__kids": counts["parent__kids"]}


def test_an_scd2_table_is_refused_up_front_in_plain_words(owner: tuple[Owner, ServerProcess]) -> None:
    data, server = owner
    if data.table_format == "delta":  # dlt has no scd2 on Delta (its merge strategies there: upsert, insert-only)
        with connect(server.url) as catalog:
            assert "history" not in catalog[DATASET].tables
        return
    before = _stored(data, "dict_pipeline")
    with connect(server.url) as catalog:
        history = catalog[DATASET].history.arrow()
        assert "_dlt_valid_from" in history.column_names and history.num_rows == 3
        with pytest.raises(InvalidRequestError, match="scd2 merge strategy.*table of your own; nothing was written"):
            catalog[DATASET].save(history, table_name="history")
        assert catalog[DATASET].history.arrow().num_rows == 3
    assert _stored(data, "dict_pipeline") == before


def test_a_new_table_lives_in_a_schema_of_its_own_and_survives_the_owners_next_run(
        owner: tuple[Owner, ServerProcess]) -> None:
    data, server = owner
    owners = _stored(data, "dict_pipeline")
    with connect(server.url) as catalog:
        info = catalog[DATASET].save(pa.table({"n": [1, 2]}), table_name="analyst_notes")
        assert info.schema_name == "out_source"
    assert _stored(data, "dict_pipeline") == owners  # the owner's schema never holds the table
    fresh = data.root / f"fresh_new_{datetime.datetime.now().timestamp()}"
    data.run("dict_pipeline", [{"id": 7, "score": 7}], fresh, name="variant")  # the owner's next run, own state
    with connect(server.url) as catalog:
        catalog.refresh()
        assert catalog[DATASET].analyst_notes.arrow().column("n").to_pylist() == [1, 2]
        catalog[DATASET].save(pa.table({"n": [3]}), table_name="analyst_notes")
        assert sorted(catalog[DATASET].analyst_notes.arrow().column("n").to_pylist()) == [1, 2, 3]
    assert _orphan_loads(data) == []
