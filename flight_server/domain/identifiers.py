"""SQL identifiers, quoted once for every engine here (duckdb and PostgreSQL read ``"a""b"`` alike)."""


def quote(name: str) -> str:
    """``name`` as a quoted SQL identifier."""
    return '"' + name.replace('"', '""') + '"'
