"""Members that run in another process: the step protocol between the coordinator and a
member (`protocol.py`), the coordinator's proxy batch (`batch.py`), the Ray actor and its
client (`actor.py`, `backend.py`, `cluster.py`), and `load_members`, which places each
member in this process or in its Ray actor (`placement.py`).

This package sits above `members/` and `decoding/member_batch.py`; neither imports it.
"""

from .placement import load_member, load_members

__all__ = ["load_member", "load_members"]
