"""Payper's development tooling: the local cluster, the test stack, the demo and the
generators. Never shipped: the image and the payper wheel hold only what runs in a cluster."""
