"""The ``payper-dev`` command line: Payper's development tooling, never shipped.

The local cluster (``cluster build/up/down/status``), the demo, and the generated files
(``crds``, ``dashboards``, ``config-reference``, ``chart-schema``, each with ``--check``
for drift). Each sub-command is a thin shell over a library function, so tests and the
Makefile exercise the same code a developer runs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from payper_dev.cluster import binaries
from payper_dev.cluster.local import ClusterConfig, ClusterError, LocalCluster


def _cluster_up(args: argparse.Namespace) -> int:
    config = ClusterConfig(
        gpu_nodes=args.gpu_nodes,
        gpus_per_node=args.gpus_per_node,
        gpu_product=args.gpu_product,
        cold_start_ms=args.cold_start_ms,
        pod_cidr=args.pod_cidr,
        crds_dir=args.crds,
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
