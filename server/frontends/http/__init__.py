"""The REST (HTTP/JSON + binary tensor extension) frontend."""
