"""Failed-authentication rate limiting per client address: a token bucket (RFC 6585 4, 429).

Each address starts with ``auth.failed_auth_burst`` attempts and earns them back at
``auth.failed_auth_per_minute``. A wrong token (or a JWT that does not verify) takes one; with none left,
every request from that address that carries credentials is refused with 429 and ``Retry-After`` *before*
its token is looked at, so a guesser learns nothing more until the bucket refills. A right token does not
refill the bucket: the limit is about guesses, and a client that guesses and also holds a token is still
guessing. Requests without credentials cost nothing (they cannot guess).

Logging is one WARNING when an address becomes limited and one INFO when it is let through again (with how
many requests were refused meanwhile): one burst of 4,511 wrong tokens is two lines, not 4,511. Every
failure and refusal is counted in ``pacs_triage_auth_failures_total`` (``reason``), on the app's registry.

The table holds at most :data:`MAX_ADDRESSES` addresses; full buckets are dropped first, so a flood of
spoofed-looking sources cannot grow memory without bound. Behind a reverse proxy every request has the
proxy's address: run uvicorn with ``--forwarded-allow-ips`` for the proxy so the client address is real.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter

from service.errors import TooManyRequestsError

__all__ = ["MAX_ADDRESSES", "FailedAuthLimiter"]

logger = logging.getLogger(__name__)

MAX_ADDRESSES = 10_000
"""Addresses tracked at once; the least recently seen is forgotten first (it had the most time to refill)."""


@dataclass
class _Bucket:
    tokens: float
    at: float
    limited: bool = False
    refused: int = 0


class FailedAuthLimiter:
    """Token buckets of failed authentications, keyed by client address.

    Parameters
    ----------
    burst
        Wrong tokens an address may present back to back.
    per_minute
        Refill rate, attempts per minute.
    registry
        Where the failure counter is registered (the app's :class:`service.metrics.Metrics` registry).
    clock
        Monotonic seconds; tests pass their own to step time without sleeping.
    """

    def __init__(
        self,
        burst: int,
        per_minute: float,
        registry: CollectorRegistry | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.burst = float(burst)
        self.rate = per_minute / 60.0
        self.clock = clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self.failures = Counter(
            "pacs_triage_auth_failures",
            "failed authentications (invalid_token, invalid_jwt) and requests refused by the limit (limited)",
            ["reason"],
            registry=registry,
        )

    def _bucket(self, address: str) -> _Bucket:
        now = self.clock()
        bucket = self._buckets.get(address)
        if bucket is None:
            bucket = _Bucket(self.burst, now)
            self._buckets[address] = bucket
            self._prune()
        else:
            bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.at) * self.rate)
            bucket.at = now
            self._buckets.move_to_end(address)
        return bucket

    def _prune(self) -> None:
        if len(self._buckets) <= MAX_ADDRESSES:
            return
        for address in [a for a, b in self._buckets.items() if b.tokens >= self.burst and not b.limited]:
            del self._buckets[address]
            if len(self._buckets) <= MAX_ADDRESSES:
                return
        while len(self._buckets) > MAX_ADDRESSES:
            self._buckets.popitem(last=False)

    def check(self, address: str) -> None:
        """Before a token is looked at: refuse the request if ``address`` has no attempt left.

        Raises
        ------
        TooManyRequestsError
            429 with ``Retry-After``: the seconds until one attempt is earned back.
        """
        bucket = self._bucket(address)
        if bucket.tokens >= 1.0:
            if bucket.limited:
                logger.info(
                    "client %s may present tokens again; %d request(s) were refused while limited",
                    address,
                    bucket.refused,
                )
                bucket.limited, bucket.refused = False, 0
            return
        bucket.refused += 1
        self.failures.labels(reason="limited").inc()
        wait = max(1, math.ceil((1.0 - bucket.tokens) / self.rate))
        raise TooManyRequestsError(
            f"too many wrong tokens from this address; retry after {wait} s",
            part="Authorization",
            retry_after=wait,
        )

    def failed(self, address: str, reason: str) -> None:
        """A wrong token from ``address``: take one attempt; log once when the address becomes limited."""
        self.failures.labels(reason=reason).inc()
        bucket = self._bucket(address)
        bucket.tokens = max(0.0, bucket.tokens - 1.0)
        if bucket.tokens < 1.0 and not bucket.limited:
            bucket.limited = True
            logger.warning(
                "client %s used up its %d wrong-token attempts: limited to %g per minute, 429 meanwhile",
                address,
                int(self.burst),
                self.rate * 60,
            )

    def limited(self, address: str) -> bool:
        """Whether ``address`` would be refused now (for tests and the docs)."""
        bucket = self._buckets.get(address)
        return bucket is not None and bucket.limited
