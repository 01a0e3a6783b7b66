"""List a site's image/label pairs from its raw folder, the input of ``validate_site``.

docs/design.md "The pipeline and the privacy boundary": sites -> validate + split.

Four sources, all read from one folder per site:

- ``nnunet``: nnU-Net v2 raw layout, ``imagesTr/{case}_0000{ending}`` and ``labelsTr/{case}{ending}``, the
  ending taken from ``dataset.json``'s ``file_ending`` (``.nii.gz``, ``.nii``, ``.mha``, ``.nrrd``) or,
  without one, from the files present. Only single-channel (CT) data sets are accepted.
- ``msd``: Medical Segmentation Decathlon layout, ``imagesTr/{case}.nii.gz`` and ``labelsTr/{case}.nii.gz``;
  the AppleDouble ``._*`` files that MSD archives carry are ignored.
- ``synthetic``: the nnU-Net folder :func:`fedpsmos.data.synthetic.write_site` generates.
- ``files``: a data set in the layout it is downloaded in, described by the site's ``files`` templates
  (:mod:`fedpsmos.data.templates`), e.g. ``{images: img/img{case}.nii.gz, labels: label/label{case}.nii.gz}``.
  Cases are the files the labels template matches: images without a label (a data set's unlabelled test
  images, such as KiTS19 cases 210-299) are not cases and are only logged.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedpsmos.data.templates import CASE_ID, FILE_ENDINGS, FileTemplate, TemplateError, parse_files

SOURCES = ("synthetic", "nnunet", "msd", "files")
CHANNEL = "_0000"  # nnU-Net's channel suffix; CT has one channel


class DataError(ValueError):
    """A site's raw data is missing, unpaired or invalid; the message names the file and the problem."""


@dataclass(frozen=True)
class CaseFiles:
    """One case of a site: its id and the paths of its image and label files."""

    case: str
    image: Path
    label: Path


def _visible(path: Path) -> bool:
    # MSD tarballs made on macOS carry "._case.nii.gz" resource forks; any dotfile is not data.
    return not path.name.startswith(".")


def _strip_ending(name: str, ending: str) -> str | None:
    return name[: -len(ending)] if name.endswith(ending) and len(name) > len(ending) else None


def _nnunet_ending(root: Path) -> str:
    """The file ending of an nnU-Net raw folder: ``dataset.json`` first, else the files present."""
    dataset_json = root / "dataset.json"
    if dataset_json.is_file():
        try:
            meta = json.loads(dataset_json.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise DataError(f"{dataset_json}: cannot read dataset.json: {err}") from err
        ending = meta.get("file_ending") if isinstance(meta, dict) else None
        if ending is not None:
            if ending not in FILE_ENDINGS:
                known = ", ".join(FILE_ENDINGS)
                raise DataError(
                    f"{dataset_json}: file_ending {ending!r} is not supported (use one of {known})"
                )
            return str(ending)
    found = {
        e
        for p in (root / "imagesTr").iterdir()
        if _visible(p)
        for e in FILE_ENDINGS
        if p.name.endswith(e) and not (e == ".nii" and p.name.endswith(".nii.gz"))
    }
    if len(found) > 1:
        raise DataError(
            f"{root / 'imagesTr'}: mixed file endings {sorted(found)} and no dataset.json file_ending"
        )
    return found.pop() if found else ".nii.gz"


def _scan(folder: Path, ending: str, suffix: str) -> dict[str, Path]:
    """Case id -> path for the visible files ``{case}{suffix}{ending}`` in ``folder``."""
    out: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if not _visible(path) or not path.is_file():
            continue
        stem = _strip_ending(path.name, ending)
        if stem is None:
            continue
        if suffix:
            if not stem.endswith(suffix):
                if len(stem) > 5 and stem[-5] == "_" and stem[-4:].isdigit():
                    raise DataError(f"{path}: channel {stem[-4:]} found; only single-channel CT is supported")
                raise DataError(f"{path}: image name lacks the nnU-Net channel suffix {suffix}{ending}")
            stem = stem[: -len(suffix)]
        out[stem] = path
    return out


def _one(matches: list[Path], what: str, template: FileTemplate, case: str, label: Path) -> Path:
    if not matches:
        raise DataError(f"{label}: label of case {case} has no {what} {template.fill(case)!r}")
    if len(matches) > 1:
        names = ", ".join(str(p) for p in matches)
        raise DataError(f"{label}: case {case} has {len(matches)} {what} files ({template.text!r}): {names}")
    return matches[0]


def _list_files(root: Path, files: Mapping[str, str] | None, *, site: str) -> list[CaseFiles]:
    """The ``files`` source: cases from the labels template, each with the one image of its id."""
    if files is None:
        raise DataError(f"site {site}: a files source needs its 'files' templates (images, labels)")
    try:
        images, labels = parse_files(files, site=site)
    except TemplateError as err:
        raise DataError(str(err)) from None
    found: dict[str, Path] = {}
    for match in labels.find(root):
        if not CASE_ID.fullmatch(match.case):
            raise DataError(f"{match.path}: case id {match.case!r} may hold only letters, digits, _ . -")
        if match.case in found:
            raise DataError(f"{match.path}: case {match.case} has a second label file {found[match.case]}")
        found[match.case] = match.path
    if not found:
        raise DataError(f"{root}: site {site} has no cases (no file matches files.labels {labels.text!r})")
    cases = [
        CaseFiles(case, _one([m.path for m in images.find(root, case)], "image", images, case, label), label)
        for case, label in sorted(found.items())
    ]
    unlabelled = sorted({m.case for m in images.find(root)} - found.keys())
    if unlabelled:
        shown = ", ".join(unlabelled[:5]) + (", ..." if len(unlabelled) > 5 else "")
        logging.getLogger(__name__).info(
            "site %s: %d images without a label are not cases (a data set's unlabelled test images): %s",
            site,
            len(unlabelled),
            shown,
        )
    return cases


def list_cases(
    source: str, root: str | os.PathLike[str], *, site: str, files: Mapping[str, str] | None = None
) -> list[CaseFiles]:
    """The image/label pairs of one site, sorted by case id.

    Parameters
    ----------
    source: ``synthetic``, ``nnunet``, ``msd`` or ``files``; root: the site's raw folder (holding
    ``imagesTr`` and ``labelsTr``, or the ``files`` templates' files); site: the site name, for messages;
    files: the site's ``{images, labels}`` templates (the ``files`` source only).
    Raises :class:`DataError` naming the folder or file for a missing folder, an image without a label, a
    label without an image, or a folder without cases (``files``: a label without its image, a case with two
    images, a malformed template; images without a label are not cases).
    """
    if source not in SOURCES:
        raise DataError(f"site {site}: unknown data source {source!r} (use one of {', '.join(SOURCES)})")
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: site {site} data folder does not exist")
    if source == "files":
        return _list_files(root, files, site=site)
    images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
    for folder in (images_dir, labels_dir):
        if not folder.is_dir():
            raise DataError(f"{folder}: site {site} folder is missing ({source} layout)")
    if source == "msd":
        ending, channel = ".nii.gz", ""
    else:
        ending, channel = _nnunet_ending(root), CHANNEL
    images = _scan(images_dir, ending, channel)
    labels = _scan(labels_dir, ending, "")
    for case in sorted(images.keys() - labels.keys()):
        raise DataError(f"{images[case]}: image of case {case} has no label {labels_dir / (case + ending)}")
    for case in sorted(labels.keys() - images.keys()):
        raise DataError(f"{labels[case]}: label of case {case} has no image in {images_dir}")
    if not images:
        raise DataError(f"{images_dir}: site {site} has no cases (no *{channel}{ending} files)")
    return [CaseFiles(case, images[case], labels[case]) for case in sorted(images)]


def case_ids(
    source: str,
    root: str | os.PathLike[str],
    *,
    site: str,
    spec: Mapping[str, Any] | None,
    files: Mapping[str, str] | None = None,
) -> list[str]:
    """Case ids of a site at DAG-build time (Snakemake): synthetic ids are known before the folder exists.

    Parameters
    ----------
    source: the site's data source; root: its raw folder; site: the site name; spec: the site's ``synthetic``
    config (required for ``synthetic``, ignored otherwise); files: the site's ``files`` templates (the
    ``files`` source only).
    """
    if source == "synthetic":
        if spec is None:
            raise DataError(f"site {site}: a synthetic source needs its 'synthetic' spec")
        # Imported here: the phantom generator behind it (scipy.ndimage) is not needed by the many jobs
        # that only read a manifest, and each job is a new process that pays its imports.
        from fedpsmos.data.synthetic import default_case_ids

        return default_case_ids(site, spec)
    return [c.case for c in list_cases(source, root, site=site, files=files)]
