"""The benchmark (`make bench`, `python -m tools.bench`): measure chatmeter against a bare
Starlette SSE floor (SPEC section 9).

Every server under test runs as a process of its own with one uvicorn worker; the load
comes from other processes (`wrk`, or this process for the open-streams test)."""
