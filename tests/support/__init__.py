"""Test support: a real PostgreSQL server, a real HTTP server, an SSE reader."""
