"""payper-agent: measures active GPU time per container on one node, from NVML."""
