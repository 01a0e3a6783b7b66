"""Evaluation: Dice and HD95 per case and organ, in the original geometry.

The names below load their module on first use (:mod:`fedpsmos.lazy`): a training job that needs only the
metrics does not import pandas with :mod:`fedpsmos.evaluation.evaluate`.
"""

from fedpsmos.lazy import lazy_exports

__all__ = ["dice", "evaluate_site", "hd95"]
__getattr__ = lazy_exports(__name__, {"dice": "metrics", "hd95": "metrics", "evaluate_site": "evaluate"})
