"""Every thread pool's size, in one place: what the pool does and why it is that big.

A host with more cores, a slower object store or less memory is tuned here,
not by hunting ``max_workers=`` through the code. Each figure says what it
bounds; the measurements behind the CPU-bound ones are in bench/README.md.
Memory bounds that follow from these sizes (pack buffers: 16 MiB each) are
stated where they matter. How many *backups* or *copies* run at once is
configuration (``daemon.max_parallel_backups``, ``copies.max_in_flight``),
not a pool size: see zfsbackd/config.py.
"""

from __future__ import annotations

import os

# ------------------------------------------------------------------ backups
#: threads reading files: more only fight over the GIL (1M small files, cold: 2 threads 20 s, 3 22 s, 8 27 s)
READ_WORKERS = 2
#: threads hashing, compressing and sealing the chunks of large files, while the readers go on
CHUNK_WORKERS = 2
#: trees of the parent backup read ahead of the walk at once (their entries are bounded separately)
TREE_READ_AHEAD_WORKERS = 4

#: processes one backup archives in: its own and ARCHIVE_PROCESSES - 1 workers (zfsbackd.engine.shards).
#: Per-file Python work is bound by one core's GIL, so a second core needs a second interpreter; each
#: worker holds ~100-120 MiB at full speed, so more than 4 are not started whatever the core count
ARCHIVE_PROCESSES = min(os.cpu_count() or 1, 4)
#: entries a backup lists, or files a restore has batched, before it starts its worker processes (an
#: interpreter each, ~0.3 s to start, more against S3: a restore of 5,000 files from Ceph RGW took 0.66x
#: restic's time in one process and 0.91-1.03x with a worker): a small tree is done sooner in one process.
#: ``ZFSBACKD_PARALLEL_AFTER_ENTRIES`` overrides it (tests)
PARALLEL_AFTER_ENTRIES = int(os.environ.get("ZFSBACKD_PARALLEL_AFTER_ENTRIES", "20000"))

# ------------------------------------------------------------------ writing packs
#: threads compressing, caching and sealing the trees one writer is given (PackWriter.add_tree): the walk
#: makes them one at a time, so one keeps up with it
TREE_ENCODE_THREADS = 1
#: threads uploading one writer's packs
UPLOAD_THREADS = 2
#: packs of one writer being uploaded or waiting for an upload thread: the writer's memory is
#: (PACKS_IN_FLIGHT + 1) * 16 MiB at most, the +1 being the pack it fills
PACKS_IN_FLIGHT = 3
#: the same for each archive worker process's writer: there are ARCHIVE_PROCESSES of them, and together
#: they still have as many packs in flight as one backup had before (1M small files: 138 -> ~105 MiB each)
WORKER_UPLOAD_THREADS = 1
WORKER_PACKS_IN_FLIGHT = 1
#: parts of one multipart S3 upload sent at once
MULTIPART_THREADS = 4

# ------------------------------------------------------------------ reading the store
#: index objects fetched and decoded at once when a store is opened (a batch at a time: few decoded in memory)
INDEX_READ_WORKERS = 4
#: pack headers read at once when adopting packs no index lists, and records fetched at once
STORE_LISTING_WORKERS = 8

# ------------------------------------------------------------------ other operations
#: source packs one copy reads and re-seals at once (each may hold a whole 16 MiB pack)
COPY_WORKERS = 4
#: files one restore writes at once. Creating files in the same directories, more threads contend in the
#: file system: 100,000 small files on XFS, cold, restored in 6.1-6.3 s with 1 thread, 6.2-6.5 s with 2,
#: 6.9-7.0 s with 3, 7.5-7.6 s with 4
RESTORE_WORKERS = 2
#: processes one restore writes files in: its own and RESTORE_PROCESSES - 1 workers
#: (zfsbackd.engine.restore_workers), started once a restore has batched PARALLEL_AFTER_ENTRIES files.
#: Creating a small file is a few system calls and as much Python, under one GIL; measured in
#: bench/README.md ("Restore worker processes")
RESTORE_PROCESSES = min(os.cpu_count() or 1, 4)
#: chunks of large files one restore fetches at once (ahead of its writers): on S3 each fetch waits for a
#: round trip, so these hide the latency; each holds at most a 4 MiB span of a pack (PackCache)
RESTORE_FETCH_WORKERS = 4
#: packs ``check`` verifies at once (with ``--read-data`` each holds a whole pack)
CHECK_WORKERS = 3
#: ZFS commit: the hold's release, the old bookmarks' destruction and the object map's commit beside the new
#: bookmark (each waits for a transaction group or a disk, not for a CPU)
ZFS_COMMIT_WORKERS = 3
