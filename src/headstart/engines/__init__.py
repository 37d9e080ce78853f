"""How the frozen backbone runs: the engine rule, the engines, int8, feature extraction and its cache."""
