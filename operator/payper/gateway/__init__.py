"""payper-gateway."""
