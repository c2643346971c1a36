"""Deletion candidates: packs garbage collection found unreferenced, to be deleted by a later phase.

A pack is never deleted by the run that first finds it unreferenced: that run
writes a sealed candidate set ``gc/candidates-<random>`` naming it, and a
run at least the grace period later (by the store's clock) deletes it if it
is still unreferenced and no writer that started before the set was written
still holds a lease. Every backup and copy reads the candidate sets after its
own lease is written and never deduplicates against a candidate pack
(``Store.can_deduplicate``): whatever it needs from one it stores again. The
argument that this loses nothing is in FORMAT.md, "Garbage collection across
hosts"; the README summarizes it.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass

import structlog

from zfsbackd.errors import IntegrityError, StoreError
from zfsbackd.identity import HostIdentity
from zfsbackd.objectstore.base import ObjectStore
from zfsbackd.store.crypto import Sealer

log = structlog.get_logger(__name__)

CANDIDATES_PREFIX = "gc/candidates-"
CANDIDATES_FORMAT = 1


@dataclass(frozen=True)
class CandidateSet:
    key: str
    created: float
    """Store time the set was written (its ``LastModified``)."""
    packs: frozenset[bytes]


class Candidates:
    """The candidate sets of one store."""

    def __init__(self, objects: ObjectStore, sealer: Sealer, region: str) -> None:
        self.objects = objects
        self.sealer = sealer
        self.region = region

    def sets(self) -> tuple[list[CandidateSet], list[str]]:
        """Readable sets, oldest first, and the keys of sets that cannot be read.

        An unreadable set was never acted on by anyone who could not read it:
        collection executes only sets it authenticated, so such a set deletes
        nothing and writers may ignore it (collection removes it).
        """
        found, unreadable = [], []
        for info in self.objects.list(CANDIDATES_PREFIX):
            what = f"garbage collection candidates {info.key} (region {self.region})"
            try:
                data = json.loads(self.sealer.open(self.objects.get(info.key), info.key.encode(), what=what))
                packs = frozenset(bytes.fromhex(p) for p in data["packs"])
            except FileNotFoundError:
                continue  # executed and removed since the listing
            except (IntegrityError, ValueError, KeyError, TypeError) as exc:
                log.warning("gc_candidates_unreadable", region=self.region, key=info.key, error=str(exc))
                unreadable.append(info.key)
                continue
            found.append(CandidateSet(info.key, info.mtime, packs))
        return sorted(found, key=lambda c: (c.created, c.key)), unreadable

    def packs(self) -> frozenset[bytes]:
        """Every pack named by a readable set: what a writer must not deduplicate against."""
        sets, _unreadable = self.sets()
        return frozenset().union(*(c.packs for c in sets))

    def write(self, packs: set[bytes], identity: HostIdentity) -> CandidateSet:
        key = f"{CANDIDATES_PREFIX}{secrets.token_hex(12)}"
        data = {
            "format": CANDIDATES_FORMAT,
            "host_name": identity.host_name,
            "host_id": identity.host_id,
            "packs": sorted(p.hex() for p in packs),
        }
        sealed = self.sealer.seal(json.dumps(data).encode(), key.encode())
        self.objects.create(key, sealed, f"garbage collection candidates of region {self.region}")
        info = self.objects.head(key)
        if info is None:
            raise StoreError(f"{key} vanished right after it was written to region {self.region}")
        return CandidateSet(key, info.mtime, frozenset(packs))

    def remove(self, key: str) -> None:
        self.objects.delete(key)
