"""The typed topology and what is derived from it."""
