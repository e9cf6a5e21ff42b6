"""Which locally answered requests are audited: a share of them, within a daily budget.

Sampling is systematic (every round(1/share)-th eligible request of a policy) rather than
random: the share is met exactly over any stretch of traffic, and what was audited can be
reproduced from the ledger. The budget counts audits per policy per UTC day, so a traffic spike
cannot turn a 5% audit into an unbounded remote bill.
"""

from __future__ import annotations

import threading
import time
from collections import Counter

from clawctl.schemas.policy import AuditSection


class AuditSampler:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._eligible: Counter[str] = Counter()
        self._today: Counter[tuple[str, str]] = Counter()

    def take(self, policy: str, audit: AuditSection, now: float | None = None) -> bool:
        """Count one eligible request of `policy`; True if it is to be audited."""
        if audit.share <= 0 or audit.max_per_day <= 0:
            return False
        day = time.strftime("%Y-%m-%d", time.gmtime(time.time() if now is None else now))
        every = max(1, round(1 / audit.share))
        with self._lock:
            self._eligible[policy] += 1
            if self._eligible[policy] % every:
                return False
            if self._today[(policy, day)] >= audit.max_per_day:
                return False
            self._today[(policy, day)] += 1
            return True

    def audited_today(self, policy: str, now: float | None = None) -> int:
        day = time.strftime("%Y-%m-%d", time.gmtime(time.time() if now is None else now))
        with self._lock:
            return self._today[(policy, day)]
