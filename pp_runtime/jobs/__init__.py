"""What the entry points run: Hydra config in, one job out (infer, batch inference, fine-tune)."""
