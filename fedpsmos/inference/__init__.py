"""Inference: Gaussian sliding window and export of predictions to the original geometry."""

from fedpsmos.inference.predict import predict_site
from fedpsmos.inference.sliding_window import compute_gaussian, compute_steps, predict_logits

__all__ = ["compute_gaussian", "compute_steps", "predict_logits", "predict_site"]
