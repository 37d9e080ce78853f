"""Data inspection (`headstart inspect`): likely wrong labels, leaks, near duplicates, strays, odd images and class
balance, from the features a run's preparation computes (runs/context.py). It reads DATA and writes only its own
folder: issues.csv (data/issues.py), summary.json and inspect.html."""

from headstart.inspection.api import Inspection, inspect

__all__ = ["Inspection", "inspect"]
