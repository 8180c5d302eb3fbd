"""Training: the run scaffold, the classification and CycleGAN loops, checkpoints, run logging, precision and strategies."""
