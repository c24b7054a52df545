"""payper-operator."""
