"""GRPO recipes on TRL's ``GRPOTrainer`` (planned)."""
