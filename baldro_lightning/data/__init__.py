"""Benchmark data: reading rows, tokenizing prompts and answers, and the Lightning data modules for TOFU and MUSE."""
