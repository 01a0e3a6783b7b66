"""Export a workflow model as an nnU-Net v2 trained-model folder: ``fedpsmos export-nnunet`` (docs/nnunet.md).

The network is already nnU-Net v2's ``PlainConvUNet`` (:mod:`fedpsmos.network`), so the export only has to
describe, in nnU-Net's own files, the network and the steps the project applies around it:

``dataset.json``
    one channel ``CT``; ``labels`` maps each output channel's class name to its channel index, background 0.
    nnU-Net writes channel indices: for the five-organ model they equal the global class values (1 liver,
    2 spleen, 3 pancreas, 4 kidney_left, 5 kidney_right); a site-alone model's labels are numbered 1, 2, ...
    in the order of its organs (e.g. ``kidney_left`` 1, ``kidney_right`` 2), as ``dataset.json`` names them.
``plans.json``
    one ``3d_fullres`` configuration: the PlainConvUNet with the keyword arguments of
    :func:`fedpsmos.network.build_network` (the state dict loads unchanged), the training patch size, the
    model's spacing (nnU-Net's spacing is in array axis order, our z, y, x), ``CTNormalization`` whose
    foreground intensity properties are the model's clip window (``percentile_00_5``, ``percentile_99_5``),
    mean and std, so nnU-Net clips and normalises exactly as we do; identity transposes; SimpleITK I/O (no
    reorientation); image resampling of the model's interpolation order and linear logit resampling, both
    with ``force_separate_z`` off because the project interpolates along every axis alike.
``fold_0/checkpoint_final.pth``
    ``network_weights`` (the checkpoint's state dict), ``init_args`` (plans, configuration, fold, dataset
    json), ``trainer_name`` ``nnUNetTrainer`` (its ``build_network_architecture`` builds the network from
    the plans, deep supervision off at inference) and ``inference_allowed_mirroring_axes`` ``(0, 1)``:
    test-time mirroring never flips the left-right array axis.

nnU-Net does not reorient scans: it feeds the network the array as stored. The project's models are trained
on LPS-oriented arrays (docs/orientation.md) and never saw left-right mirrored anatomy, so nnU-Net users must
give LPS-stored scans (or reorient them first, e.g. ``sitk.DICOMOrient(image, "LPS")``).

The folder is written whole (a temporary sibling renamed at the end); before anything is written the state
dict is loaded into the network nnU-Net's own ``get_network_from_plans`` builds from the plans.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from fedpsmos.atomic import atomic_directory
from fedpsmos.inference.apply import model_settings
from fedpsmos.inference.predict import output_classes
from fedpsmos.network import NetworkSpec, NetworkSpecError
from fedpsmos.training.checkpoint import load_checkpoint

CONFIGURATION = "3d_fullres"
TRAINER = "nnUNetTrainer"
PLANS_NAME = "nnUNetPlans"
DEFAULT_DATASET_NAME = "Dataset999_fedpsmos"
NETWORK_CLASS = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
# Array axes (z, y, x) test-time mirroring may flip: not x, the patient's left-right axis in LPS order.
MIRROR_AXES = (0, 1)
CHECKPOINT_NAME = "checkpoint_final.pth"


class NnUNetExportError(ValueError):
    """A checkpoint cannot be exported; the message names the file and the problem."""


def architecture(spec: NetworkSpec) -> dict[str, Any]:
    """nnU-Net's ``architecture`` entry for the PlainConvUNet :func:`fedpsmos.network.build_network` builds.

    ``input_channels``, ``num_classes`` and ``deep_supervision`` are not in ``arch_kwargs``: nnU-Net passes
    them itself (from dataset.json, and deep supervision off at inference).

    Parameters
    ----------
    spec:
        The network topology from the checkpoint's meta.
    """
    cps = spec.conv_per_stage
    encoder_convs = [cps] * spec.n_stages if isinstance(cps, int) else list(cps)
    return {
        "network_class_name": NETWORK_CLASS,
        "arch_kwargs": {
            "n_stages": spec.n_stages,
            "features_per_stage": list(spec.features),
            "conv_op": "torch.nn.modules.conv.Conv3d",
            "kernel_sizes": [list(k) for k in spec.kernel_sizes],
            "strides": [list(s) for s in spec.strides],
            "n_conv_per_stage": encoder_convs,
            "n_conv_per_stage_decoder": encoder_convs[:-1],
            "conv_bias": True,
            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
            "norm_op_kwargs": {"eps": 1e-05, "affine": True},
            "dropout_op": None,
            "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True},
        },
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }


def dataset_json(classes: Sequence[str], num_training: int = 0) -> dict[str, Any]:
    """nnU-Net's ``dataset.json``: one CT channel and the model's classes by output channel index.

    Parameters
    ----------
    classes:
        Output channel names, background first (:func:`fedpsmos.inference.predict.output_classes`).
    num_training:
        ``numTraining`` (informative only; nnU-Net does not read it at inference).
    """
    return {
        "channel_names": {"0": "CT"},
        "labels": {name: index for index, name in enumerate(classes)},
        "numTraining": int(num_training),
        "file_ending": ".nii.gz",
    }


def _resampling(order: int) -> dict[str, Any]:
    return {"is_seg": False, "order": order, "order_z": 0, "force_separate_z": False}


def plans_json(
    spec: NetworkSpec,
    settings: Mapping[str, Any],
    patch_size: Sequence[int],
    *,
    dataset_name: str = DEFAULT_DATASET_NAME,
) -> dict[str, Any]:
    """nnU-Net's ``plans.json`` with one ``3d_fullres`` configuration reproducing the project's steps.

    Parameters
    ----------
    spec:
        The network topology.
    settings:
        The model's preprocessing settings (:func:`fedpsmos.inference.apply.model_settings`): spacing
        (z, y, x) mm, image_order, clip [lo, hi] HU, mean, std.
    patch_size:
        The training patch (z, y, x), nnU-Net's sliding-window tile.
    dataset_name:
        The plans' ``dataset_name``.
    """
    spacing = [float(s) for s in settings["spacing"]]
    patch = [int(p) for p in patch_size]
    lo, hi = (float(c) for c in settings["clip"])
    configuration = {
        "data_identifier": f"{PLANS_NAME}_{CONFIGURATION}",
        "preprocessor_name": "DefaultPreprocessor",
        "batch_size": 2,
        "patch_size": patch,
        "median_image_size_in_voxels": patch,  # not known to the checkpoint; unused at inference
        "spacing": spacing,
        "normalization_schemes": ["CTNormalization"],
        "use_mask_for_norm": [False],
        "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": _resampling(int(settings["image_order"])),
        "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_seg_kwargs": {**_resampling(1), "is_seg": True},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": _resampling(1),
        "architecture": architecture(spec),
        "batch_dice": False,
    }
    return {
        "dataset_name": dataset_name,
        "plans_name": PLANS_NAME,
        "original_median_spacing_after_transp": spacing,
        "original_median_shape_after_transp": patch,  # not known to the checkpoint; unused at inference
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {CONFIGURATION: configuration},
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            "0": {
                "mean": float(settings["mean"]),
                "std": float(settings["std"]),
                "percentile_00_5": lo,
                "percentile_99_5": hi,
            }
        },
    }


def nnunet_checkpoint(
    state: Mapping[str, torch.Tensor], plans: dict[str, Any], dataset: dict[str, Any]
) -> dict[str, Any]:
    """The ``fold_0/checkpoint_final.pth`` payload ``nnUNetPredictor`` reads (inference only: no optimiser).

    Parameters
    ----------
    state:
        The network's state dict.
    plans, dataset:
        :func:`plans_json` and :func:`dataset_json`.
    """
    return {
        "network_weights": {k: v.detach().to("cpu").contiguous() for k, v in state.items()},
        "init_args": {
            "plans": plans,
            "configuration": CONFIGURATION,
            "fold": 0,
            "dataset_json": dataset,
            "device": "cpu",
        },
        "trainer_name": TRAINER,
        "inference_allowed_mirroring_axes": MIRROR_AXES,
        "current_epoch": 0,
    }


def check_loads(
    plans: dict[str, Any], state: Mapping[str, torch.Tensor], num_classes: int, source: Path
) -> None:
    """Build the network nnU-Net builds from ``plans`` and load ``state`` into it strictly.

    Parameters
    ----------
    plans:
        :func:`plans_json`.
    state:
        The state dict to export.
    num_classes:
        Output channels (background included).
    source:
        The checkpoint, named in errors.
    """
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    arch = plans["configurations"][CONFIGURATION]["architecture"]
    net = get_network_from_plans(
        arch["network_class_name"],
        arch["arch_kwargs"],
        arch["_kw_requires_import"],
        1,
        num_classes,
        allow_init=False,
        deep_supervision=False,
    )
    try:
        net.load_state_dict(dict(state), strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise NnUNetExportError(f"{source}: weights do not load into nnU-Net's network ({first})") from None


def export_nnunet(
    model_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    dataset_name: str = DEFAULT_DATASET_NAME,
    num_training: int = 0,
) -> Path:
    """Write an nnU-Net v2 trained-model folder for a workflow checkpoint; return the folder.

    Parameters
    ----------
    model_path:
        A checkpoint the workflow wrote, with ``meta`` ``network``, ``organs``, ``preprocessing`` and
        ``patch_size``.
    out_dir:
        The folder to write (``dataset.json``, ``plans.json``, ``fold_0/checkpoint_final.pth``); written
        whole, replacing an existing folder.
    dataset_name:
        The plans' ``dataset_name`` (``DatasetXXX_Name`` if the folder goes under ``$nnUNet_results``).
    num_training:
        dataset.json ``numTraining``.
    """
    source = Path(model_path)
    payload = load_checkpoint(source)
    meta = payload.get("meta", {})
    if not isinstance(meta.get("network"), Mapping):
        raise NnUNetExportError(f"{source}: checkpoint meta lacks 'network' (the network specification)")
    if "organs" not in meta:
        raise NnUNetExportError(f"{source}: checkpoint meta lacks 'organs' (the classes the model outputs)")
    state = payload.get("model")
    if not isinstance(state, Mapping) or not state:
        raise NnUNetExportError(f"{source}: checkpoint holds no model weights")
    try:
        spec = NetworkSpec.from_dict(meta["network"])
        classes = output_classes(meta["organs"])
    except (NetworkSpecError, ValueError) as err:
        raise NnUNetExportError(f"{source}: {err}") from None
    if spec.in_channels != 1:
        raise NnUNetExportError(f"{source}: the network takes {spec.in_channels} channels, CT export needs 1")
    if spec.num_classes != len(classes):
        raise NnUNetExportError(
            f"{source}: network has {spec.num_classes} outputs but meta 'organs' names {list(classes)}"
        )
    settings, patch_size = model_settings(meta, source)
    total = spec.total_stride()
    if any(p % t for p, t in zip(patch_size, total, strict=True)):
        raise NnUNetExportError(
            f"{source}: patch_size {patch_size} is not divisible by the total strides {list(total)}"
        )
    dataset = dataset_json(classes, num_training)
    plans = plans_json(spec, settings, patch_size, dataset_name=dataset_name)
    check_loads(plans, state, spec.num_classes, source)
    out = Path(out_dir)
    with atomic_directory(out) as tmp:
        (tmp / "dataset.json").write_text(json.dumps(dataset, indent=2) + "\n")
        (tmp / "plans.json").write_text(json.dumps(plans, indent=2) + "\n")
        (tmp / "fold_0").mkdir()
        torch.save(nnunet_checkpoint(state, plans, dataset), tmp / "fold_0" / CHECKPOINT_NAME)
    return out
