"""Preprocessing: resampling to the shared spacing, CT normalisation, and the per-case file (``storage``).

See :mod:`fedpsmos.preprocessing.resample` for the grid convention and the separable B-spline resampler,
:mod:`fedpsmos.preprocessing.normalise` for the CT scheme, :mod:`fedpsmos.preprocessing.case` for
:func:`preprocess_case` and :mod:`fedpsmos.preprocessing.fingerprint` for the federated data fingerprint
behind the ``auto`` settings.

The names below load their module on first use (:mod:`fedpsmos.lazy`): a training job that reads case files
(:mod:`fedpsmos.preprocessing.storage`) does not import SimpleITK and the resamplers.
"""

from fedpsmos.lazy import lazy_exports

__all__ = [
    "NPZ_KEYS",
    "PreprocessingError",
    "normalise_ct",
    "preprocess_case",
    "preprocess_manifest_case",
    "resample_array",
    "resample_image_sitk",
    "resample_label_to_geometry",
    "resampled_shape",
]
_CASE = ["NPZ_KEYS", "PreprocessingError", "preprocess_case", "preprocess_manifest_case"]
_RESAMPLE = ["resample_array", "resample_image_sitk", "resample_label_to_geometry", "resampled_shape"]
__getattr__ = lazy_exports(
    __name__,
    {**dict.fromkeys(_CASE, "case"), "normalise_ct": "normalise", **dict.fromkeys(_RESAMPLE, "resample")},
)
