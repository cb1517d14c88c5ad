"""`deepen bench`: the command (command.py), its flags (arguments.py), its text tables
(tables.py) and its sections, one module each: speed, length, memory and fidelity
(sections.py), their timing helpers (timing.py), serving (serving.py), Ray actors (ray.py)
and the constraint's cost (constraint.py).
"""

from .command import add_parser, run

__all__ = ["add_parser", "run"]
