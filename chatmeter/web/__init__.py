"""The web chat page served at `/`."""
