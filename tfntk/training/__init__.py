"""Training loop, learning-rate schedules, snapshots and spawning of children."""
