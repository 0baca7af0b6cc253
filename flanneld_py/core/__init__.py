"""The pure core: protocol and policy logic with no I/O.

Nothing under ``flanneld_py.core`` imports asyncio, sockets, etcd or netlink;
everything here is plain data in, plain data out, and is tested without a kernel.
"""
