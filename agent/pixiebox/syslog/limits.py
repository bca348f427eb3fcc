"""A token bucket per source address, so that a machine logging in a loop cannot flood the agent
or its storage. What is dropped is counted and logged, at most once per source per minute.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address

log = logging.getLogger("pixiebox.syslog")

#: Seconds between two "lines were dropped" log lines for one source.
DROP_REPORT_INTERVAL = 60.0
#: Sources tracked by the rate limiter at once; a lab has a few dozen machines, and spoofed
#: source addresses must not grow the table without bound.
MAX_SOURCES = 16384


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float
    #: Dropped since the last report; the report window runs while `report_due` is set.
    unreported: int = 0
    report_due: float | None = None


class SourceLimiter:
    """A token bucket per source address: `rate` lines a second, bursts of `burst`.

    The first drop from a source is logged at once; drops after it are counted and logged as one
    line when the source's minute is up, so a looping machine costs one log line a minute."""

    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        describe: Callable[[IPv4Address], str] = str,
        clock: Callable[[], float] = time.monotonic,
        max_sources: int = MAX_SOURCES,
    ) -> None:
        if not rate > 0:
            raise ValueError(f"syslog rate per source must be positive, not {rate!r}")
        if burst < 1:
            raise ValueError(f"syslog burst must be at least 1, not {burst!r}")
        self.rate = float(rate)
        self.burst = int(burst)
        self.describe = describe
        self.clock = clock
        self.max_sources = max_sources
        self._buckets: dict[str, _Bucket] = {}

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, source: str) -> bool:
        """Spend one token of `source`'s bucket: True if the line may pass."""
        now = self.clock()
        bucket = self._buckets.get(source)
        if bucket is None:
            if len(self._buckets) >= self.max_sources:
                self._make_room(now)
            bucket = self._buckets[source] = _Bucket(float(self.burst), now)
        else:
            refill = (now - bucket.updated) * self.rate
            bucket.tokens = min(float(self.burst), bucket.tokens + refill)
            bucket.updated = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return True
        bucket.unreported += 1
        if bucket.report_due is None:
            log.warning(
                "syslog: %s sends more than %g lines/s (bursts of %d); dropping its excess lines "
                "(counted, reported once a minute)",
                self._name(source),
                self.rate,
                self.burst,
            )
            bucket.unreported = 0
            bucket.report_due = now + DROP_REPORT_INTERVAL
        return False

    def report(self, *, final: bool = False) -> None:
        """Log the drops of each source whose minute is up (all of them if `final`), and forget
        sources that have been quiet long enough to have a full bucket again."""
        now = self.clock()
        for source, bucket in list(self._buckets.items()):
            if bucket.report_due is not None and (final or now >= bucket.report_due):
                if bucket.unreported:
                    log.warning(
                        "syslog: dropped %d lines from %s in the last %.0f s (over %g lines/s)",
                        bucket.unreported,
                        self._name(source),
                        now - bucket.report_due + DROP_REPORT_INTERVAL,
                        self.rate,
                    )
                    bucket.unreported = 0
                    bucket.report_due = now + DROP_REPORT_INTERVAL
                else:
                    bucket.report_due = None
            if bucket.report_due is None and self._full(bucket, now):
                del self._buckets[source]

    def _full(self, bucket: _Bucket, now: float) -> bool:
        return bucket.tokens + (now - bucket.updated) * self.rate >= self.burst

    def _make_room(self, now: float) -> None:
        """Forget idle sources, then the oldest: a quarter of the table at once, so a flood of
        spoofed addresses costs O(1) per datagram."""
        for source, bucket in list(self._buckets.items()):
            if bucket.report_due is None and self._full(bucket, now):
                del self._buckets[source]
        excess = len(self._buckets) - (self.max_sources * 3) // 4
        for source in list(self._buckets)[: max(excess, 0)]:
            del self._buckets[source]

    def _name(self, source: str) -> str:
        try:
            return self.describe(IPv4Address(source))
        except Exception:
            return source
