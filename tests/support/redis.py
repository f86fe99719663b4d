"""The test session's throwaway redis-server: the benchmark's (tools/bench)."""

from __future__ import annotations

from tools.bench.redis_server import ThrowawayRedis

__all__ = ["RedisServer"]


class RedisServer(ThrowawayRedis):
    """Stopped and started again by the tests of a Redis that goes away mid-reply."""
