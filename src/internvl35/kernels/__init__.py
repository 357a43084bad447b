"""Hand-written CPU kernels (C, built on first use) for what torch's own ops do slowly."""
