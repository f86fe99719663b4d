"""How often a server process collects garbage: a worker and the SQLite writer process.

A server's objects mostly die with their exchange, freed by reference counting. CPython
collects the young generation each time tracked objects allocated minus freed pass 700.
At 50 clients that was about every 15 exchanges: each pass found the exchanges in flight
still alive and promoted them, and passes of the older generations examined them again
(up to ~17 ms each). Collection took ~35 µs of a worker's CPU per exchange on SQLite and
~55 µs on PostgreSQL (7 to 9 %). With the young generation collected after 10,000, a
pass runs about once a second at that load (about 5 ms each) and the older generations
are hardly reached: ~4 µs per exchange. Cycles, which only the collector frees, wait for
it longer: at most some 10,000 objects' worth."""

from __future__ import annotations

import gc

YOUNG_GENERATION_THRESHOLD = 10_000


def collect_young_less_often() -> None:
    """Collect the young generation after `YOUNG_GENERATION_THRESHOLD` net allocations
    (the older generations keep their thresholds). For the server's own processes only:
    the app built in-process (tests, embedding) leaves its host's collector alone."""
    gc.set_threshold(YOUNG_GENERATION_THRESHOLD)
