"""Parsing a statement once, in the server process, with the parser shared fairly, and its errors in SQL terms.

sqlglot (which dlt already depends on) parses; the allow-list (:mod:`~flight_server.domain.sql.check`) then
decides what reaches a worker at all. Parsing costs CPU and memory in proportion to the text: its time is
bounded by :data:`MAX_QUERY_CHARS`, its memory by letting few analyses run at once, fairly by user.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import sqlglot
from sqlglot import exp

from flight_server.domain.errors import InvalidRequest, SqlSyntaxError
from flight_server.domain.fair import FairShare

# parsing and analysing cost CPU in proportion to the text: real queries are far shorter than this
MAX_QUERY_CHARS = 100_000

# Parsing runs in the server process (the allow-list decides what reaches a worker at all). Its time is
# bounded by MAX_QUERY_CHARS (~2 s at most for 100,000 characters); its memory (sqlglot's tree, up to
# ~100 MB for the longest query) by letting only this many analyses run at once - and, so that one user's
# long queries cannot keep another's ``SELECT 1`` waiting (issue 22), at most one of them per user, the
# waiting ones served round-robin by user (domain/fair.py). A dashboard refreshing its tiles sends a burst of
# a dozen at once: they wait their turn (review of issue 22, F5: 4 of 10 were refused on an idle server).
MAX_CONCURRENT_ANALYSES = 2
ANALYSES_PER_USER = 1
ANALYSES_WAITING_PER_USER = 12
_ANALYSIS_WAIT_SECONDS = 30.0
_ANALYSES = FairShare(MAX_CONCURRENT_ANALYSES, ANALYSES_PER_USER, ANALYSES_WAITING_PER_USER,
                      "query analysis", "analyses per user", "query analyses")


@contextlib.contextmanager
def analysing(dataset: str | None, user: str | None) -> Iterator[None]:
    """Hold one of the parser's fair-share slots (:data:`ANALYSES_PER_USER` per user) while analysing."""
    key = user or ""
    _ANALYSES.acquire(key, _ANALYSIS_WAIT_SECONDS, dataset=dataset)
    try:
        yield
    finally:
        _ANALYSES.release(key)


def parse_one(sql: str, dialect: str, dataset: str | None) -> exp.Expression:
    """The one statement of ``sql``, comments dropped; refused when too long, not one statement, or not SQL."""
    if len(sql) > MAX_QUERY_CHARS:
        raise InvalidRequest(f"query is {len(sql):,} characters; at most {MAX_QUERY_CHARS:,} allowed", dataset=dataset)
    try:
        statements = [s for s in sqlglot.parse(sql, read=dialect) if s is not None]
    except sqlglot.errors.ParseError as exc:
        error = exc.errors[0] if exc.errors else {}
        raise SqlSyntaxError(syntax_error(exc), dataset=dataset, line=error.get("line"), column=error.get("col"),
                             near=str(error.get("highlight") or "")[:80]) from None
    except sqlglot.errors.TokenError as exc:
        raise SqlSyntaxError(_token_error(exc), dataset=dataset) from None
    except RecursionError:
        raise InvalidRequest("query is nested too deeply", dataset=dataset) from None
    if len(statements) != 1:
        raise InvalidRequest(f"exactly one SQL statement is allowed, got {len(statements)}", dataset=dataset)
    tree = statements[0]
    # What runs is generated from this tree, so it must hold nothing the checks do not see: sqlglot keeps
    # comments and writes a ``--`` comment back as ``/* ... */``, and ``-- */ PAYLOAD /*`` then becomes live
    # SQL in the text the engine runs (issue 22). Comments are dropped here, once, for every later use.
    for node in tree.walk():
        node.comments = None
    return tree


def parse_statement(sql: str, dialect: str = "duckdb", *, user: str | None = None) -> exp.Expression:
    """The one statement of ``sql``, parsed once per request: :func:`referenced_datasets`,
    :func:`parameter_count` and :func:`check_query` take the tree too (parsing is the costly part of
    analysing a long statement, and runs in the server process). ``user``: the caller, for the fair share
    of the parser (one analysis per user at a time)."""
    with analysing(None, user):
        return parse_one(sql, dialect, None)


# sqlglot's own descriptions, in SQL terms; "Required keyword: 'expression' missing for <class
# 'sqlglot.expressions.Mul'>" names the parser's classes, not anything the user wrote
_SYNTAX_HINTS: tuple[tuple[str, str], ...] = (
    ("Required keyword", "something is missing here (an operand, a name or a clause's body)"),
    ("Expecting )", "a ')' is missing"),
    ("Expected table name", "a table name is missing"),
    ("Invalid expression / Unexpected token", "unexpected word or symbol"),
)


def syntax_error(exc: sqlglot.errors.ParseError) -> str:
    """``syntax error near '*' at line 1, column 10: ...`` from sqlglot's structured error."""
    error = exc.errors[0] if exc.errors else {}
    near = str(error.get("highlight") or "").strip()[:80]
    where = f" near '{near}'" if near else " at the end of the query"
    if error.get("line"):
        where += f" at line {error['line']}, column {error.get('col', 0)}"
    description = str(error.get("description") or "")
    before = str(error.get("start_context") or "").split()
    if near and before and description.startswith("Invalid expression / Unexpected token"):
        # the word before is often the mistake ("SELECT * FORM t": FORM reads as an alias, t is unexpected)
        where += f" (after '{before[-1][-40:]}')"
    hint = next((text for prefix, text in _SYNTAX_HINTS if description.startswith(prefix)), None)
    if hint is None:
        hint = description if description and "<class" not in description and "sqlglot" not in description else ""
    return f"syntax error{where}" + (f": {hint}" if hint else "")


def _token_error(exc: sqlglot.errors.TokenError) -> str:
    # sqlglot says "Error tokenizing '<the text up to the problem>'": keep only the end of that text
    text = str(exc)
    context = text.split("Error tokenizing '", 1)[-1].rstrip("'")[-40:]
    return f"syntax error near '{context}': an unterminated quote, quoted name or comment"
