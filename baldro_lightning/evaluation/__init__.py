"""Evaluation: the batched scoring engine, the TOFU and MUSE evaluators, their metrics, the run record, the
in-training callbacks and the evaluate commands."""
