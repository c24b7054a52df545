"""Entry point of payper-operator (lands with its issue)."""

import sys


def main() -> int:
    print("payper-operator: not implemented yet", file=sys.stderr)
    return 2
