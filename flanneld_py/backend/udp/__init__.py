"""The userspace UDP overlay: TUN ``flannel0`` and one UDP socket, flannel's wire format."""
