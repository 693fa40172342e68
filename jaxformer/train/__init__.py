"""Training: loss, optimizers, the train step, checkpoints, the loop and its logs."""
