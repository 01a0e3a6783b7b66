"""Evaluation: Dice and HD95 per case and organ, in the original geometry."""

from fedpsmos.evaluation.evaluate import evaluate_site
from fedpsmos.evaluation.metrics import dice, hd95

__all__ = ["dice", "evaluate_site", "hd95"]
