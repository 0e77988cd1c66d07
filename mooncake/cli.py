"""The ``mooncake`` command: ``config show``, ``transports``, ``doctor``, ``bench``, ``tune``,
``topology``, ``metadata-server``."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def _config(args: argparse.Namespace) -> int:
    import os

    from mooncake.config import parse_env_block, show
    from mooncake.errors import ConfigError

    env = dict(os.environ)
    try:
        for path in args.env_file or ():
            try:
                with open(path, encoding="utf-8") as f:
                    text = f.read(1 << 20)
            except OSError as e:
                raise ConfigError(f"--env-file {path}: {e.strerror or e}") from None
            env.update(parse_env_block(text, path))
        if args.tent:
            env["MC_TENT_CONF"] = args.tent
        print(show(as_json=args.json, env=env))
    except ConfigError as e:
        print(f"mooncake config show: {e}", file=sys.stderr)
        return 2
    return 0


def _transports(args: argparse.Namespace) -> int:
    import json

    from mooncake.registry import transport_status

    rows = transport_status()
    if args.json:
        print(json.dumps([r.__dict__ for r in rows], indent=2))
        return 0
    w = max(len(r.name) for r in rows) if rows else 4
    print(f"{'name':<{w}}  {'distribution':<14} {'available':<9}  reason / target")
    for r in rows:
        why = r.reason if not r.available else r.target
        if r.detail:
            why = f"{why} [{r.detail}]"
        print(f"{r.name:<{w}}  {r.distribution:<14} {'yes' if r.available else 'no':<9}  {why}")
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from mooncake import doctor

    return doctor.main(args)


def _bench(args: argparse.Namespace) -> int:
    from mooncake import bench

    return bench.main(args.rest)


def _tune(args: argparse.Namespace) -> int:
    from mooncake import tune

    return tune.main(args.rest)


def _topology(args: argparse.Namespace) -> int:
    from mooncake import topology_cli

    return topology_cli.main(args.rest)


def _metadata_server(args: argparse.Namespace) -> int:
    from mooncake.metadata import http_server

    return http_server.main(args.rest) or 0


def main(argv: list[str] | None = None) -> int:
    """Run one ``mooncake`` command; its exit status.  A reader that goes away (``mooncake config
    show | head``) ends the command quietly with 141 (128 + SIGPIPE), as a C tool's would."""
    try:
        rc = _main(argv)
        sys.stdout.flush()
        return rc
    except BrokenPipeError:
        import os

        devnull = os.open(os.devnull, os.O_WRONLY)  # the interpreter's last flush must not fail
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 141


def _main(argv: list[str] | None) -> int:
    p = argparse.ArgumentParser(prog="mooncake", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("config", help="configuration")
    csub = c.add_subparsers(dest="what", required=True)
    show = csub.add_parser("show", help="every effective option value and its source, and "
                                        "what each setting does")
    show.add_argument("--json", action="store_true")
    show.add_argument("--env-file", action="append", metavar="FILE",
                      help="read [export] NAME=value lines (a template) on top of the "
                           "environment; repeatable")
    show.add_argument("--tent", metavar="FILE_OR_JSON",
                      help="a TENT JSON config (file or inline), as MC_TENT_CONF")
    show.set_defaults(fn=_config)
    t = sub.add_parser("transports", help="installed transport plugins and availability")
    t.add_argument("--json", action="store_true")
    t.set_defaults(fn=_transports)
    from mooncake.doctor import add_arguments

    d = sub.add_parser("doctor", help="check this host against the production checklist "
                                      "(RDMA ports, GIDs, MTU, NUMA, GPU-NIC paths, huge "
                                      "pages, memlock, sysctls, token); --peer tests a peer")
    add_arguments(d)
    d.set_defaults(fn=_doctor)
    passthrough = {"bench": _bench, "tune": _tune, "metadata-server": _metadata_server,
                   "topology": _topology}
    for name, fn, hlp in (("bench", _bench, "transfer benchmark (see `mooncake bench -h`)"),
                          ("tune", _tune, "sweep slice size x workers x batch size, write the "
                                          "best config (see `mooncake tune -h`)"),
                          ("topology", _topology, "show this host's RDMA/NUMA/GPU topology, "
                                                  "dump TENT's JSON, generate "
                                                  "cluster-topology.json against a peer"),
                          ("metadata-server", _metadata_server, "HTTP metadata server")):
        b = sub.add_parser(name, help=hlp, add_help=False)
        b.add_argument("rest", nargs=argparse.REMAINDER)
        b.set_defaults(fn=fn)
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in passthrough:  # REMAINDER drops leading --flags
        return passthrough[argv[0]](argparse.Namespace(rest=argv[1:]))
    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
