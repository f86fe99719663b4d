"""Model output made storable: what is streamed is exactly what is saved, on SQLite and
PostgreSQL alike.

A provider can hand us text that no database column takes: NUL (PostgreSQL refuses it in
text) or a lone UTF-16 surrogate (an escaped `"\\ud83d"` in a provider's JSON; no UTF-8
encoder takes it). Sent on as is, the first breaks settlement on PostgreSQL only and the
second breaks the stream and settlement everywhere. Each becomes U+FFFD, the character
that says "a character was lost here"; a surrogate pair that arrived as two escapes
becomes the one character it encodes."""

from __future__ import annotations

REPLACEMENT = "\ufffd"


def storable(piece: str) -> str:
    if piece.isascii():  # the common case, checked at C speed
        return piece.replace("\x00", REPLACEMENT) if "\x00" in piece else piece
    try:
        piece.encode("utf-8")
    except UnicodeEncodeError:
        piece = piece.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    return piece.replace("\x00", REPLACEMENT) if "\x00" in piece else piece
