"""`summary.as_csv`: the admin's CSV export, opened by a spreadsheet."""

from __future__ import annotations

import csv
import io

from chatmeter.metering.summary import SUM_FIELDS, as_csv

FORMULA_STARTS = ("=", "+", "-", "@")


def _row(user: str) -> dict[str, object]:
    return {"user": user, "requests": 1, **dict.fromkeys(SUM_FIELDS, 2)}


def test_no_cell_starts_a_formula_whichever_separator_the_spreadsheet_uses() -> None:
    """A user id is the identity provider's, and may be anything printable. A cell that
    starts a formula was quoted with `'`, but one that holds a separator was written
    bare: Excel in a locale whose list separator is `;` (German, French, ...) split
    `x;=HYPERLINK(...)` into two cells, the second a formula. Every text cell is now
    written in quotes, which every separator's reading keeps whole."""
    users = ['x;=HYPERLINK("http://evil")', "a;+1", "b;-1", "c;@SUM(A1)", "=1+1", "plain"]
    text = as_csv([_row(user) for user in users], "user")
    for separator in (",", ";"):
        rows = list(csv.reader(io.StringIO(text), delimiter=separator))
        cells = [cell for row in rows for cell in row]
        assert not [cell for cell in cells if cell.startswith(FORMULA_STARTS)], separator
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0] == ["user", "requests", *SUM_FIELDS]
    assert [row[0] for row in rows[1:]] == [*users[:4], "'=1+1", "plain"]
    assert rows[1][1:] == ["1"] + ["2"] * len(SUM_FIELDS)
