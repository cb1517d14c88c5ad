"""Ensemble members: what the user names (`MemberSpec`), how it is loaded in this process
(`load_local_member`: embedded names, GGUF files, folders, hub ids, ready objects) and what
a loaded member holds (`Member`). Members in Ray actors: `deepen_engine.remote`.
"""

from .embedded import DEFAULT_MEMBERS, EMBEDDED, EmbeddedModel, embedded_gguf
from .loading import load_local_member
from .member import DTYPES, Member, MemberSpec, as_spec, cache_dir, display_name, source_key

__all__ = [
    "DEFAULT_MEMBERS",
    "DTYPES",
    "EMBEDDED",
    "EmbeddedModel",
    "Member",
    "MemberSpec",
    "as_spec",
    "cache_dir",
    "display_name",
    "embedded_gguf",
    "load_local_member",
    "source_key",
]
