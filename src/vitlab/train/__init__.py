"""Training: the classification loop, checkpoints, run logging and the multi-process plumbing."""
