"""Datasets held in memory as uint8 tensors, batch iteration and batched augmentation."""
