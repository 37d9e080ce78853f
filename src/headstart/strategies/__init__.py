"""The training strategies: one registry entry per strategy (registry.py; the built-in ones in builtin.py),
auto's rules (auto.py) and the ensemble run (ensemble.py).

Importing the package registers the built-in strategies, so `get_strategy` and `list_strategies`
see them wherever the registry is read.
"""

from headstart.strategies import builtin  # noqa: F401 -- registers the built-in strategies
from headstart.strategies.registry import Strategy, auto_image_size, compare_rows, configure, get_strategy, list_strategies, register

__all__ = ["Strategy", "auto_image_size", "compare_rows", "configure", "get_strategy", "list_strategies", "register"]
