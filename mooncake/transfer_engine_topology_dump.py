"""``python -m mooncake.transfer_engine_topology_dump``: print the local topology as JSON.

Mooncake's tool of the same name (mooncake-wheel) starts an engine and prints what its
``get_local_topology()`` returns; this one reads sysfs directly (:mod:`mooncake.topology`), so
it needs no engine, no RDMA library and no privileges:

* ``--backend tent`` (the default; ``auto`` is the same): TENT's ``{"nics": [...], "mems":
  [...]}`` with each memory location's NICs in ``rank0``/``rank1``/``rank2``;
* ``--backend te``: the classic Transfer Engine's NIC priority matrix ``{"cpu:0":
  [[preferred...], [available...]], ...}`` (the format ``MC_CUSTOM_TOPO_JSON`` takes);
* ``--backend full``: everything discovered (ports, GIDs, PCI paths, the GPU/NUMA-to-NIC path
  classes).

``--device-name mlx5_0,mlx5_1`` keeps only those RDMA devices (Mooncake maps it to
``MC_TE_FILTERS``), ``--exclude`` drops some, ``--root DIR`` reads another sysfs/procfs tree
(a fixture, or a host's ``/sys`` mounted elsewhere).  ``--label`` prefixes the JSON the way
Mooncake's tool does (``Local topology [tent/discover]: ``).
"""

from __future__ import annotations

import argparse
import json
import sys

from mooncake.topology import discover

__all__ = ["main", "dump"]


def _names(text: str | None) -> list[str]:
    return [p.strip() for p in (text or "").split(",") if p.strip()]


def dump(backend: str = "tent", root: str = "/", include: list[str] | None = None,
         exclude: list[str] | None = None) -> dict:
    """The topology in ``backend``'s shape (``tent``/``auto``, ``te``, ``full``)."""
    topo = discover(root).filtered(include or (), exclude or ())
    if backend == "te":
        return topo.to_priority_matrix()
    if backend == "full":
        return topo.to_dict() | {"tent": topo.to_tent_json()}
    return topo.to_tent_json()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mooncake.transfer_engine_topology_dump",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--backend", choices=("auto", "tent", "te", "full"), default="auto",
                   help="output shape: TENT {nics, mems} (auto, tent), the classic priority "
                        "matrix (te), or everything discovered (full)")
    p.add_argument("--device-name", default="",
                   help="keep only these RDMA devices (comma-separated)")
    p.add_argument("--exclude", default="", help="drop these RDMA devices (comma-separated)")
    p.add_argument("--root", default="/", help="root of the sysfs/procfs tree to read")
    p.add_argument("--label", action="store_true",
                   help="prefix the JSON with 'Local topology [backend/discover]: ' as "
                        "Mooncake's tool prints it")
    p.add_argument("--compact", action="store_true", help="one line instead of indented")
    args = p.parse_args(argv)
    backend = "tent" if args.backend == "auto" else args.backend
    try:
        out = dump(backend, args.root, _names(args.device_name), _names(args.exclude))
    except OSError as e:
        print(f"error: failed to dump topology: {e}", file=sys.stderr)
        return 1
    text = json.dumps(out, indent=None if args.compact else 4)
    print(f"Local topology [{backend}/discover]: {text}" if args.label else text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
