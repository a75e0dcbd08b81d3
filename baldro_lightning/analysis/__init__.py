"""Analysis across runs: reading run directories, the report's tables and figures, and sweeps."""
