"""Preprocessing: resampling to the shared spacing, CT normalisation, and the per-case file (``storage``).

See :mod:`fedpsmos.preprocessing.resample` for the grid convention and the separable B-spline resampler,
:mod:`fedpsmos.preprocessing.normalise` for the CT scheme, :mod:`fedpsmos.preprocessing.case` for
:func:`preprocess_case` and :mod:`fedpsmos.preprocessing.fingerprint` for the federated data fingerprint
behind the ``auto`` settings.
"""

from fedpsmos.preprocessing.case import (
    NPZ_KEYS,
    PreprocessingError,
    preprocess_case,
    preprocess_manifest_case,
)
from fedpsmos.preprocessing.normalise import normalise_ct
from fedpsmos.preprocessing.resample import (
    resample_array,
    resample_image_sitk,
    resample_label_to_geometry,
    resampled_shape,
)

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
