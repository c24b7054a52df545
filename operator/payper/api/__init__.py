"""Payper's API types: the single source of truth for the CRDs and for every reader."""
