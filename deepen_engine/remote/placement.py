"""Load members where their specs place them: in this process, or each in its own Ray
actor (`MemberSpec.placement`).
"""

from __future__ import annotations

from collections.abc import Sequence

from ..members import loading
from ..members.member import Member, MemberSpec


def load_members(specs: Sequence[MemberSpec]) -> list[Member]:
    """Load every member, in order. Members placed in Ray actors start first, once the
    cluster is known to hold them (no model loads before that check), so they load in
    parallel with each other and with the members loaded here (backend.py).
    """
    placed = [s for s in specs if s.placement == "ray"]
    if not placed:
        return [loading.load_local_member(s) for s in specs]
    from .backend import RayMembers  # the Ray client: only when a member asks for it

    started = RayMembers(placed)
    try:
        local = loading.load_local_member
        here = {i: local(s) for i, s in enumerate(specs) if s.placement != "ray"}
        remote = iter(started.wait())
        return [here[i] if i in here else next(remote) for i in range(len(specs))]
    except BaseException:
        started.close()
        raise


def load_member(spec: MemberSpec) -> Member:
    """Load one member where its spec places it (in a Ray actor if it says so); errors
    name the member and what to do.
    """
    return load_members([spec])[0]
