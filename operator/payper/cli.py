"""The ``payper`` command line: what a user of a cluster running Payper types.

``payper bill`` prints an invoice from the BillingRecords; ``payper reconcile`` shows,
per node and GPU, where every GPU-second went, next to the records; ``payper export
focus`` writes a FOCUS cost and usage file, ``payper export status`` what each export
sink is still owed, ``payper export stripe --check`` whether Stripe's meters and prices
mirror the plans. Each sub-command is a thin
shell over a library function, so tests exercise the same code a user runs. Development
commands (the local cluster, the demo, the generators) are ``payper-dev``'s.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _bill(args: argparse.Namespace) -> int:
    import asyncio

    from payper.api.billing_record import PLURAL, BillingRecord
    from payper.api.common import API_VERSION
    from payper.billing import invoice
    from payper.kube import Kube, resource_path

    try:
        start = invoice.parse_time(args.start) if args.start else None
        end = invoice.parse_time(args.end) if args.end else None
    except ValueError as error:
        print(f"payper: --from/--to must be ISO dates or date-times: {error}", file=sys.stderr)
        return 2

    async def fetch() -> list[BillingRecord]:
        namespace = None if args.all_namespaces else args.namespace
        async with Kube.connect(args.kubeconfig) as kube:
            listing = await kube.list(resource_path(API_VERSION, PLURAL, namespace))
        return [BillingRecord.model_validate(item) for item in listing["items"]]

    bill = invoice.build(asyncio.run(fetch()), start, end)
    render = {"table": invoice.as_table, "json": invoice.as_json, "csv": invoice.as_csv}
    sys.stdout.write(render[args.output](bill))
    return 0


def _reconcile(args: argparse.Namespace) -> int:
    import asyncio

    from payper.api.billing_record import PLURAL, BillingRecord
    from payper.api.common import API_VERSION
    from payper.api.reconciliation import NodeWindowReconciliation
    from payper.billing import invoice, reconcile_report
    from payper.billing.reconciliation_store import parse, selector
    from payper.kube import Kube, resource_path

    try:
        start = invoice.parse_time(args.start) if args.start else None
        end = invoice.parse_time(args.end) if args.end else None
    except ValueError as error:
        print(f"payper: --from/--to must be ISO dates or date-times: {error}", file=sys.stderr)
        return 2

    async def fetch() -> tuple[list[NodeWindowReconciliation], list[BillingRecord] | None]:
        async with Kube.connect(args.kubeconfig) as kube:
            objects = await kube.list(
                resource_path("v1", "configmaps", args.operator_namespace),
                {"labelSelector": selector(node=args.node)},
            )
            records = None
            if args.node is None:  # records are not per node
                listing = await kube.list(resource_path(API_VERSION, PLURAL))
                records = [BillingRecord.model_validate(i) for i in listing["items"]]
        return [parse(item) for item in objects["items"]], records

    objects, records = asyncio.run(fetch())
    result = reconcile_report.build(objects, records, start, end, args.node)
    render = {"table": reconcile_report.as_table, "json": reconcile_report.as_json}
    sys.stdout.write(render[args.output](result))
    return 0 if result.ok else 1


def _period(args: argparse.Namespace) -> tuple[int | None, int | None]:
    from payper.billing import invoice

    start = invoice.parse_time(args.start) if args.start else None
    end = invoice.parse_time(args.end) if args.end else None
    return start, end


def _records(args: argparse.Namespace) -> list[dict[str, Any]]:
    import asyncio

    from payper.api.billing_record import PLURAL
    from payper.api.common import API_VERSION
    from payper.kube import Kube, resource_path

    async def fetch() -> list[dict[str, Any]]:
        namespace = None if getattr(args, "all_namespaces", True) else args.namespace
        async with Kube.connect(args.kubeconfig) as kube:
            listing = await kube.list(resource_path(API_VERSION, PLURAL, namespace))
        items: list[dict[str, Any]] = listing["items"]
        return items

    return asyncio.run(fetch())


def _export_focus(args: argparse.Namespace) -> int:
    from payper.api.billing_record import BillingRecord
    from payper.billing import focus

    try:
        start, end = _period(args)
    except ValueError as error:
        print(f"payper: --from/--to must be ISO dates or date-times: {error}", file=sys.stderr)
        return 2
    records = [BillingRecord.model_validate(item) for item in _records(args)]
    text = focus.as_csv(focus.rows(records, start, end, args.issuer))
    if args.out == "-":
        sys.stdout.write(text)
        return 0
    target = Path(args.out)
    partial = target.with_name(f".{target.name}.partial")
    try:
        partial.write_text(text)
        partial.replace(target)  # whole or not at all
    except OSError as error:
        print(f"payper: cannot write {target}: {error}", file=sys.stderr)
        return 1
    return 0


def _export_status(args: argparse.Namespace) -> int:
    import json

    from payper.billing import outbox
    from payper.clock import iso

    backlogs, awaiting = outbox.backlogs(_records(args))
    if args.output == "json":
        rows = [
            {
                "sink": b.sink,
                "owedRecords": b.owed_records,
                "oldestOwedWindowStart": None
                if b.oldest_window_start_ms is None
                else iso(b.oldest_window_start_ms),
                "unreadable": b.unreadable,
            }
            for b in backlogs
        ]
        print(json.dumps({"sinks": rows, "finalRecordsAwaitingExport": awaiting}, indent=2))
        return 0
    print(f"{'SINK':<24} {'OWED-RECORDS':>12}  {'OLDEST-OWED-WINDOW':<20}  UNREADABLE")
    for b in backlogs:
        oldest = "-" if b.oldest_window_start_ms is None else iso(b.oldest_window_start_ms)
        print(f"{b.sink:<24} {b.owed_records:>12}  {oldest:<20}  {b.unreadable}")
    print(f"Final records awaiting export: {awaiting}")
    return 0


def _export_stripe(args: argparse.Namespace) -> int:
    import stripe

    from payper.billing.config import StripeSinkConfig
    from payper.billing.stripe_sink import check
    from payper.operator.config import ConfigError, load

    try:
        config = load(Path(args.config))
    except ConfigError as error:
        print(f"payper: {error}", file=sys.stderr)
        return 2
    sinks = [s for s in config.billing.export.sinks if isinstance(s, StripeSinkConfig)]
    if args.sink is not None:
        sinks = [s for s in sinks if s.name == args.sink]
    if not sinks:
        which = f"named {args.sink!r} " if args.sink else ""
        print(f"payper: {args.config} configures no Stripe sink {which}", file=sys.stderr)
        return 2
    failed = False
    for sink in sinks:
        try:
            problems = check(sink, config.billing.plans)
        except (OSError, stripe.StripeError) as error:
            print(f"payper: sink {sink.name}: cannot read Stripe: {error}", file=sys.stderr)
            return 1
        for problem in problems:
            print(f"{sink.name}: {problem}")
        if not problems:
            print(f"{sink.name}: Stripe's meters, prices and customers mirror the configuration")
        failed = failed or bool(problems)
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="payper", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    bill = commands.add_parser("bill", help="an invoice from BillingRecords")
    scope = bill.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", default="default")
    scope.add_argument("-A", "--all-namespaces", action="store_true")
    bill.add_argument("--from", dest="start", help="first window start to include (ISO)")
    bill.add_argument("--to", dest="end", help="windows starting before this (ISO)")
    bill.add_argument("-o", "--output", choices=("table", "json", "csv"), default="table")
    bill.add_argument("--kubeconfig", default=None)
    bill.set_defaults(func=_bill)

    reconcile = commands.add_parser(
        "reconcile",
        help="where every GPU-second went, per node and GPU, and whether it adds up "
        "(exit status 1 when it does not)",
    )
    reconcile.add_argument("--from", dest="start", help="first window start to include (ISO)")
    reconcile.add_argument("--to", dest="end", help="windows starting before this (ISO)")
    reconcile.add_argument("--node", default=None, help="one node only")
    reconcile.add_argument(
        "--operator-namespace",
        default="payper-system",
        help="where the operator keeps the reconciliation (its namespace)",
    )
    reconcile.add_argument("-o", "--output", choices=("table", "json"), default="table")
    reconcile.add_argument("--kubeconfig", default=None)
    reconcile.set_defaults(func=_reconcile)

    export = commands.add_parser("export", help="usage out of the cluster")
    exports = export.add_subparsers(dest="export", required=True)
    focus = exports.add_parser(
        "focus", help="a FOCUS 1.0 cost and usage file (CSV) of the records of a period"
    )
    scope = focus.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", default="default")
    scope.add_argument("-A", "--all-namespaces", action="store_true")
    focus.add_argument("--from", dest="start", help="first window start to include (ISO)")
    focus.add_argument("--to", dest="end", help="windows starting before this (ISO)")
    focus.add_argument("--issuer", default="Payper", help="InvoiceIssuerName and ProviderName")
    focus.add_argument("--out", default="-", help="file to write (default: standard output)")
    focus.add_argument("--kubeconfig", default=None)
    focus.set_defaults(func=_export_focus)
    status = exports.add_parser("status", help="what each sink is still owed, per the records")
    status.add_argument("-o", "--output", choices=("table", "json"), default="table")
    status.add_argument("--kubeconfig", default=None)
    status.set_defaults(func=_export_status)
    stripe = exports.add_parser(
        "stripe",
        help="compare Stripe's meters, prices and customers with a Stripe sink's "
        "configuration (exit status 1 when they differ)",
    )
    stripe.add_argument(
        "--check", action="store_true", required=True, help="read Stripe and compare (read only)"
    )
    stripe.add_argument("--config", required=True, help="the operator's configuration file")
    stripe.add_argument("--sink", default=None, help="one sink only (default: every Stripe sink)")
    stripe.set_defaults(func=_export_stripe)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
