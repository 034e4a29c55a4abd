"""Queries the fairness tests and benchmarks send as a careless or greedy client would."""

from __future__ import annotations


def long_query(i: int) -> str:
    """A valid query of almost 100,000 characters: costly to parse (a long IN list), cheap to run."""
    values, size, n = [], 60, 0
    while size < 100_000 - 80:
        values.append(str(n))
        size += len(str(n)) + 2
        n += 1
    return f"SELECT {i} AS one WHERE {i} IN ({', '.join(values)})"
