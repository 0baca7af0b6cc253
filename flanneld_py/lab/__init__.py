"""A network lab in namespaces: nodes, an underlay switch, etcd, pods.

Used by the end-to-end tests, by bench/ and by the demo (``python3 -m flanneld_py.lab``).
Everything it creates carries a per-run tag in its name, and everything is
removed by the context managers that created it, also on failure.
"""
