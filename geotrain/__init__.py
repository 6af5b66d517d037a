"""geotrain: multi-datacenter DiLoCo training."""
