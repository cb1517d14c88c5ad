"""deepen's engine: token-level ensembles of causal LMs with different vocabularies.

No LangChain or LlamaIndex import here; the adapters live in `deepen_integrations`.
"""

from .config import FusionConfig, GenerationConfig
from .decoding import GenerationResult, StreamEvent, Usage
from .embedded import DEFAULT_MEMBERS, EMBEDDED
from .ensemble import Ensemble
from .errors import AlignmentError, ConfigError, DeepenError, MemberError, MemberLoadError
from .members import Member, MemberSpec, cache_dir, display_name, load_member

__all__ = [
    "DEFAULT_MEMBERS",
    "EMBEDDED",
    "AlignmentError",
    "ConfigError",
    "DeepenError",
    "Ensemble",
    "FusionConfig",
    "GenerationConfig",
    "GenerationResult",
    "Member",
    "MemberError",
    "MemberLoadError",
    "MemberSpec",
    "StreamEvent",
    "Usage",
    "cache_dir",
    "display_name",
    "load_member",
]

__version__ = "0.1.0"
