"""Which store this host used in each region: ``state_dir/stores/<region>.json``.

A store that vanishes (an unmounted NAS, a mistyped path after an edit, a
wiped bucket prefix) must not be silently replaced by a new empty one, and a
region whose ``config`` was swapped for another store's must not be used as
if nothing happened. Both are only visible to someone who remembers the store
id, so each host writes it down the first time it opens or creates a store in
a region, and :meth:`zfsbackd.store.repository.Store.open` compares.

Like everything in ``state_dir`` this is local and may be lost; losing it only
loses the protection (the next open remembers the store again).
"""

from __future__ import annotations

import json
import os
import secrets
from datetime import UTC, datetime
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

STORES_DIR = "stores"


class KnownStores:
    def __init__(self, state_dir: Path) -> None:
        self.directory = state_dir / STORES_DIR

    def path(self, region: str) -> Path:
        return self.directory / f"{region}.json"

    def store_id(self, region: str) -> str | None:
        """The store id remembered for ``region``, or None (never used here, or the file is unreadable)."""
        path = self.path(region)
        try:
            data = json.loads(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("known_store_unreadable", region=region, path=str(path), error=str(exc))
            return None
        store_id = data.get("StoreId") if isinstance(data, dict) else None
        return store_id if isinstance(store_id, str) else None

    def remember(self, region: str, store_id: str, location: str) -> None:
        """Write (atomically) that ``region`` holds store ``store_id`` at ``location``.

        A failure is logged, not raised: it costs only the protection, and a
        read-only command must not fail because ``state_dir`` is not writable.
        """
        path = self.path(region)
        record = {
            "Region": region,
            "StoreId": store_id,
            "Location": location,
            "Remembered": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        }
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            tmp.write_text(json.dumps(record, indent=1) + "\n")
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            log.warning("known_store_not_remembered", region=region, path=str(path), error=str(exc))
