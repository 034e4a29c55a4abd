"""Deterministic, locally generated GitHub-events sample and a dlt loader for it.

The sample mimics the shape of the public GitHub events API: every record has
``id``, ``type``, ``actor``, ``repo``, sometimes ``org``, ``public``,
``created_at`` and a type specific ``payload``. Loaded with dlt, nested dicts
become flattened columns and the two list-valued fields ``payload.commits``
(push events) and ``payload.pages`` (gollum events) become child tables, so a
load yields exactly the 15 tables in :data:`EVENT_TABLES` plus the 2 tables in
:data:`CHILD_TABLES`. No network access and no wall clock are involved: the
same ``(events, seed)`` always produces the same data.
"""

from __future__ import annotations

import random
import tempfile
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import dlt
from dlt.common.pipeline import LoadInfo
from dlt.common.schema.typing import TTableFormat
from dlt.extract.source import DltSource

__all__ = [
    "CHILD_TABLES",
    "DATASET_NAME",
    "EVENT_TABLES",
    "EVENT_WEIGHTS",
    "PIPELINE_NAME",
    "SCHEMA_NAME",
    "github_events",
    "load_demo",
]

Record = dict[str, Any]

SCHEMA_NAME = "events"
PIPELINE_NAME = "demo_github_events"
DATASET_NAME = "github_events_dataset"

EVENT_TABLES: tuple[str, ...] = (
    "pull_request_event",
    "issues_event",
    "watch_event",
    "push_event",
    "public_event",
    "pull_request_review_event",
    "create_event",
    "issue_comment_event",
    "delete_event",
    "fork_event",
    "release_event",
    "pull_request_review_comment_event",
    "gollum_event",
    "commit_comment_event",
    "member_event",
)
CHILD_TABLES: tuple[str, ...] = ("gollum_event__payload__pages", "push_event__payload__commits")

# Relative frequencies, roughly as seen on the public GitHub timeline.
EVENT_WEIGHTS: dict[str, float] = {
    "pull_request_event": 9.0,
    "issues_event": 4.0,
    "watch_event": 16.0,
    "push_event": 38.0,
    "public_event": 0.3,
    "pull_request_review_event": 3.5,
    "create_event": 11.0,
    "issue_comment_event": 7.0,
    "delete_event": 3.0,
    "fork_event": 3.0,
    "release_event": 1.0,
    "pull_request_review_comment_event": 2.5,
    "gollum_event": 0.6,
    "commit_comment_event": 0.4,
    "member_event": 0.3,
}

PAGE_SIZE = 5_000
BASE_TIME = datetime(2024, 3, 4, 6, 0, 0, tzinfo=UTC)
SPAN_SECONDS = 3 * 24 * 3600  # events are spread over three days
BASE_EVENT_ID = 36_000_000_000
API = "https://api.github.com"
WEB = "https://github.com"

_ADJECTIVES = (
    "quiet", "rapid", "brave", "lucky", "sunny", "cosmic", "tiny", "mighty", "clever", "silent",
    "amber", "crimson", "golden", "frozen", "wild", "gentle", "bold", "swift", "lazy", "noble",
)
_NOUNS = (
    "falcon", "otter", "panda", "comet", "river", "maple", "pixel", "rocket", "tiger", "harbor",
    "lambda", "vector", "kernel", "parser", "beacon", "canyon", "ember", "glacier", "meadow", "nebula",
)
_PROJECT_WORDS = (
    "api", "cli", "core", "data", "docs", "engine", "flow", "graph", "kit", "lab",
    "lint", "loader", "sdk", "server", "store", "sync", "ui", "utils", "web", "worker",
)
_VERBS = ("Fix", "Add", "Update", "Remove", "Refactor", "Improve", "Document", "Bump", "Support", "Handle")
_TOPICS = (
    "null pointer in parser", "CI workflow", "README examples", "retry logic", "config loading",
    "timezone handling", "memory leak in cache", "typing for public API", "dependency versions",
    "flaky integration test", "error messages", "pagination", "unicode paths", "logging setup",
    "build on Windows", "docker image", "benchmark suite", "CLI help text", "schema migration",
    "auth token refresh",
)
_BRANCH_PREFIXES = ("feature", "fix", "chore", "docs", "release", "refactor")
_COMMENTS = (
    "LGTM, thanks!", "Could you add a test for this?", "I can reproduce this on main.",
    "This looks good to me, one nit inline.", "Closing as duplicate.", "Any update on this?",
    "Works for me after the last commit.", "Can we split this into two PRs?",
    "Thanks for the report, looking into it.", "Please rebase on the latest main.",
)
_WIKI_PAGES = ("Home", "Installation", "FAQ", "Roadmap", "Contributing", "Architecture", "Changelog")
_LANGUAGES = ("Python", "Rust", "Go", "TypeScript", "JavaScript", "Java", "C++", "Ruby")
_LABEL_STATES = ("open", "closed")


class _Pools:
    """Deterministic pools of users, organisations and repositories."""

    def __init__(self, rng: random.Random, n_users: int = 800, n_orgs: int = 40, n_repos: int = 600) -> None:
        self.users: list[dict[str, Any]] = []
        seen: set[str] = set()
        while len(self.users) < n_users:
            login = f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}{rng.randint(1, 999)}"
            if login in seen:
                continue
            seen.add(login)
            self.users.append({"id": 1_000_000 + len(self.users) * 37, "login": login})
        self.orgs: list[dict[str, Any]] = []
        for i in range(n_orgs):
            login = f"{rng.choice(_NOUNS)}-{rng.choice(('labs', 'io', 'dev', 'hq', 'team'))}{i}"
            self.orgs.append({"id": 5_000_000 + i * 101, "login": login})
        self.repos: list[dict[str, Any]] = []
        for i in range(n_repos):
            owner_org = self.orgs[rng.randrange(n_orgs)] if rng.random() < 0.35 else None
            owner = owner_org["login"] if owner_org else self.users[rng.randrange(n_users)]["login"]
            name = f"{rng.choice(_NOUNS)}-{rng.choice(_PROJECT_WORDS)}"
            self.repos.append(
                {"id": 70_000_000 + i * 13, "name": f"{owner}/{name}", "org": owner_org}
            )


def _sha(rng: random.Random) -> str:
    """Return a random 40 hex digit git sha."""
    return f"{rng.getrandbits(160):040x}"


def _user(user: dict[str, Any]) -> Record:
    """Return a compact GitHub user object."""
    return {"id": user["id"], "login": user["login"], "type": "User", "url": f"{API}/users/{user['login']}"}


def _title(rng: random.Random) -> str:
    """Return an issue / pull request like title."""
    return f"{rng.choice(_VERBS)} {rng.choice(_TOPICS)}"


class _EventFactory:
    """Builds the type specific payloads for one generation run."""

    def __init__(self, rng: random.Random, pools: _Pools) -> None:
        self.rng = rng
        self.pools = pools
        self.builders: dict[str, Callable[[Record, datetime], Record]] = {
            "pull_request_event": self._pull_request,
            "issues_event": self._issues,
            "watch_event": self._watch,
            "push_event": self._push,
            "public_event": self._public,
            "pull_request_review_event": self._pull_request_review,
            "create_event": self._create,
            "issue_comment_event": self._issue_comment,
            "delete_event": self._delete,
            "fork_event": self._fork,
            "release_event": self._release,
            "pull_request_review_comment_event": self._pull_request_review_comment,
            "gollum_event": self._gollum,
            "commit_comment_event": self._commit_comment,
            "member_event": self._member,
        }

    def event(self, index: int, table: str, created_at: datetime) -> Record:
        """Return one complete event record of the given table/type."""
        rng = self.rng
        actor = self.pools.users[rng.randrange(len(self.pools.users))]
        repo = self.pools.repos[rng.randrange(len(self.pools.repos))]
        record: Record = {
            "id": str(BASE_EVENT_ID + index),
            "type": "".join(part.capitalize() for part in table.split("_")),
            "actor": {
                "id": actor["id"],
                "login": actor["login"],
                "display_login": actor["login"],
                "url": f"{API}/users/{actor['login']}",
            },
            "repo": {"id": repo["id"], "name": repo["name"], "url": f"{API}/repos/{repo['name']}"},
            "public": table != "member_event" or rng.random() < 0.9,
            "created_at": created_at,
        }
        if repo["org"] is not None:
            org = repo["org"]
            record["org"] = {"id": org["id"], "login": org["login"], "url": f"{API}/orgs/{org['login']}"}
        record["payload"] = self.builders[table](repo, created_at)
        return record

    # -- helpers -------------------------------------------------------------------------------
    def _some_user(self) -> dict[str, Any]:
        return self.pools.users[self.rng.randrange(len(self.pools.users))]

    def _earlier(self, created_at: datetime, max_days: int = 60) -> datetime:
        return created_at - timedelta(seconds=self.rng.randint(60, max_days * 86400))

    def _issue(self, repo: Record, created_at: datetime, state: str | None = None) -> Record:
        rng = self.rng
        number = rng.randint(1, 4000)
        return {
            "id": 2_000_000_000 + number * 7 + repo["id"] % 1000,
            "number": number,
            "title": _title(rng),
            "state": state or rng.choice(_LABEL_STATES),
            "locked": rng.random() < 0.02,
            "comments": rng.randint(0, 40),
            "created_at": self._earlier(created_at),
            "updated_at": created_at,
            "author_association": rng.choice(("OWNER", "MEMBER", "CONTRIBUTOR", "NONE")),
            "html_url": f"{WEB}/{repo['name']}/issues/{number}",
            "user": _user(self._some_user()),
        }

    def _pr(self, repo: Record, created_at: datetime, state: str | None = None) -> Record:
        rng = self.rng
        number = rng.randint(1, 4000)
        merged = state == "closed" and rng.random() < 0.7
        return {
            "id": 1_500_000_000 + number * 11 + repo["id"] % 1000,
            "number": number,
            "title": _title(rng),
            "state": state or rng.choice(_LABEL_STATES),
            "draft": rng.random() < 0.1,
            "merged": merged,
            "commits": rng.randint(1, 25),
            "additions": rng.randint(0, 2000),
            "deletions": rng.randint(0, 800),
            "changed_files": rng.randint(1, 60),
            "created_at": self._earlier(created_at, 14),
            "updated_at": created_at,
            "html_url": f"{WEB}/{repo['name']}/pull/{number}",
            "user": _user(self._some_user()),
            "head": {"ref": f"{rng.choice(_BRANCH_PREFIXES)}/{rng.choice(_NOUNS)}", "sha": _sha(rng)},
            "base": {"ref": "main", "sha": _sha(rng)},
        }

    # -- payload builders ----------------------------------------------------------------------
    def _pull_request(self, repo: Record, created_at: datetime) -> Record:
        action = self.rng.choice(("opened", "opened", "closed", "closed", "reopened", "synchronize"))
        pr = self._pr(repo, created_at, "closed" if action == "closed" else "open")
        return {"action": action, "number": pr["number"], "pull_request": pr}

    def _issues(self, repo: Record, created_at: datetime) -> Record:
        action = self.rng.choice(("opened", "opened", "closed", "reopened", "labeled"))
        return {"action": action, "issue": self._issue(repo, created_at, "closed" if action == "closed" else "open")}

    def _watch(self, repo: Record, created_at: datetime) -> Record:
        return {"action": "started"}

    def _push(self, repo: Record, created_at: datetime) -> Record:
        rng = self.rng
        n = rng.randint(1, 4)
        commits = []
        for _ in range(n):
            author = self._some_user()
            sha = _sha(rng)
            commits.append(
                {
                    "sha": sha,
                    "author": {
                        "name": author["login"].replace("-", " ").title(),
                        "email": f"{author['login']}@users.noreply.github.com",
                    },
                    "message": _title(rng),
                    "distinct": rng.random() < 0.95,
                    "url": f"{API}/repos/{repo['name']}/commits/{sha}",
                }
            )
        return {
            "repository_id": repo["id"],
            "push_id": 17_000_000_000 + rng.getrandbits(30),
            "size": n,
            "distinct_size": sum(1 for c in commits if c["distinct"]),
            "ref": rng.choice(
                (
                    "refs/heads/main",
                    "refs/heads/main",
                    "refs/heads/dev",
                    f"refs/heads/{rng.choice(_BRANCH_PREFIXES)}/{rng.choice(_NOUNS)}",
                )
            ),
            "head": commits[-1]["sha"],
            "before": _sha(rng),
            "commits": commits,
        }

    def _public(self, repo: Record, created_at: datetime) -> Record:
        return {}

    def _pull_request_review(self, repo: Record, created_at: datetime) -> Record:
        rng = self.rng
        pr = self._pr(repo, created_at, "open")
        return {
            "action": "created",
            "review": {
                "id": 1_900_000_000 + rng.getrandbits(28),
                "user": _user(self._some_user()),
                "body": rng.choice(_COMMENTS),
                "state": rng.choice(("approved", "commented", "changes_requested")),
                "submitted_at": created_at,
                "html_url": f"{pr['html_url']}#pullrequestreview-{rng.getrandbits(28)}",
            },
            "pull_request": pr,
        }

    def _create(self, repo: Record, created_at: datetime) -> Record:
        rng = self.rng
        ref_type = rng.choice(("branch", "branch", "tag", "repository"))
        ref = None
        if ref_type == "branch":
            ref = f"{rng.choice(_BRANCH_PREFIXES)}/{rng.choice(_NOUNS)}"
        elif ref_type == "tag":
            ref = f"v{rng.randint(0, 5)}.{rng.randint(0, 20)}.{rng.randint(0, 9)}"
        payload: Record = {
            "ref_type": ref_type,
            "master_branch": "main",
            "description": f"A {rng.choice(_ADJECTIVES)} {rng.choice(_LANGUAGES)} {rng.choice(_PROJECT_WORDS)}",
            "pusher_type": "user",
        }
        if ref is not None:
            payload["ref"] = ref
        return payload

    def _issue_comment(self, repo: Record, created_at: datetime) -> Record:
        rng = self.rng
        issue = self._issue(repo, created_at, "open")
        return {
            "action": "created",
            "issue": issue,
            "comment": {
                "id": 2_100_000_000 + rng.getrandbits(28),
                "user": _user(self._some_user()),
                "body": rng.choice(_COMMENTS),
                "created_at": created_at,
                "html_url": f"{issue['html_url']}#issuecomment-{rng.getrandbits(28)}",
            },
        }

    def _delete(self, repo: Record, created_at: datetime) -> Record:
        rng = self.rng
        if rng.random() < 0.85:
            branch = f"{rng.choice(_BRANCH_PREFIXES)}/{rng.choice(_NOUNS)}"
            return {"ref": branch, "ref_type": "branch", "pusher_type": "user"}
        return {"ref": f"v0.{rng.randint(0, 20)}.{rng.randint(0, 9)}-rc", "ref_type": "tag", "pusher_type": "user"}

    def _fork(self, repo: Record, created_at: datetime) -> Record:
        rng = self.rng
        owner = self._some_user()
        name = f"{owner['login']}/{repo['name'].split('/', 1)[1]}"
        return {
            "forkee": {
                "id": 800_000_000 + rng.getrandbits(26),
                "name": name.split("/", 1)[1],
                "full_name": name,
                "private": False,
                "fork": True,
                "owner": _user(owner),
                "html_url": f"{WEB}/{name}",
                "created_at": created_at,
                "stargazers_count": 0,
                "language": rng.choice(_LANGUAGES),
                "default_branch": "main",
            }
        }

    def _release(self, repo: Record, created_at: datetime) -> Record:
        rng = self.rng
        tag = f"v{rng.randint(0, 5)}.{rng.randint(0, 20)}.{rng.randint(0, 9)}"
        return {
            "action": "published",
            "release": {
                "id": 150_000_000 + rng.getrandbits(24),
                "tag_name": tag,
                "name": f"Release {tag}",
                "target_commitish": "main",
                "draft": False,
                "prerelease": rng.random() < 0.15,
                "author": _user(self._some_user()),
                "created_at": self._earlier(created_at, 2),
                "published_at": created_at,
                "html_url": f"{WEB}/{repo['name']}/releases/tag/{tag}",
                "body": f"{_title(rng)} and {_title(rng).lower()}.",
            },
        }

    def _pull_request_review_comment(self, repo: Record, created_at: datetime) -> Record:
        rng = self.rng
        pr = self._pr(repo, created_at, "open")
        return {
            "action": "created",
            "comment": {
                "id": 1_700_000_000 + rng.getrandbits(28),
                "user": _user(self._some_user()),
                "body": rng.choice(_COMMENTS),
                "path": f"src/{rng.choice(_PROJECT_WORDS)}/{rng.choice(_NOUNS)}.py",
                "line": rng.randint(1, 900),
                "commit_id": pr["head"]["sha"],
                "created_at": created_at,
                "html_url": f"{pr['html_url']}#discussion_r{rng.getrandbits(28)}",
            },
            "pull_request": pr,
        }

    def _gollum(self, repo: Record, created_at: datetime) -> Record:
        rng = self.rng
        pages = []
        for page_name in rng.sample(_WIKI_PAGES, rng.randint(1, 3)):
            pages.append(
                {
                    "page_name": page_name,
                    "title": page_name.replace("-", " "),
                    "action": rng.choice(("created", "edited", "edited")),
                    "sha": _sha(rng),
                    "html_url": f"{WEB}/{repo['name']}/wiki/{page_name}",
                }
            )
        return {"pages": pages}

    def _commit_comment(self, repo: Record, created_at: datetime) -> Record:
        rng = self.rng
        sha = _sha(rng)
        return {
            "comment": {
                "id": 140_000_000 + rng.getrandbits(24),
                "user": _user(self._some_user()),
                "commit_id": sha,
                "body": rng.choice(_COMMENTS),
                "created_at": created_at,
                "html_url": f"{WEB}/{repo['name']}/commit/{sha}#commitcomment-{rng.getrandbits(24)}",
            }
        }

    def _member(self, repo: Record, created_at: datetime) -> Record:
        return {"action": "added", "member": _user(self._some_user())}


def generate_pages(events: int = 2000, seed: int = 42, page_size: int = PAGE_SIZE) -> Iterator[dict[str, list[Record]]]:
    """Yield the sample as pages, each a mapping of table name -> records of that table.

    Pages hold at most ``page_size`` records in total; the whole sample is never
    materialised. Every table gets at least one record when ``events >= 15``.
    """
    if events < 0:
        raise ValueError("events must be >= 0")
    if page_size < 1:
        raise ValueError("page_size must be >= 1")
    rng = random.Random(seed)
    factory = _EventFactory(rng, _Pools(rng))
    # one guaranteed record per type at positions chosen by the seed
    forced: dict[int, str] = {}
    if events >= len(EVENT_TABLES):
        forced = dict(zip(rng.sample(range(events), len(EVENT_TABLES)), EVENT_TABLES))
    weights = [EVENT_WEIGHTS[t] for t in EVENT_TABLES]
    step = SPAN_SECONDS / max(events, 1)
    for start in range(0, events, page_size):
        stop = min(start + page_size, events)
        drawn = rng.choices(EVENT_TABLES, weights=weights, k=stop - start)
        page: dict[str, list[Record]] = {}
        for offset, index in enumerate(range(start, stop)):
            table = forced.get(index) or drawn[offset]
            created_at = BASE_TIME + timedelta(seconds=int((index + rng.random()) * step))
            page.setdefault(table, []).append(factory.event(index, table, created_at))
        yield page


@dlt.source(name=SCHEMA_NAME)
def github_events(events: int = 2000, seed: int = 42) -> Any:
    """dlt source (schema ``events``) with ``events`` GitHub-like event records.

    A single resource routes pages of records to one table per event type;
    ``payload.commits`` and ``payload.pages`` become child tables.
    """

    @dlt.resource(name="github_events", write_disposition="replace")
    def github_event_pages() -> Iterator[Any]:
        for page in generate_pages(events, seed):
            # stable table order inside a page keeps extraction deterministic
            for table in EVENT_TABLES:
                rows = page.get(table)
                if rows:
                    yield dlt.mark.with_table_name(rows, table)

    return github_event_pages


def _file_format(destination: Any) -> Any:
    """Prefer parquet (much faster and leaner than SQL inserts) when the destination takes it."""
    try:
        formats = destination.capabilities().supported_loader_file_formats
    except Exception:  # not a factory (e.g. a destination name): let dlt decide
        return None
    return "parquet" if "parquet" in formats else None


def load_demo(
    destination: Any,
    dataset_name: str = DATASET_NAME,
    events: int = 2000,
    seed: int = 42,
    pipelines_dir: str | None = None,
    table_format: TTableFormat | None = None,
) -> LoadInfo:
    """Load the demo sample into ``destination`` (a dlt destination factory) and return the LoadInfo.

    Uses pipeline ``demo_github_events`` with write disposition ``replace``; when
    ``pipelines_dir`` is None a fresh temporary directory holds the pipeline's
    working state (it is left in place so the returned LoadInfo stays usable).
    ``table_format`` (``"delta"``) is set on the resource, so every table it creates — the
    dynamically named event tables and their child tables — is written in that format; dlt's
    ``filesystem`` destination needs it to write Delta tables.
    """
    if pipelines_dir is None:
        pipelines_dir = tempfile.mkdtemp(prefix="flight_share_demo_")
    pipeline = dlt.pipeline(
        pipeline_name=PIPELINE_NAME,
        pipelines_dir=pipelines_dir,
        destination=destination,
        dataset_name=dataset_name,
    )
    source: DltSource = github_events(events=events, seed=seed)
    if table_format is not None:
        for resource in source.resources.values():
            resource.apply_hints(table_format=table_format)
    info = pipeline.run(
        source,
        write_disposition="replace",
        refresh="drop_data",  # also empties tables that get no rows in this run
        loader_file_format=_file_format(destination),
    )
    info.raise_on_failed_jobs()
    return info
