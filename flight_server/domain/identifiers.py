"""SQL identifiers and string literals, quoted once for every engine here (duckdb, PostgreSQL and SQLite read
``"a""b"`` and ``'a''b'`` alike; with PostgreSQL's standard_conforming_strings, on by default since 9.1, a
backslash in a literal is just a backslash). Where a driver binds parameters, bind instead."""


def quote(name: str) -> str:
    """``name`` as a quoted SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


def literal(text: str) -> str:
    """``text`` as a SQL string literal."""
    return "'" + text.replace("'", "''") + "'"
