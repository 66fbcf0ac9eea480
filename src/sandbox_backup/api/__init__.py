"""The manager REST API."""
