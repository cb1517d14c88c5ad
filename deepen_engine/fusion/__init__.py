"""Fusing the members' next-token distributions into the main member's vocabulary.

- `deepen`: DeePEn (relative space + inverse search), the fast path used for decoding;
- `search`: the inverse search's optimiser, shared with the reference;
- `reference`: the same formulas over the full vocabularies, to check the fast path.
"""

from .deepen import Fuser

__all__ = ["Fuser"]
