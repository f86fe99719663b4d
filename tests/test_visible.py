"""has_visible_text: what counts as blank in a message or a title."""

from __future__ import annotations

import pytest

from chatmeter.visible import has_visible_text

INVISIBLE = {
    "empty": "",
    "whitespace": " \t\r\n\x0b\x0c",
    "zero-width space, joiners, word joiner": "\u200b\u200c\u200d\u2060",
    "byte order mark": "\ufeff",
    "soft hyphen": "\u00ad",
    "no-break and ideographic spaces": "\u00a0\u3000\u2007\u202f",
    "line and paragraph separators": "\u2028\u2029\u0085",
    "bidi controls": "\u200e\u200f\u202a\u202e\u2066\u2069",
    "controls": "\x00\x01\x07\x1b\x7f\x9b",
    "combining grapheme joiner and variation selectors": "\u034f\ufe0f\U000e0100",
    "Hangul fillers": "\u115f\u1160\u3164\uffa0",
    "tag characters": "\U000e0001\U000e0067\U000e007f",
    "blank Braille pattern": "\u2800",
    "many of them": "\u200b \u200d\ufeff" * 500,
}
VISIBLE = {
    "a letter": "a",
    "a letter after invisibles": "\u200b\u200b\ufeffa",
    "punctuation": ".",
    "an emoji": "\U0001f600",
    "a ZWJ sequence": "\U0001f468\u200d\U0001f469",
    "a combining mark on a letter": "e\u0301",
    "a CJK character": "\u4f60",
    "the replacement character": "\ufffd",
    "a private-use character": "\ue000",
}


@pytest.mark.parametrize("name", INVISIBLE)
def test_invisible_text_is_blank(name: str) -> None:
    assert not has_visible_text(INVISIBLE[name])


@pytest.mark.parametrize("name", VISIBLE)
def test_visible_text_is_not_blank(name: str) -> None:
    assert has_visible_text(VISIBLE[name])
