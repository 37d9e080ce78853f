"""The run directory and what is done with runs: train, evaluate, predict, compare, export, extract."""
