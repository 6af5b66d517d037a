"""The control plane: etcd membership, leases, fenced run state."""
