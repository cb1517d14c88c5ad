"""deepen's engine: token-level ensembles of causal LMs with different vocabularies.

No LangChain or LlamaIndex import here; the adapters live in `deepen_integrations`.
"""

from .config import FusionConfig, GenerationConfig, SchedulerConfig
from .ensemble import Ensemble
from .errors import (
    AlignmentError,
    ConfigError,
    DeepenError,
    MemberError,
    MemberLoadError,
    OutputCutError,
    QueueFullError,
    RequestTimeoutError,
)
from .members import (
    DEFAULT_MEMBERS,
    EMBEDDED,
    Member,
    MemberSpec,
    cache_dir,
    display_name,
)
from .members.quiet import quiet_loading
from .outputs import GenerationResult, StreamEvent, ToolCall, Usage
from .remote import load_member

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
    "OutputCutError",
    "QueueFullError",
    "RequestTimeoutError",
    "SchedulerConfig",
    "StreamEvent",
    "ToolCall",
    "Usage",
    "cache_dir",
    "display_name",
    "quiet_loading",
    "load_member",
]

__version__ = "0.1.0"
