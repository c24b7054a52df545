"""Entry point of payper-gateway (lands with its issue)."""

import sys


def main() -> int:
    print("payper-gateway: not implemented yet", file=sys.stderr)
    return 2
