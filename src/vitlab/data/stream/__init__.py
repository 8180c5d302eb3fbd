"""Streamed data: image folders and WebDataset shards decoded per image in DataLoader workers, resumable at any batch."""
