"""The networks: the backbone registry and its entries, weights, the small CNN trained from scratch."""
