"""`deepen eval`: the command (command.py), its pieces shared by every task (task.py), the
tasks (tasks.py), the McNemar test (stats.py), dev-set sweeps (sweep.py) and tool calls
(tools.py).
"""

from .command import add_parser, run_eval

__all__ = ["add_parser", "run_eval"]
