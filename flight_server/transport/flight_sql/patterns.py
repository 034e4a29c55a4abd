"""Flight SQL's filter patterns (LIKE's ``%`` and ``_``, with ``\\`` escapes) of GetDbSchemas and GetTables,
matched without backtracking."""

from __future__ import annotations

from collections.abc import Callable

from flight_server.domain.errors import InvalidRequest


def like(pattern: str | None) -> Callable[[str], bool]:
    """A Flight SQL filter pattern (``%`` any run, ``_`` one character, ``\\`` escapes) as a predicate.

    Matched in time linear in the pattern plus (name length x longest ``%``-free piece), never by
    backtracking: the pattern splits at ``%`` into pieces, the first anchored at the start, the last at
    the end, and every piece between at its leftmost place after the previous one (leftmost is always
    safe: a later place leaves less room for the rest). ``\\`` takes the next character literally (the
    server reports ``\\`` as SQL_SEARCH_STRING_ESCAPE); a trailing lone ``\\`` is itself.
    """
    if pattern is None:
        return lambda _name: True
    pieces = _like_pieces(pattern)
    if len(pieces) == 1:
        only = pieces[0]
        return lambda name: len(name) == len(only) and _piece_at(only, name, 0)
    return lambda name: _like_match(pieces, name)


# names are short: a longer pattern is a mistake (and parsing megabytes would hold the GIL for a while)
MAX_PATTERN_CHARS = 10_000


def checked_pattern(pattern: str | None, field: str) -> str | None:
    """``pattern`` (a request's ``field``) if it is not too long to be a name's pattern."""
    if pattern is not None and len(pattern) > MAX_PATTERN_CHARS:
        raise InvalidRequest(f"{field} is {len(pattern):,} characters; at most {MAX_PATTERN_CHARS:,} allowed")
    return pattern


# a piece is a tuple of characters, with None for ``_`` (any one character)
_Piece = tuple[str | None, ...]


def _like_pieces(pattern: str) -> list[_Piece]:
    """The ``%``-separated pieces of a LIKE pattern (runs of ``%`` count once)."""
    pieces: list[_Piece] = []
    current: list[str | None] = []
    i, n = 0, len(pattern)
    while i < n:
        ch = pattern[i]
        if ch == "\\":
            current.append(pattern[i + 1] if i + 1 < n else "\\")
            i += 2
            continue
        if ch == "%":
            pieces.append(tuple(current))
            current = []
        else:
            current.append(None if ch == "_" else ch)
        i += 1
    pieces.append(tuple(current))
    return pieces


def _piece_at(piece: _Piece, name: str, start: int) -> bool:
    if start + len(piece) > len(name):
        return False
    return all(p is None or p == name[start + k] for k, p in enumerate(piece))


def _find_piece(piece: _Piece, name: str, start: int) -> int:
    """The leftmost position >= start where ``piece`` matches, or -1."""
    if None not in piece:  # no ``_``: the C substring search
        return name.find("".join(c for c in piece if c is not None), start)
    for pos in range(start, len(name) - len(piece) + 1):
        if _piece_at(piece, name, pos):
            return pos
    return -1


def _like_match(pieces: list[_Piece], name: str) -> bool:
    first, middle, last = pieces[0], pieces[1:-1], pieces[-1]
    if len(first) + len(last) + sum(len(p) for p in middle) > len(name):
        return False
    if not _piece_at(first, name, 0):
        return False
    pos = len(first)
    for piece in middle:
        if not piece:
            continue
        found = _find_piece(piece, name, pos)
        if found < 0:
            return False
        pos = found + len(piece)
    end = len(name) - len(last)
    return end >= pos and _piece_at(last, name, end)
