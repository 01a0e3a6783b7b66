"""Inference: Gaussian sliding window and export of predictions to the original geometry.

The names below load their module on first use (:mod:`fedpsmos.lazy`): a training job that needs only the
sliding window does not import the export path (:mod:`fedpsmos.inference.predict`: image files, resampling).
"""

from fedpsmos.lazy import lazy_exports

__all__ = ["compute_gaussian", "compute_steps", "predict_logits", "predict_site"]
__getattr__ = lazy_exports(
    __name__,
    {
        "compute_gaussian": "sliding_window",
        "compute_steps": "sliding_window",
        "predict_logits": "sliding_window",
        "predict_site": "predict",
    },
)
