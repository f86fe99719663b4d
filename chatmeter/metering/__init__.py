"""Metering: token counting, budgets (reserve and settle) and the usage ledger."""
