"""Token-bucket rate limits keyed by client, user or source address.

A bucket holds up to ``burst`` tokens and refills at ``rate`` per second; each
request takes one. Buckets live in an LRU capped at ``max_keys``, so memory is
bounded whatever an attacker sends (a key evicted and recreated starts full,
which only errs towards letting a request through). Everything runs on the event
loop: a ``take`` is a dict lookup and a little arithmetic, no lock.
"""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class BucketLimit:
    rate: float  # tokens per second
    burst: int  # bucket size


class _Bucket:
    __slots__ = ("at", "noted", "tokens")

    def __init__(self, tokens: float, at: float) -> None:
        self.tokens = tokens
        self.at = at
        self.noted = -math.inf  # when a refusal was last reported (one event per window)


class RateLimiter:
    """Buckets of one kind (e.g. per source address), all with the same limit."""

    def __init__(self, limit: BucketLimit, *, max_keys: int = 100_000,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self._cap = max_keys
        self._now = monotonic
        self._buckets: collections.OrderedDict[str, _Bucket] = collections.OrderedDict()

    def take(self, key: str) -> float:
        """0.0 if the request may go ahead (a token was taken), else seconds until a token is back."""
        now = self._now()
        limit = self.limit
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(float(limit.burst), now)
            if len(self._buckets) > self._cap:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
            bucket.tokens = min(float(limit.burst), bucket.tokens + (now - bucket.at) * limit.rate)
            bucket.at = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) / limit.rate

    def first_refusal_in(self, key: str, window: float) -> bool:
        """True once per ``window`` seconds per key: whether this refusal should be reported."""
        bucket = self._buckets.get(key)
        if bucket is None:
            return True
        now = self._now()
        if now - bucket.noted < window:
            return False
        bucket.noted = now
        return True

    def __len__(self) -> int:
        return len(self._buckets)
