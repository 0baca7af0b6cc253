"""flanneld-py: a flannel-compatible overlay network daemon.

Kept import-free on purpose: the CNI shim and ``--version`` must start fast.
"""

__version__ = "0.1.0"
