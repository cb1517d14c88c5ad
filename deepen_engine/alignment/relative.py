"""Relative representation of tokens over the anchors (DeePEn section 3).

`rel(v) = softmax_a(tau * cos(E[v], E[a]))` over the anchors `a`, with `E` the member's
input embeddings. No `|V| x |A|` matrix is ever built: rows are computed on demand for the
tokens that carry probability, and kept in a small LRU cache.

Tokens whose text is an anchor get a one-hot row on that anchor. At tau = 100 their exact
row already puts all its mass there (the cosine with itself is 1, with any other anchor far
below), and for byte-fallback duplicates the shared text is the better match anyway.
`exact_rows` computes the formula literally, for verification. With a `RowStore`
(alignment/row_store.py), rows missing from the LRU cache are read from disk before they
are computed, and computed rows are written there for the next process.

A space lives on its member's device (the device of the embeddings it is given): the unit
anchor embeddings, the anchor map and the row buffer are there, and rows come back there.
The disk store holds CPU tensors: rows cross to the CPU when written, back when read.

The LRU cache is one contiguous (slots, A) buffer that grows up to `cache_size` slots, so
the rows of a step are summed straight from it (`weighted_sum`; stacking hundreds of
separate row tensors cost far more on a busy CPU).
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import torch

from .row_store import RowStore


class RelativeSpace:
    """One member's relative rows over a fixed anchor set."""

    def __init__(
        self,
        embeddings: torch.Tensor,  # (V, d) the member's input embedding matrix
        anchor_token_ids: torch.Tensor,  # (A,) the member's token id of each anchor
        token_to_anchor: torch.Tensor,  # (V,) anchor index or -1
        tau: float,
        cache_size: int = 4096,
        chunk: int = 256,
        store: RowStore | None = None,
    ) -> None:
        self.tau = tau
        self.device = embeddings.device
        self.token_to_anchor = token_to_anchor.to(self.device)  # (V,) on the member's device
        self.num_anchors = int(anchor_token_ids.numel())
        self._embeddings = embeddings
        # (A, d) unit anchor embeddings, float32 whatever the member's dtype: the only copy
        # we keep (~A*d floats).
        anchors = embeddings.detach()[anchor_token_ids.to(self.device)].float()
        self._anchor_units = torch.nn.functional.normalize(anchors, dim=-1)
        self._cache: OrderedDict[int, int] = OrderedDict()  # token -> slot, LRU first
        self._buffer = self._empty(0)  # (slots, A) cached rows
        self._cache_size = cache_size
        self._chunk = chunk
        self.rows_computed = 0  # non-anchor rows computed so far (cache misses)
        self.store = store  # rows on disk (None: none)

    def with_row_cache(self, cache_size: int) -> RelativeSpace:
        """The same space with its own, empty row cache of `cache_size` rows (the unit
        anchor embeddings are shared, not copied): for work that should not evict this
        space's rows, like the full-vocabulary reference fusion.
        """
        twin = copy.copy(self)
        twin._cache = OrderedDict()
        twin._buffer = self._empty(0)
        twin._cache_size = cache_size
        twin.rows_computed = 0
        twin.store = None  # the twin's work never reaches the disk
        return twin

    def with_settings(self, tau: float, cache_size: int, store: RowStore | None) -> RelativeSpace:
        """The same member and anchors at another `tau` (another cache and store): the unit
        anchor embeddings, which do not depend on tau, are shared rather than rebuilt (about
        A x d floats, 110 MiB for Gemma-3 over the default pair's anchors).
        """
        twin = self.with_row_cache(cache_size)
        twin.tau = tau
        twin.store = store
        return twin

    def _empty(self, rows: int) -> torch.Tensor:
        """An uninitialised (rows, A) float32 tensor on the space's device."""
        return torch.empty(rows, self.num_anchors, device=self.device)

    def reserve(self) -> int:
        """Allocate the whole row cache now, with its pages touched, so the memory it will
        hold is held from the start (a server's memory then stays flat as the cache fills,
        as a preallocated KV cache does). Returns the bytes of the row buffer.
        """
        held = self._buffer.shape[0]
        if held < self._cache_size:
            buffer = torch.zeros(self._cache_size, self.num_anchors, device=self.device)
            buffer[:held] = self._buffer  # slots keep their rows
            self._buffer = buffer
        return self._buffer.numel() * self._buffer.element_size()

    @property
    def rows_cached(self) -> int:
        """Non-anchor rows in the in-memory cache now."""
        return len(self._cache)

    def memory_bytes(self) -> int:
        """Bytes held: the unit anchor embeddings and the cached rows."""
        rows = self._buffer.numel() * self._buffer.element_size()
        units = self._anchor_units.numel() * self._anchor_units.element_size()
        return units + rows

    def exact_rows(self, token_ids: torch.Tensor) -> torch.Tensor:
        """(n, A) rows by the formula, for any tokens, computed in chunks of tokens."""
        out = []
        token_ids = token_ids.to(self.device)
        for start in range(0, token_ids.numel(), self._chunk):
            ids = token_ids[start : start + self._chunk]
            units = torch.nn.functional.normalize(self._embeddings.detach()[ids].float(), dim=-1)
            out.append(torch.softmax(self.tau * units @ self._anchor_units.T, dim=-1))
        if not out:
            return self._empty(0)
        return torch.cat(out)

    def non_anchor_rows(self, token_ids: list[int]) -> torch.Tensor:
        """(n, A) rows of tokens that are not anchors, through the LRU cache."""
        unique = list(dict.fromkeys(token_ids))
        if not unique:
            return self._empty(0)
        if len(unique) > self._cache_size:
            # more rows than the cache holds (the reference fusion): the last ones stay
            cached = {t: self._buffer[self._cache[t]] for t in unique if t in self._cache}
            found = {**cached, **self._fetch([t for t in unique if t not in cached])}
            out = torch.stack([found[t] for t in token_ids])
            self._remember(unique[len(unique) - self._cache_size :], found)
            return out
        self._remember(unique, {})
        slots = torch.tensor(
            [self._cache[t] for t in token_ids], dtype=torch.long, device=self.device
        )
        return self._buffer.index_select(0, slots)

    def weighted_sum(
        self, token_ids: list[int], rows_of: torch.Tensor, weights: torch.Tensor, batch: int
    ) -> torch.Tensor:
        """(batch, A): for each batch row b, the sum of `weights[j] * rel(token_ids[j])` over
        the entries j with `rows_of[j] == b`, for tokens that are not anchors.

        `rows_of` must be ascending and a batch row must not name a token twice (what
        `nonzero` over a (B, k) mask of distinct ids gives). The cached rows are summed in
        place, as an `embedding_bag` over the row buffer (one bag per batch row, weighted):
        gathering them first copied every row (hundreds of 46k-float rows a step, the
        largest cost of fusion on CPU), and a sparse CSR product was 2.5-4x slower than the
        bag (`python scripts/fusion_kernels.py`). Each bag is summed alone, in its entries'
        order, so a row's sum does not depend on the other rows of the batch.
        """
        unique = list(dict.fromkeys(token_ids))
        if len(unique) > self._cache_size:  # rows beyond the cache: gather them
            out = torch.zeros(batch, self.num_anchors, device=self.device)
            rows = self.non_anchor_rows(token_ids)
            return out.index_add_(0, rows_of.to(self.device), rows * weights[:, None])
        self._remember(unique, {})
        slots = torch.tensor(
            [self._cache[t] for t in token_ids], dtype=torch.long, device=self.device
        )
        rows_of = rows_of.to(self.device)
        offsets = torch.zeros(batch, dtype=torch.long, device=self.device)
        offsets[1:] = torch.bincount(rows_of, minlength=batch).cumsum(0)[:-1]
        return torch.nn.functional.embedding_bag(
            slots,
            self._buffer,
            offsets,
            mode="sum",
            per_sample_weights=weights.float().to(self.device),
        )

    def _remember(self, tokens: list[int], found: dict[int, torch.Tensor]) -> None:
        """Make `tokens` (at most `cache_size`) the most recently used cached rows,
        fetching the missing ones unless `found` has them.
        """
        for t in tokens:
            if t in self._cache:
                self._cache.move_to_end(t)
        missing = [t for t in tokens if t not in self._cache]
        if not missing:
            return
        rows = {t: found[t] for t in missing if t in found}
        rows.update(self._fetch([t for t in missing if t not in rows]))
        for t in missing:
            slot = self._free_slot()
            self._buffer[slot] = rows[t]
            self._cache[t] = slot

    def _fetch(self, token_ids: list[int]) -> dict[int, torch.Tensor]:
        """Rows of tokens not in the cache: from the disk store, else computed."""
        found = self.store.get(token_ids) if self.store is not None else {}
        if found and self.device.type != "cpu":  # the store reads CPU tensors
            found = {t: row.to(self.device) for t, row in found.items()}
        missing = [t for t in token_ids if t not in found]
        if missing:
            rows = self.exact_rows(torch.tensor(missing, dtype=torch.long))
            self.rows_computed += len(missing)
            found.update(zip(missing, rows))
            if self.store is not None:
                self.store.add(missing, rows.cpu())
        return found

    def _free_slot(self) -> int:
        """A slot for a new row: a new one while the buffer may grow, else the least
        recently used row's (the rows of the current call were moved to the end).
        """
        used = len(self._cache)
        if used < self._buffer.shape[0]:
            slot = used
        elif used < self._cache_size:
            grown = min(self._cache_size, max(64, 2 * self._buffer.shape[0]))
            buffer = self._empty(grown)
            buffer[:used] = self._buffer
            self._buffer, slot = buffer, used
        else:
            _, slot = self._cache.popitem(last=False)
        return slot

    def distribution(self, probs: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """Relative distributions `sum_v p(v) rel(v)`, normalised over the anchors.

        probs, token_ids: (B, k) probabilities of each row's kept tokens; tokens with no
        text (special) must be given probability 0 by the caller. Returns (B, A); a row
        whose kept mass is 0 is all zeros.
        """
        batch = probs.shape[0]
        out = torch.zeros(batch, self.num_anchors, dtype=torch.float32, device=self.device)
        probs, token_ids = probs.to(self.device), token_ids.to(self.device)
        anchor = self.token_to_anchor[token_ids]  # (B, k)
        is_anchor = anchor >= 0
        out.scatter_add_(1, anchor.clamp(min=0), torch.where(is_anchor, probs, 0.0).float())
        rest = (~is_anchor) & (probs > 0)
        if rest.any():
            b_idx, j_idx = rest.nonzero(as_tuple=True)
            ids = token_ids[b_idx, j_idx].tolist()
            out += self.weighted_sum(ids, b_idx, probs[b_idx, j_idx].float(), batch)
        mass = out.sum(dim=-1, keepdim=True)
        return torch.where(mass > 0, out / mass.clamp(min=1e-30), out)
