"""Per-site worker groups: inner training and the site leader (geotrain.worker)."""
