"""The subnet manager: leases in etcd (registry = storage, manager = policy)."""
