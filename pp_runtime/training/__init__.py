"""Fine-tuning: schedules, simulator, executor, trainer, data, checkpoints, LoRA, optimizer sharding."""
