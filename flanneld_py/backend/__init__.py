"""Backends: how leases become a datapath (udp, vxlan, host-gw)."""
