"""A trained model in use: Model, Ensemble, and the bundle on disk."""
