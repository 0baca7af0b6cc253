"""The layering rules, checked on the source: who may import whom.

- nothing imports the daemon's wiring (``flanneld_py.app``) except the CLI;
- ``core`` is pure: no asyncio, no I/O libraries, nothing outside ``core``;
- ``ops`` sees the daemon and backends through narrow views, never a concrete backend class;
- ``errors`` is a leaf;
- netlink is ours (``netlink/batch.py``): no netlink library, whose imports alone cost the daemon
  ~12 MB and ~0.2 s (``test_daemon_imports`` checks what a running daemon loads).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "flanneld_py"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports (relative imports resolved), at any depth of the file."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


MODULES = {_module_name(path): _imports(path) for path in PACKAGE.rglob("*.py")}


def test_the_module_table_is_read():
    assert "flanneld_py.app" in MODULES and "flanneld_py.core.lease_policy" in MODULES
    assert "flanneld_py.core.lease" in MODULES["flanneld_py.core.lease_policy"]


def test_only_the_cli_imports_the_daemon():
    importers = {name for name, imports in MODULES.items() if "flanneld_py.app" in imports}
    assert importers == {"flanneld_py.cli"}


def test_core_is_pure():
    for name, imports in MODULES.items():
        if not name.startswith("flanneld_py.core"):
            continue
        ours = {i for i in imports if i.startswith("flanneld_py.")}
        assert all(i.startswith("flanneld_py.core") for i in ours), (name, ours)
        assert not imports & {"asyncio", "socket", "subprocess", "aetcd", "grpc", "pyroute2"}, (name, imports)


def test_ops_uses_views_not_concrete_backends():
    concrete = ("flanneld_py.backend.udp.backend", "flanneld_py.backend.vxlan", "flanneld_py.backend.hostgw",
                "flanneld_py.backend.factory")
    for name, imports in MODULES.items():
        if name.startswith("flanneld_py.ops"):
            assert not any(i.startswith(concrete) for i in imports), (name, sorted(imports))


def test_errors_is_a_leaf():
    assert not {i for i in MODULES["flanneld_py.errors"] if i.startswith("flanneld_py")}


def test_no_netlink_library():
    importers = {name for name, imports in MODULES.items() if any(i.split(".")[0] == "pyroute2" for i in imports)}
    assert importers == set()


def test_grpc_and_protobuf_stay_at_the_etcd_edge():
    """The etcd client is the only user of gRPC and protobuf; no etcd client library (aetcd cost
    ~1.2 MB resident for stubs alone: subnet/etcdpb.py declares the messages)."""
    users = {name for name, imports in MODULES.items()
             if any(i.split(".")[0] in ("grpc", "google", "aetcd") for i in imports)}
    assert users == {"flanneld_py.subnet.registry", "flanneld_py.subnet.etcdpb"}
    assert not any(i.split(".")[0] == "aetcd" for imports in MODULES.values() for i in imports)
