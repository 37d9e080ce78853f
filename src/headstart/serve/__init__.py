"""`headstart serve`: the HTTP API and its page."""
