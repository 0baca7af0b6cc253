"""flanneld-py's datapath benchmark: ``python3 -m bench`` (see bench/README.md).

Builds two-node labs in network namespaces with the real daemon, etcd and CNI
plugin, and measures each datapath (bare underlay, host-gw, vxlan, udp, and
optionally flannel's own flanneld) side by side in one run; then CNI ADD/DEL
latency against the reference plugins and, with ``--peers``, behaviour at scale.

Modules: ``modes`` (building each mode's lab), ``measure`` (iperf3, ping and
/proc: parsing apart from running), ``datapath`` (one round of one mode),
``cni_latency``, ``scale`` + ``scale_agent``, ``report`` (results.json,
report.md, charts), ``runner`` (the run), ``__main__`` (the command line).
"""
