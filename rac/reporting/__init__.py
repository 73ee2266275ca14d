"""Reports of one run and comparisons across the runs of a work dir."""
