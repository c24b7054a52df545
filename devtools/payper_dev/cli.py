"""The ``payper-dev`` command line: Payper's development tooling, never shipped.

The local cluster (``cluster build/up/down/status``), the demo, and the generated files
(``crds``, ``dashboards``, ``config-reference``, ``chart-schema``, each with ``--check``
for drift). Each sub-command is a thin shell over a library function, so tests and the
Makefile exercise the same code a developer runs.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from payper_dev.cluster import binaries
from payper_dev.cluster.local import ClusterConfig, ClusterError, LocalCluster
from payper_dev.cluster.pki import REAL_NODE_NAME as NODE_NAME


def _cluster_up(args: argparse.Namespace) -> int:
    config = ClusterConfig(
        gpu_nodes=args.gpu_nodes,
        gpus_per_node=args.gpus_per_node,
        gpu_product=args.gpu_product,
        cold_start_ms=args.cold_start_ms,
        pod_cidr=args.pod_cidr,
        crds_dir=args.crds,
        real_node=args.real_node,
    )
    cluster = LocalCluster(args.dir)
    kubeconfig = cluster.up(config, timeout_s=args.timeout)
    print(
        f"cluster up in {cluster.directory}; use: export KUBECONFIG={kubeconfig}", file=sys.stderr
    )
    print(kubeconfig)
    return 0


def _cluster_down(args: argparse.Namespace) -> int:
    killed = LocalCluster(args.dir).down()
    if killed:
        print(f"had to SIGKILL: {', '.join(killed)}", file=sys.stderr)
    print("cluster down")
    return 0


def _cluster_status(args: argparse.Namespace) -> int:
    cluster = LocalCluster(args.dir)
    running = cluster.running()
    if not running:
        print(f"no cluster in {cluster.directory}")
        return 1
    for name, alive in running.items():
        print(f"{name:<26} {'running' if alive else 'NOT RUNNING'}")
    print(f"kubeconfig: {cluster.kubeconfig}")
    return 0 if cluster.is_up() else 1


def _cluster_build(args: argparse.Namespace) -> int:
    print(binaries.build(force=args.force))
    return 0


def _node_up(args: argparse.Namespace) -> int:
    from payper_dev.cluster.node import RealNode

    node = RealNode(args.dir)
    node.up(timeout_s=args.timeout)
    for archive, name in args.image or []:
        print(f"pushed {node.push(Path(archive), name)}", file=sys.stderr)
    timings = ", ".join(f"{k} {v:.1f}s" for k, v in node.timings.items())
    print(f"real node {NODE_NAME} up ({timings or 'already running'}); registry {node.registry()}")
    return 0


def _node_down(args: argparse.Namespace) -> int:
    from payper_dev.cluster.node import RealNode

    started = time.monotonic()
    RealNode(args.dir).down()
    print(f"real node down in {time.monotonic() - started:.1f}s; nothing of it is left")
    return 0


def _node_status(args: argparse.Namespace) -> int:
    from payper_dev.cluster.node import RealNode, leftovers

    node = RealNode(args.dir)
    running = node.running()
    for name, alive in running.items():
        print(f"{name:<16} {'running' if alive else 'NOT RUNNING'}")
    if running:
        print(f"registry: {node.registry()}")
    else:
        print(f"no real node in {node.directory}")
        for item in leftovers(node.directory):
            print(f"left over: {item}")
    return 0 if node.is_up() else 1


def _node_push(args: argparse.Namespace) -> int:
    from payper_dev.cluster.node import RealNode

    print(RealNode(args.dir).push(Path(args.archive), args.name))
    return 0


def _node_build(args: argparse.Namespace) -> int:
    from payper_dev.cluster import node_binaries

    print(node_binaries.build(force=args.force))
    return 0


def _image_arg(text: str) -> tuple[str, str]:
    archive, sep, name = text.partition("=")
    if not sep or not archive or not name:
        raise argparse.ArgumentTypeError(
            "expected ARCHIVE=NAME, e.g. build/images/x.tar=payper/x:1"
        )
    return archive, name


def _generated(
    location: Path, check: bool, drift: Callable[[], str], write: Callable[[], list[Path]], how: str
) -> int:
    """Write a generated file set, or with ``check`` report how it differs (exit 1)."""
    if check:
        problems = drift()
        if problems:
            print(problems, file=sys.stderr)
            print(f"{location} is stale: run `{how}`", file=sys.stderr)
            return 1
        print(f"{location} is up to date")
        return 0
    for path in write():
        print(f"wrote {path}")
    return 0


def _crds(args: argparse.Namespace) -> int:
    from payper_dev import crds

    directory = Path(args.dir)
    return _generated(
        directory,
        args.check,
        lambda: "\n".join(crds.drift(directory)),
        lambda: crds.write(directory),
        "make crds",
    )


def _dashboards(args: argparse.Namespace) -> int:
    from payper_dev import dashboards

    directory = Path(args.dir)
    return _generated(
        directory,
        args.check,
        lambda: dashboards.drift(directory),
        lambda: [dashboards.write(directory)],
        "make dashboards",
    )


def _config_reference(args: argparse.Namespace) -> int:
    from payper_dev import chart_docs

    out = Path(args.out)

    def write() -> list[Path]:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(chart_docs.render())
        return [out]

    try:
        return _generated(out, args.check, lambda: chart_docs.drift(out), write, "make docs")
    except chart_docs.UndocumentedValueError as error:
        print(f"payper-dev: {error}", file=sys.stderr)
        return 1


def _chart_schema(args: argparse.Namespace) -> int:
    from payper_dev import chart_schema

    chart = Path(args.chart)
    try:
        return _generated(
            chart / chart_schema.SCHEMA_FILE,
            args.check,
            lambda: chart_schema.drift(chart),
            lambda: [chart_schema.write(chart)],
            "make chart-schema",
        )
    except chart_schema.SchemaMergeError as error:
        print(f"payper-dev: {error}", file=sys.stderr)
        return 1


def _demo(args: argparse.Namespace) -> int:
    from payper_dev import demo

    return demo.down() if args.down else demo.run(args.keep)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="payper-dev", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    cluster = commands.add_parser("cluster", help="the local Kubernetes cluster")
    cluster_commands = cluster.add_subparsers(dest="cluster_command", required=True)
    defaults = ClusterConfig()
    up = cluster_commands.add_parser("up", help="start it (builds the binaries once)")
    up.add_argument("--dir", default="build/cluster", help="cluster directory")
    up.add_argument("--gpu-nodes", type=int, default=defaults.gpu_nodes)
    up.add_argument("--gpus-per-node", type=int, default=defaults.gpus_per_node)
    up.add_argument("--gpu-product", default=defaults.gpu_product)
    up.add_argument(
        "--cold-start-ms",
        type=int,
        default=defaults.cold_start_ms,
        help="default pod Ready delay (annotation payper.dev/cold-start-delay overrides)",
    )
    up.add_argument("--pod-cidr", default=defaults.pod_cidr, help="loopback range for pod IPs")
    up.add_argument(
        "--crds", help="a directory of CRD manifests to serve before the controllers start"
    )
    up.add_argument(
        "--real-node",
        action="store_true",
        help="add the real node (kubelet, containerd; needs root): see `payper-dev node`",
    )
    up.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for readiness")
    up.set_defaults(func=_cluster_up)
    for name, func, text in (
        ("down", _cluster_down, "stop every process of it"),
        ("status", _cluster_status, "show which processes run"),
    ):
        sub = cluster_commands.add_parser(name, help=text)
        sub.add_argument("--dir", default="build/cluster", help="cluster directory")
        sub.set_defaults(func=func)
    build = cluster_commands.add_parser("build", help="build the control-plane binaries once")
    build.add_argument("--force", action="store_true", help="rebuild even if cached")
    build.set_defaults(func=_cluster_build)

    node = commands.add_parser(
        "node", help="the real node of the local cluster (kubelet, containerd, kube-proxy, DNS)"
    )
    node_commands = node.add_subparsers(dest="node_command", required=True)
    node_up = node_commands.add_parser("up", help="start it in a cluster up with --real-node")
    node_up.add_argument("--dir", default="build/cluster", help="cluster directory")
    node_up.add_argument("--timeout", type=float, default=180.0)
    node_up.add_argument(
        "--image",
        type=_image_arg,
        action="append",
        metavar="ARCHIVE=NAME",
        help="push an OCI archive into the node's registry as NAME (repeatable)",
    )
    node_up.set_defaults(func=_node_up)
    for name, func, text in (
        ("down", _node_down, "remove it and everything it left on the machine"),
        ("status", _node_status, "show which of its processes run (or what is left over)"),
    ):
        sub = node_commands.add_parser(name, help=text)
        sub.add_argument("--dir", default="build/cluster", help="cluster directory")
        sub.set_defaults(func=func)
    push = node_commands.add_parser("push", help="push an OCI archive into its registry")
    push.add_argument("--dir", default="build/cluster", help="cluster directory")
    push.add_argument("archive")
    push.add_argument("name", help="repository:tag in the registry, e.g. payper/payper:0.1.0")
    push.set_defaults(func=_node_push)
    node_build = node_commands.add_parser("build", help="build its binaries and pause image once")
    node_build.add_argument("--force", action="store_true", help="rebuild even if cached")
    node_build.set_defaults(func=_node_build)

    boards = commands.add_parser("dashboards", help="write (or --check) the Grafana dashboards")
    boards.add_argument("--dir", default="charts/payper/dashboards")
    boards.add_argument("--check", action="store_true", help="fail if the files are stale")
    boards.set_defaults(func=_dashboards)

    reference = commands.add_parser(
        "config-reference", help="write (or --check) docs/configuration.md from values.yaml"
    )
    reference.add_argument("--out", default="docs/configuration.md")
    reference.add_argument("--check", action="store_true", help="fail if the file is stale")
    reference.set_defaults(func=_config_reference)

    schema = commands.add_parser(
        "chart-schema",
        help="write (or --check) the chart's values.schema.json from the operator's models",
    )
    schema.add_argument("--chart", default="charts/payper", help="chart directory")
    schema.add_argument("--check", action="store_true", help="fail if the file is stale")
    schema.set_defaults(func=_chart_schema)

    demo = commands.add_parser("demo", help="Payper end to end on a local cluster, narrated")
    demo.add_argument("--keep", action="store_true", help="leave it running afterwards")
    demo.add_argument("--down", action="store_true", help="stop a demo kept with --keep")
    demo.set_defaults(func=_demo)

    crds = commands.add_parser("crds", help="write (or --check) crds/ from payper.api")
    crds.add_argument("--dir", default="crds")
    crds.add_argument("--check", action="store_true", help="fail if the files are stale")
    crds.set_defaults(func=_crds)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except (ClusterError, binaries.BuildError) as error:
        print(f"payper-dev: {error}", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
