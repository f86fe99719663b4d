"""The `chatmeter` command line."""
