"""Ensemble members: what the user names (`MemberSpec`), how it is loaded
(`load_member`: embedded names, GGUF files, folders, hub ids, ready objects; in this
process or in a Ray actor, ray_backend.py) and what a loaded member holds (`Member`).
"""

from .embedded import DEFAULT_MEMBERS, EMBEDDED, EmbeddedModel, embedded_gguf
from .loading import load_member, load_members
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
    "load_member",
    "load_members",
    "source_key",
]
