"""Training: log-probabilities, per-sample losses, DRO objectives, batches, collectives, the LightningModules,
model loading, sharding, LoRA and export."""
