"""Training: the loop, optimizers and schedules."""
