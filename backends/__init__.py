"""Built-in backends; each imports only server.core."""
