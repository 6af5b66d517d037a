"""The coordinator: rounds, merges and the outer optimizer (geotrain.orchestrator)."""
