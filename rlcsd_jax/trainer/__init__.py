"""The RL training loop: rollouts, hints, multi-context scoring, updates, evaluation."""
