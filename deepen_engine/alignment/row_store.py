"""Relative rows of non-anchor tokens kept on disk, so a new process reads the rows an
earlier one computed instead of computing them again (the cold start of the first request).

One folder per member, anchor set and tau: its name is a digest of the member's input
embedding matrix (every byte), its token id of every anchor, tau and the row formula's
version, so a changed member, anchor set (other members) or setting never finds the rows
of another. Each shard file also carries that full key; a shard whose key or width does not
match is refused (counted in `refused`, never read).

Rows are float32, exactly as computed (`RelativeSpace.exact_rows`): a row read back equals
the row computed. Shards are written whole to a temporary file and renamed, so readers
(other processes too) see complete shards only; each process writes its own shards.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import uuid
import warnings
import weakref
from pathlib import Path

import torch
import xxhash

FORMAT_VERSION = 1  # bump when the row formula or the shard layout changes
FLUSH_ROWS = 256  # new rows kept in memory before they are written as one shard

_OPEN: weakref.WeakSet[RowStore] = weakref.WeakSet()


def embedding_digest(weight: torch.Tensor) -> str:
    """A digest of every byte of an embedding matrix, with its shape and dtype (xxh3-128:
    a fraction of a second for Gemma-3's 671 MB matrix, where a cryptographic hash takes
    seconds; the key guards against mix-ups, not adversaries).
    """
    data = weight.detach().contiguous().cpu()
    h = xxhash.xxh3_128()
    h.update(f"{tuple(data.shape)}|{data.dtype}".encode())
    h.update(data.reshape(-1).view(torch.uint8).numpy().data)  # a memoryview: no copy
    return h.hexdigest()


def space_key(member_digest: str, anchor_ids: torch.Tensor, tau: float) -> str:
    """The key of one member's rows: member, anchor set (its ids of them), tau, version."""
    h = hashlib.blake2b(digest_size=20)
    h.update(f"v{FORMAT_VERSION}|{member_digest}|tau={tau!r}|".encode())
    h.update(anchor_ids.detach().cpu().long().contiguous().numpy().tobytes())
    return h.hexdigest()


class RowStore:
    """One member's rows on disk (see the module docstring)."""

    @classmethod
    def for_space(
        cls,
        root: Path,
        member_digest: str,
        anchor_ids: torch.Tensor,
        tau: float,
        max_rows: int,
    ) -> RowStore:
        """The store of a member's relative space under `root`."""
        key = space_key(member_digest, anchor_ids, tau)
        return cls(root / key, key, int(anchor_ids.numel()), max_rows)

    def __init__(self, folder: Path, key: str, num_anchors: int, max_rows: int) -> None:
        self.folder = folder
        self.key = key
        self.num_anchors = num_anchors
        self.max_rows = max_rows
        self.refused = 0  # shards found with another key or width (never read)
        self.loaded = 0  # rows handed out from disk
        self._index: dict[int, torch.Tensor] = {}  # token id -> (A,) row (memory-mapped)
        self._pending: dict[int, torch.Tensor] = {}
        self._writable = True
        self._read_shards()
        _OPEN.add(self)

    def __len__(self) -> int:
        """Rows stored or waiting to be written."""
        return len(self._index) + len(self._pending)

    def _read_shards(self) -> None:
        if not self.folder.is_dir():
            return
        for path in sorted(self.folder.glob("rows-*.pt")):
            self._index_shard(path)

    def _index_shard(self, path: Path) -> None:
        """Index one shard's rows (memory-mapped), or count it refused."""
        try:
            shard = torch.load(path, mmap=True, weights_only=True, map_location="cpu")
        except Exception:  # a damaged or foreign file: treat as not there
            self.refused += 1
            return
        ids, rows = shard.get("ids"), shard.get("rows")
        good = (
            shard.get("key") == self.key
            and isinstance(rows, torch.Tensor)
            and isinstance(ids, torch.Tensor)
            and rows.dtype == torch.float32
            and rows.dim() == 2
            and rows.shape == (ids.numel(), self.num_anchors)
        )
        if not good:
            self.refused += 1
            return
        for j, token in enumerate(ids.tolist()):
            self._index.setdefault(token, rows[j])

    def get(self, token_ids: list[int]) -> dict[int, torch.Tensor]:
        """The stored rows among `token_ids`: {token id: (A,) float32 row}."""
        found = {t: self._index[t] for t in token_ids if t in self._index}
        found.update({t: self._pending[t] for t in token_ids if t in self._pending})
        self.loaded += len(found)
        return found

    def add(self, token_ids: list[int], rows: torch.Tensor) -> None:
        """Keep new rows (n, A) for the disk, up to `max_rows` in all."""
        for token, row in zip(token_ids, rows):
            if len(self) >= self.max_rows:
                break
            if token not in self._index:
                self._pending[token] = row.clone()
        if len(self._pending) >= FLUSH_ROWS:
            self.flush()

    def flush(self) -> None:
        """Write the pending rows as one shard (atomically). A folder that cannot be
        written turns the disk cache off for this store, with a warning: rows are then
        computed, as without a cache (same values, only slower).
        """
        if not self._pending or not self._writable:
            return
        ids = list(self._pending)
        shard = {
            "key": self.key,
            "ids": torch.tensor(ids, dtype=torch.long),
            "rows": torch.stack([self._pending[t] for t in ids]),
        }
        name = f"rows-{os.getpid()}-{uuid.uuid4().hex[:12]}.pt"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = self.folder / f".{name}.tmp"
            torch.save(shard, tmp)
            os.replace(tmp, self.folder / name)
        except OSError as exc:
            self._writable = False
            warnings.warn(
                f"deepen: cannot write relative rows to {self.folder} ({exc}); they will be "
                "computed in each new process. Set DEEPEN_CACHE to a writable folder, or "
                "FusionConfig(disk_cache_rows=0) to turn the disk cache off.",
                stacklevel=2,
            )
            return
        self._pending.clear()
        # index the rows from the file (memory-mapped), so memory does not grow with the
        # rows written; a row read back is the row computed, bit for bit
        self._index_shard(self.folder / name)


@atexit.register
def _flush_all() -> None:
    """Write every store's pending rows when the process ends."""
    for store in list(_OPEN):
        try:
            store.flush()
        except Exception:  # never fail an exiting process over a cache
            pass
