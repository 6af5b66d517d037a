"""Certificates and mTLS for a run's channels (docs/security.md)."""
