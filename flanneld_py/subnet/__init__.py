"""Subnet leases in a store: ``store`` (the interface), ``registry`` (etcd), ``memory`` (tests),
``manager`` (which subnet to claim), ``runner`` (runs :mod:`flanneld_py.core.lease_policy`)."""
