"""Whether a text shows anything: a message or a title of only invisible characters
(zero-width spaces, joiners, a byte order mark, soft hyphens, whitespace, controls) is as
blank as an empty one, however many characters it has."""

from __future__ import annotations

import unicodedata

# ASCII that shows nothing: the controls, space, DEL
_ASCII_INVISIBLE = "".join(map(chr, range(0x21))) + "\x7f"
# separators, controls and format characters (U+200B to U+200F, U+2060, U+FEFF, U+00AD,
# the bidi controls, the tag characters)
_INVISIBLE_CATEGORIES = frozenset({"Zs", "Zl", "Zp", "Cc", "Cf"})
# default-ignorable code points of other categories: the combining grapheme joiner, the
# Hangul and Khmer fillers, variation selectors; and the blank Braille pattern
_INVISIBLE_OTHERS = frozenset(
    "\u034f\u115f\u1160\u17b4\u17b5\u180b\u180c\u180d\u180f\u2800\u3164\uffa0"
    + "".join(map(chr, range(0xFE00, 0xFE10)))
    + "".join(map(chr, range(0xE0100, 0xE01F0)))
)


def _invisible(char: str) -> bool:
    return char in _INVISIBLE_OTHERS or unicodedata.category(char) in _INVISIBLE_CATEGORIES


def has_visible_text(text: str) -> bool:
    if text.isascii():  # the common case, at C speed
        return bool(text.strip(_ASCII_INVISIBLE))
    # stops at the first visible character: almost always the first
    return not all(map(_invisible, text))
