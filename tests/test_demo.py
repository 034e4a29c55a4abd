"""Tests for the deterministic GitHub-events demo sample and its dlt loader."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import dlt
import duckdb
import pytest

from flight_server.cli.demo import (
    CHILD_TABLES,
    EVENT_TABLES,
    generate_pages,
    github_events,
    load_demo,
)

DATASET = "github_events_dataset"
EVENTS = 300
PARENT_OF = {"push_event__payload__commits": "push_event", "gollum_event__payload__pages": "gollum_event"}


def _load(db_path: Path, pipelines_dir: Path, events: int = EVENTS, seed: int = 42) -> Any:
    """Load the demo into a duckdb file and return the LoadInfo."""
    return load_demo(
        dlt.destinations.duckdb(str(db_path)),
        dataset_name=DATASET,
        events=events,
        seed=seed,
        pipelines_dir=str(pipelines_dir),
    )


def _tables(db_path: Path) -> set[str]:
    """Return the table names in the demo dataset."""
    with duckdb.connect(str(db_path), read_only=True) as con:
        rows = con.execute(
            "select table_name from information_schema.tables where table_schema = ?", [DATASET]
        ).fetchall()
    return {r[0] for r in rows}


def _count(con: duckdb.DuckDBPyConnection, table: str) -> int:
    return con.execute(f'select count(*) from {DATASET}."{table}"').fetchone()[0]  # type: ignore[index]


def _data_rows(db_path: Path, table: str) -> list[tuple[Any, ...]]:
    """Return all non-dlt columns of an event table, ordered by event id."""
    with duckdb.connect(str(db_path), read_only=True) as con:
        cols = [
            r[0]
            for r in con.execute(f'describe {DATASET}."{table}"').fetchall()
            if not r[0].startswith("_dlt_")
        ]
        sql = f'select {", ".join(cols)} from {DATASET}."{table}" order by id'
        return con.execute(sql).fetchall()


def _child_rows(db_path: Path, child: str) -> list[tuple[Any, ...]]:
    """Return child rows keyed by their parent event id (dlt ids differ between loads)."""
    with duckdb.connect(str(db_path), read_only=True) as con:
        cols = [
            r[0]
            for r in con.execute(f'describe {DATASET}."{child}"').fetchall()
            if not r[0].startswith("_dlt_")
        ]
        select = ", ".join(f"c.{c}" for c in cols)
        sql = (
            f'select p.id, c._dlt_list_idx, {select} from {DATASET}."{child}" c '
            f'join {DATASET}."{PARENT_OF[child]}" p on c._dlt_parent_id = p._dlt_id '
            "order by p.id, c._dlt_list_idx"
        )
        return con.execute(sql).fetchall()


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """One demo load of 300 events (seed 42) shared by the read-only tests."""
    root = tmp_path_factory.mktemp("demo")
    db_path = root / "demo.duckdb"
    info = _load(db_path, root / "pipelines")
    return db_path, info


def test_constants() -> None:
    assert len(EVENT_TABLES) == 15
    assert len(set(EVENT_TABLES)) == 15
    assert EVENT_TABLES[0] == "pull_request_event"
    assert EVENT_TABLES[-1] == "member_event"
    assert CHILD_TABLES == ("gollum_event__payload__pages", "push_event__payload__commits")


def test_load_info(loaded: tuple[Path, Any]) -> None:
    _, info = loaded
    assert not info.has_failed_jobs
    assert info.pipeline.pipeline_name == "demo_github_events"
    assert info.dataset_name == DATASET
    assert info.pipeline.default_schema_name == "events"
    assert len(info.loads_ids) == 1


def test_exactly_expected_tables(loaded: tuple[Path, Any]) -> None:
    db_path, _ = loaded
    tables = _tables(db_path)
    data_tables = {t for t in tables if not t.startswith("_dlt_")}
    assert data_tables == set(EVENT_TABLES) | set(CHILD_TABLES)
    assert len(data_tables) == 17
    assert {"_dlt_loads", "_dlt_version", "_dlt_pipeline_state"} <= tables


def test_schema_name_and_version(loaded: tuple[Path, Any]) -> None:
    db_path, _ = loaded
    dataset = dlt.dataset(dlt.destinations.duckdb(str(db_path)), DATASET)
    assert dataset.schema.name == "events"
    assert set(dataset.schema.data_table_names()) == set(EVENT_TABLES) | set(CHILD_TABLES)
    with duckdb.connect(str(db_path), read_only=True) as con:
        versions = con.execute(f"select schema_name, version from {DATASET}._dlt_version").fetchall()
    assert [v[0] for v in versions] == ["events"]
    assert versions[0][1] >= 1


def test_row_counts(loaded: tuple[Path, Any]) -> None:
    db_path, _ = loaded
    with duckdb.connect(str(db_path), read_only=True) as con:
        counts = {t: _count(con, t) for t in EVENT_TABLES}
        # each table holds only its own type, ids are unique across all tables
        for table in EVENT_TABLES:
            types = con.execute(f"select distinct type from {DATASET}.{table}").fetchall()
            assert types == [("".join(p.capitalize() for p in table.split("_")),)]
        union = " union all ".join(f"select id from {DATASET}.{t}" for t in EVENT_TABLES)
        assert con.execute(f"select count(distinct id) from ({union})").fetchone()[0] == EVENTS  # type: ignore[index]
    assert all(n >= 1 for n in counts.values()), counts
    assert sum(counts.values()) == EVENTS
    # realistic skew: push and watch dominate, member/public are rare
    assert counts["push_event"] == max(counts.values())
    assert counts["watch_event"] > counts["member_event"]
    assert counts["push_event"] > 10 * counts["public_event"]


def test_columns_flattened(loaded: tuple[Path, Any]) -> None:
    db_path, _ = loaded
    with duckdb.connect(str(db_path), read_only=True) as con:
        push_cols = {r[0]: r[1] for r in con.execute(f"describe {DATASET}.push_event").fetchall()}
        issue_cols = {r[0] for r in con.execute(f"describe {DATASET}.issues_event").fetchall()}
        span_sql = f"select min(created_at), max(created_at) from {DATASET}.push_event"
        lo, hi = con.execute(span_sql).fetchone()  # type: ignore[misc]
    for col in ("id", "type", "actor__login", "actor__display_login", "repo__name", "public",
                "payload__push_id", "payload__size", "payload__ref", "payload__head", "payload__before"):
        assert col in push_cols, col
    assert push_cols["created_at"] == "TIMESTAMP WITH TIME ZONE"
    assert push_cols["id"] == "VARCHAR"
    assert {"payload__action", "payload__issue__number", "payload__issue__title",
            "payload__issue__state", "payload__issue__user__login"} <= issue_cols
    assert lo.year == 2024 and hi.year == 2024
    assert 1 <= (hi - lo).days <= 5


def test_child_tables_linked(loaded: tuple[Path, Any]) -> None:
    db_path, _ = loaded
    with duckdb.connect(str(db_path), read_only=True) as con:
        for child, parent in PARENT_OF.items():
            assert _count(con, child) >= 1
            orphans = con.execute(
                f"select count(*) from {DATASET}.{child} c left join {DATASET}.{parent} p "
                "on c._dlt_parent_id = p._dlt_id where p._dlt_id is null"
            ).fetchone()[0]  # type: ignore[index]
            assert orphans == 0, child
            # every parent has at least one child row
            childless = con.execute(
                f"select count(*) from {DATASET}.{parent} p where not exists "
                f"(select 1 from {DATASET}.{child} c where c._dlt_parent_id = p._dlt_id)"
            ).fetchone()[0]  # type: ignore[index]
            assert childless == 0, parent
        per_push = con.execute(
            f"select p.payload__size, count(*) from {DATASET}.push_event p join "
            f"{DATASET}.push_event__payload__commits c on c._dlt_parent_id = p._dlt_id "
            "group by p._dlt_id, p.payload__size"
        ).fetchall()
        assert all(size == n and 1 <= n <= 4 for size, n in per_push)
        head_matches = con.execute(
            f"select count(*) from {DATASET}.push_event p join {DATASET}.push_event__payload__commits c "
            "on c._dlt_parent_id = p._dlt_id and c._dlt_list_idx = p.payload__size - 1 "
            "where c.sha = p.payload__head"
        ).fetchone()[0]  # type: ignore[index]
        assert head_matches == _count(con, "push_event")
        commit_cols = {r[0] for r in con.execute(f"describe {DATASET}.push_event__payload__commits").fetchall()}
        page_cols = {r[0] for r in con.execute(f"describe {DATASET}.gollum_event__payload__pages").fetchall()}
    assert {"sha", "author__name", "author__email", "message", "distinct", "url"} <= commit_cols
    assert {"page_name", "title", "action", "sha", "html_url"} <= page_cols


def test_same_seed_same_data_different_seed_differs(loaded: tuple[Path, Any], tmp_path: Path) -> None:
    db_a, _ = loaded
    db_b = tmp_path / "b.duckdb"
    db_c = tmp_path / "c.duckdb"
    _load(db_b, tmp_path / "pb", seed=42)
    _load(db_c, tmp_path / "pc", seed=7)
    for table in ("push_event", "issues_event", "pull_request_event", "gollum_event", "member_event"):
        rows_a = _data_rows(db_a, table)
        assert rows_a, table
        assert rows_a == _data_rows(db_b, table), table
    for child in CHILD_TABLES:
        rows_a = _child_rows(db_a, child)
        assert rows_a
        assert rows_a == _child_rows(db_b, child)
    assert _data_rows(db_a, "push_event") != _data_rows(db_c, "push_event")
    assert _child_rows(db_a, "push_event__payload__commits") != _child_rows(db_c, "push_event__payload__commits")


def test_generator_deterministic_and_paged() -> None:
    first = list(generate_pages(1200, seed=3, page_size=500))
    again = list(generate_pages(1200, seed=3, page_size=500))
    other = list(generate_pages(1200, seed=4, page_size=500))
    assert first == again
    assert first != other
    assert [sum(len(v) for v in page.values()) for page in first] == [500, 500, 200]
    ids = [rec["id"] for page in first for recs in page.values() for rec in recs]
    assert len(ids) == len(set(ids)) == 1200


def _list_paths(value: Any, path: str = "") -> set[str]:
    """Return the dotted paths of all list-valued fields in a nested record."""
    found: set[str] = set()
    if isinstance(value, dict):
        for key, sub in value.items():
            found |= _list_paths(sub, f"{path}.{key}" if path else key)
    elif isinstance(value, list):
        found.add(path)
        for item in value:
            found |= _list_paths(item, path)
    return found


def test_record_shape() -> None:
    lists: set[str] = set()
    seen: Counter[str] = Counter()
    for page in generate_pages(15, seed=1):
        for table, records in page.items():
            for rec in records:
                seen[table] += 1
                assert isinstance(rec["id"], str)
                assert {"id", "type", "actor", "repo", "public", "created_at", "payload"} <= rec.keys()
                assert {"id", "login", "display_login", "url"} <= rec["actor"].keys()
                assert {"id", "name", "url"} <= rec["repo"].keys()
                assert isinstance(rec["public"], bool)
                assert rec["created_at"].tzinfo is not None
                lists |= _list_paths(rec)
                if table == "push_event":
                    assert 1 <= len(rec["payload"]["commits"]) <= 4
                if table == "gollum_event":
                    assert 1 <= len(rec["payload"]["pages"]) <= 3
    # events == number of types: exactly one of each
    assert seen == Counter({t: 1 for t in EVENT_TABLES})
    assert lists == {"payload.commits", "payload.pages"}


def test_source_name_and_small_counts() -> None:
    source = github_events(events=10, seed=5)
    assert source.name == "events"
    assert sum(len(v) for page in generate_pages(10, seed=5) for v in page.values()) == 10
    assert list(generate_pages(0)) == []
    with pytest.raises(ValueError):
        list(generate_pages(-1))


def test_replace_is_idempotent(tmp_path: Path) -> None:
    db_path = tmp_path / "r.duckdb"
    pipelines = tmp_path / "pipelines"
    _load(db_path, pipelines, events=EVENTS)
    _load(db_path, pipelines, events=EVENTS)
    with duckdb.connect(str(db_path), read_only=True) as con:
        assert sum(_count(con, t) for t in EVENT_TABLES) == EVENTS
    # a smaller reload leaves no stale rows behind, also in tables it does not touch
    _load(db_path, pipelines, events=5, seed=9)
    expected = Counter({t: len(recs) for page in generate_pages(5, seed=9) for t, recs in page.items()})
    assert len(expected) < len(EVENT_TABLES)  # some tables get no rows in this reload
    with duckdb.connect(str(db_path), read_only=True) as con:
        assert {t: _count(con, t) for t in EVENT_TABLES} == {t: expected[t] for t in EVENT_TABLES}
        commits = sum(
            len(rec["payload"]["commits"])
            for page in generate_pages(5, seed=9)
            for rec in page.get("push_event", [])
        )
        assert _count(con, "push_event__payload__commits") == commits
        assert _count(con, "_dlt_loads") == 3


def test_existing_connection_destination(tmp_path: Path) -> None:
    con = duckdb.connect(str(tmp_path / "conn.duckdb"))
    try:
        info = load_demo(dlt.destinations.duckdb(con), events=40, seed=2, pipelines_dir=str(tmp_path / "p"))
        assert not info.has_failed_jobs
        total = sum(_count(con, t) for t in EVENT_TABLES)
        assert total == 40
    finally:
        con.close()
