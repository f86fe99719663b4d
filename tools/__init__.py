"""Tools for working on chatmeter from a source checkout, not shipped in the wheel: the
benchmark (`make bench`, `python -m tools.bench`) and the randomized soak trial
(`make soak`, `python -m tools.soak`)."""
