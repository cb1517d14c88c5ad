"""`deepen eval`: the command (command.py), the systems it scores and how they answer
(systems.py), the pieces every task shares (task.py), the tasks (tasks.py), the McNemar
test (stats.py), dev-set sweeps (sweep.py) and tool calls (tools.py).
"""

from .command import add_parser, run_eval

__all__ = ["add_parser", "run_eval"]
