"""Helpers for Payper's own tests, demo and benchmarks (not used by the shipped services)."""
