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
        self.token_to_anchor = token_to_anchor
        self.num_anchors = int(anchor_token_ids.numel())
        self._embeddings = embeddings
        # (A, d) unit anchor embeddings: the only copy we keep (~A*d floats).
        anchors = embeddings.detach()[anchor_token_ids].float()
        self._anchor_units = torch.nn.functional.normalize(anchors, dim=-1)
        self._cache: OrderedDict[int, torch.Tensor] = OrderedDict()
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
        twin._cache_size = cache_size
        twin.rows_computed = 0
        twin.store = None  # the twin's work never reaches the disk
        return twin

    def memory_bytes(self) -> int:
        """Bytes held: the unit anchor embeddings and the cached rows."""
        rows = sum(row.numel() * row.element_size() for row in self._cache.values())
        units = self._anchor_units.numel() * self._anchor_units.element_size()
        return units + rows

    def exact_rows(self, token_ids: torch.Tensor) -> torch.Tensor:
        """(n, A) rows by the formula, for any tokens, computed in chunks of tokens."""
        out = []
        for start in range(0, token_ids.numel(), self._chunk):
            ids = token_ids[start : start + self._chunk]
            units = torch.nn.functional.normalize(self._embeddings.detach()[ids].float(), dim=-1)
            out.append(torch.softmax(self.tau * units @ self._anchor_units.T, dim=-1))
        if not out:
            return torch.empty(0, self.num_anchors)
        return torch.cat(out)

    def non_anchor_rows(self, token_ids: list[int]) -> torch.Tensor:
        """(n, A) rows of tokens that are not anchors, through the LRU cache."""
        missing = [t for t in dict.fromkeys(token_ids) if t not in self._cache]
        if missing and self.store is not None:
            stored = self.store.get(missing)
            # copies in RAM: the store's rows are memory-mapped, and a page the system
            # dropped would be read from disk again at every step that uses the row
            self._cache.update({t: row.clone() for t, row in stored.items()})
            missing = [t for t in missing if t not in stored]
        if missing:
            rows = self.exact_rows(torch.tensor(missing, dtype=torch.long))
            self.rows_computed += len(missing)
            for t, row in zip(missing, rows):
                # a copy: a view would keep the whole (n, A) block alive while any of its
                # rows stays cached (the reference computes thousands of rows per step)
                self._cache[t] = row.clone()
            if self.store is not None:
                self.store.add(missing, rows)
        out = []
        for t in token_ids:
            self._cache.move_to_end(t)
            out.append(self._cache[t])
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        if not out:
            return torch.empty(0, self.num_anchors)
        return torch.stack(out)

    def distribution(self, probs: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """Relative distributions `sum_v p(v) rel(v)`, normalised over the anchors.

        probs, token_ids: (B, k) probabilities of each row's kept tokens; tokens with no
        text (special) must be given probability 0 by the caller. Returns (B, A); a row
        whose kept mass is 0 is all zeros.
        """
        batch = probs.shape[0]
        out = torch.zeros(batch, self.num_anchors, dtype=torch.float32)
        anchor = self.token_to_anchor[token_ids]  # (B, k)
        is_anchor = anchor >= 0
        out.scatter_add_(1, anchor.clamp(min=0), torch.where(is_anchor, probs, 0.0).float())
        rest = (~is_anchor) & (probs > 0)
        if rest.any():
            b_idx, j_idx = rest.nonzero(as_tuple=True)
            rows = self.non_anchor_rows(token_ids[b_idx, j_idx].tolist())  # (n, A)
            out.index_add_(0, b_idx, rows * probs[b_idx, j_idx, None].float())
        mass = out.sum(dim=-1, keepdim=True)
        return torch.where(mass > 0, out / mass.clamp(min=1e-30), out)
