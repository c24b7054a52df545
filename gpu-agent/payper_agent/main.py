"""Entry point of payper-agent (lands with its issue)."""

import sys


def main() -> int:
    print("payper-agent: not implemented yet", file=sys.stderr)
    return 2
