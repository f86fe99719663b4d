"""chatmeter: a self-hosted backend for AI chat products with exact token metering."""

__version__ = "0.1.0"
