"""The measurement engine: sites, statistics, the hooked loop, run orchestration and results."""
