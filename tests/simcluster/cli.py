"""`scripts/sim-cluster`: bring a simulated cluster up for people (it outlives the command),
list the recorded ones, tear them down."""

from __future__ import annotations

import argparse
import sys

from . import cluster as cluster_module
from . import procs
from .cluster import SimCluster, SimClusterError
from .procs import ProcessId


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sim-cluster", description="N-node test cluster on this machine (root needed).")
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser("up", help="start a cluster and write its fab runtime config")
    up.add_argument("nodes", type=int, help="number of nodes (1..64)")
    up.add_argument("--docker", action="store_true", help="a dockerd per node, image gemm-sim")
    up.add_argument("--shared", action="store_true", help="all nodes share one /srv (like NFS)")
    up.add_argument("--slurm", action="store_true",
                    help="a real Slurm: slurmctld here, a slurmd per node (docs/SLURM.md)")
    up.add_argument("--ifnames", default=None,
                    help="interface name per node, comma-separated; the last one repeats "
                         "(default eth0)")
    up.add_argument("--name", default="sim", help="cluster name (default: sim)")
    up.add_argument("--workdir", default="/srv/gemm",
                    help="cluster.workdir in the written config (default /srv/gemm)")
    up.add_argument("--config", default=None,
                    help="also write the fab runtime config here (must end in .yaml)")

    down = commands.add_parser("down", help="tear down a cluster (by its recorded state)")
    which = down.add_mutually_exclusive_group()
    which.add_argument("--name", default="sim", help="cluster name (default: sim)")
    which.add_argument("--all", action="store_true", help="every recorded cluster")
    which.add_argument("--stale", action="store_true",
                       help="clusters whose owning process (a killed test run) is gone")

    commands.add_parser("status", help="list recorded clusters")
    return parser


def _up(args: argparse.Namespace) -> int:
    if args.config and not args.config.endswith((".yaml", ".yml")):
        raise ValueError(f"--config {args.config}: fab reads the format from the suffix; "
                         "use a name ending in .yaml")
    cluster = SimCluster(name=args.name, nodes=args.nodes, docker=args.docker,
                         shared_fs=args.shared, ifnames=args.ifnames, workdir=args.workdir,
                         slurm=args.slurm)
    cluster.up()
    cluster.detach()
    config = cluster.fabric_config_path
    if args.config:
        config = cluster.write_fabric_config(args.config)
    mode = ("docker, " if args.docker else "") + ("slurm, " if args.slurm else "") + (
        "shared /srv" if args.shared else "separate /srv")
    print(f"sim-cluster {cluster.name!r}: {len(cluster.nodes)} nodes up in "
          f"{cluster.up_seconds:.2f} s ({mode})")
    for node in cluster.nodes:
        print(f"  {node.name}  {node.address:<15} {node.hostname:<28} {node.ifname}")
    print(f"config:      {config}")
    print(f"ssh:         ssh -i {cluster.key_path} -o UserKnownHostsFile={cluster.known_hosts_path}"
          f" root@{cluster.nodes[0].address}")
    print(f"try:         fab -f {config} check")
    if args.slurm:
        print(f"slurm:       export SLURM_CONF={cluster.slurm_layout.conf}; sinfo")
    print(f"tear down:   scripts/sim-cluster down --name {cluster.name}")
    return 0


def _down(args: argparse.Namespace) -> int:
    with cluster_module.state_root_lock(cluster_module.default_state_root()):
        return _down_locked(args)


def _down_locked(args: argparse.Namespace) -> int:
    states = cluster_module.list_states()
    if args.all:
        chosen = states
    elif args.stale:
        chosen = [(d, s) for d, s in states if cluster_module.is_stale(s)]
    else:
        chosen = [(d, s) for d, s in states if d.name == args.name]
        if not chosen:
            print(f"sim-cluster: no cluster named {args.name!r} is recorded "
                  f"(see `scripts/sim-cluster status`)", file=sys.stderr)
            return 1
    for state_dir, state in chosen:
        cluster_module.teardown(state_dir)
        print(f"sim-cluster {state.get('name', state_dir.name)!r}: down")
    return 0


def _status(_: argparse.Namespace) -> int:
    states = cluster_module.list_states()
    if not states:
        print("no sim-cluster recorded")
    for state_dir, state in states:
        owner = state.get("owner")
        kind = "detached" if owner is None else f"owned by pid {owner[0]}"
        if cluster_module.is_stale(state):
            kind += " (stale: owner gone; `down --stale` removes it)"
        print(f"{state['name']}: {state['nodes']} nodes, subnet {state['subnet']}, "
              f"docker={state['docker']}, shared_fs={state['shared_fs']}, {kind}")
        for node in state.get("node", []):
            init = node.get("pids", {}).get("init")
            alive = init is not None and procs.is_running(ProcessId.from_json(init))
            print(f"  {node['name']}  {node['address']:<15} {node['hostname']:<28} "
                  f"{node['ifname']:<6} {'running' if alive else 'DOWN'}")
        print(f"  config: {state.get('fabric_config', state_dir / 'fabric.yaml')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return {"up": _up, "down": _down, "status": _status}[args.command](args)
    except (SimClusterError, ValueError) as error:
        print(f"sim-cluster: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
