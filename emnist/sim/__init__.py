"""The virtual-time simulator: the real workers' code paths on a simulated cluster."""
