"""Checkpoints: parts, manifests, verification, background writes."""
