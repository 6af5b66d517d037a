"""A calibrated discrete-event simulator of geotrain runs (`geotrain simulate`, docs/simulator.md)."""
