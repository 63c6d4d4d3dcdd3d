"""The benchmark: the job against a plain Python loop on generated archives."""
