"""Fusing the members' next-token distributions into the main member's vocabulary.

- `base`: the `Fuser` interface the decoding loop calls, the per-step gate, the registry
  of methods (`FusionConfig.method`);
- `context`: what the methods read about the members (token maps, relative spaces),
  computed once per ensemble;
- `deepen`: DeePEn (relative space + inverse search), with `search`, its optimiser, and
  `reference`, the same formulas over the full vocabularies to check the fast path;
- `union`: GaC, the distributions averaged over the union vocabulary;
- `unite`: UniTE, the union of the members' top-k tokens.
"""

from .base import Fuser, FuseStats
from .deepen import DeepenFuser
from .union import UnionFuser
from .unite import UniteFuser

__all__ = ["DeepenFuser", "FuseStats", "Fuser", "UnionFuser", "UniteFuser"]
