"""The training system: optimizer, state, the jitted step, mesh, checkpoints, metrics, the loop."""
