"""The leaf layer: types, errors, datatypes, configuration and the backend contract (stdlib + numpy)."""
