"""Evaluation and inference: reading a trained run back, classification and translation metrics, predictions, figures."""
