"""Who asked: the Unix-socket peer's credentials, as the serving core records and schedules them.

The HTTP layer reads them off the connection (api/peer.py); the serving core only needs the
values, for the ledger's caller columns and the fair queue's key.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PeerCred:
    pid: int
    uid: int
    gid: int
