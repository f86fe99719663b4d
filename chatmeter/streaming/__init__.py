"""The exchange: one message in, a streamed and metered reply out."""
