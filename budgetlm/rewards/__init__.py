"""Length, effort, compression and routing rewards in TRL's reward-function form (planned)."""
