"""The paper's five data sets in the folder layouts they are downloaded in, through config/real/*.yaml.

Each test builds a tiny copy of one data set's layout (file names, folders, label values, storage axis order)
from the real CT in ../shared/realdata, loads the data set's overlay, and runs validation, preprocessing and
prediction on it: the case ids, the organ voxel counts after the label map and the predictions' geometry must
come out as the data set defines them. The overlay merge itself is checked without the shared folder.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import yaml
from snakemake.utils import update_config

from fedpsmos.config import drop_unset, validate_config
from fedpsmos.data.validation import SplitSettings, build_manifest
from fedpsmos.inference.predict import predict_site
from fedpsmos.network import build_network
from fedpsmos.preprocessing.case import preprocess_manifest_case
from fedpsmos.preprocessing.storage import case_path
from fedpsmos.training.checkpoint import save_checkpoint
from tests.conftest import tiny_spec

REPO = Path(__file__).resolve().parents[1]
REALDATA = Path(__file__).resolve().parents[2] / "shared" / "realdata"
IMAGE = REALDATA / "ct_abdomen_3mm.nii.gz"
LABEL = REALDATA / "ct_abdomen_3mm_5organs.nii.gz"
# The shared label file's values (its labels.json).
LIVER, SPLEEN, PANCREAS, KIDNEY_RIGHT, KIDNEY_LEFT = 1, 2, 3, 4, 5
SPACING = 6.0  # mm, isotropic: the 3 mm CT coarsened to keep the tests fast
OVERLAYS = ["btcv", "lits", "msd_spleen", "msd_pancreas", "kits19"]

needs_realdata = pytest.mark.skipif(
    not (IMAGE.is_file() and LABEL.is_file()),
    reason=f"real CT test data not found in {REALDATA} (shared folder beside the checkout)",
)


def _overlay(name: str) -> dict:
    return yaml.safe_load((REPO / "config" / "real" / f"{name}.yaml").read_text())


def test_real_overlays_merge_into_a_valid_paper_config() -> None:
    # Prepare: config.yaml, the paper overlay and all five real-data overlays, merged as Snakemake does
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    for path in [REPO / "config" / "paper.yaml"] + [REPO / "config" / "real" / f"{n}.yaml" for n in OVERLAYS]:
        update_config(config, yaml.safe_load(path.read_text()))
    # Execute
    drop_unset(config)
    validate_config(config, source="real overlays")
    # Assert: no synthetic spec lingers; the KiTS19 site has one kidney label; the paper's test counts
    sites = config["sites"]
    assert [s["source"] for s in sites.values()] == ["files", "files", "msd", "msd", "files"]
    assert not any("synthetic" in s for s in sites.values())
    assert sites["site5"]["labels"] == {"kidney": [1, 2]}
    assert [s["split"]["test"] for s in sites.values()] == [6, 26, 8, 56, 24]
    assert all(s["path"].startswith("data/real/") for s in sites.values())


# ---------------------------------------------------------------- tiny copies of the data sets


@dataclass
class Base:
    """The shared CT and its five-organ label, coarsened to SPACING."""

    image: sitk.Image
    label: sitk.Image

    def labels(self) -> np.ndarray:
        return sitk.GetArrayFromImage(self.label)

    def write(self, path: Path, array: np.ndarray | None, *, permute: bool = False) -> sitk.Image:
        """Write the CT (``array`` None) or a label array on its grid; ``permute`` stores the slice axis
        first, as KiTS19 does (same voxels in space, direction cosines permuted to match)."""
        if array is None:
            out = self.image
        else:
            out = sitk.GetImageFromArray(array.astype(np.uint8))
            out.CopyInformation(self.label)
        if permute:
            out = sitk.PermuteAxes(out, [2, 1, 0])
        path.parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(out, str(path))
        return out


@pytest.fixture(scope="module")
def base() -> Base:
    if not (IMAGE.is_file() and LABEL.is_file()):
        pytest.skip(f"real CT test data not found in {REALDATA}")
    image, label = sitk.ReadImage(str(IMAGE)), sitk.ReadImage(str(LABEL))
    size = [int(round(n * s / SPACING)) for n, s in zip(image.GetSize(), image.GetSpacing(), strict=True)]
    grid = sitk.Image(size, sitk.sitkUInt8)
    grid.SetSpacing((SPACING,) * 3)
    grid.SetOrigin(image.GetOrigin())
    grid.SetDirection(image.GetDirection())
    coarse_image = sitk.Resample(image, grid, sitk.Transform(), sitk.sitkLinear, -1024.0, sitk.sitkInt16)
    coarse_label = sitk.Resample(label, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return Base(coarse_image, coarse_label)


def _inside(mask: np.ndarray, fraction: float) -> np.ndarray:
    """A 'tumour': the first ``fraction`` of the organ's voxels in scan order."""
    index = np.flatnonzero(mask)
    out = np.zeros(mask.shape, bool)
    out.flat[index[: max(1, int(len(index) * fraction))]] = True
    return out


def _blob(labels: np.ndarray, corner: tuple[int, int, int]) -> np.ndarray:
    """A 2 x 3 x 3 background block at ``corner`` (another structure's annotation)."""
    out = np.zeros(labels.shape, bool)
    z, y, x = corner
    out[z : z + 2, y : y + 3, x : x + 3] = True
    return out & (labels == 0)


def _btcv(root: Path, base: Base) -> None:
    # 1 spleen, 2 right kidney, 3 left kidney, 4 gallbladder, 6 liver, 8 aorta, 11 pancreas, 13 left adrenal
    src = base.labels()
    out = np.zeros_like(src)
    for old, new in ((LIVER, 6), (SPLEEN, 1), (PANCREAS, 11), (KIDNEY_RIGHT, 2), (KIDNEY_LEFT, 3)):
        out[src == old] = new
    centre = tuple(n // 2 for n in src.shape)
    for value, corner in ((4, (centre[0], 2, 2)), (8, centre), (13, (1, 2, 2))):
        out[_blob(src, corner)] = value
    for case in ("0001", "0002"):
        base.write(root / "img" / f"img{case}.nii.gz", None)
        base.write(root / "label" / f"label{case}.nii.gz", out)
    base.write(root.parent / "Testing" / "img" / "img0061.nii.gz", None)  # no labels: not read


def _lits(root: Path, base: Base) -> None:
    src = base.labels()
    out = np.where(src == LIVER, 1, 0)
    out[_inside(src == LIVER, 0.1)] = 2  # tumour
    for batch, case in (("Training Batch 1", "0"), ("Training Batch 2", "28")):
        base.write(root / batch / f"volume-{case}.nii", None)
        base.write(root / batch / f"segmentation-{case}.nii", out)


def _msd(task: str, stem: str, organ: int, tumour: bool) -> Callable[[Path, Base], None]:
    def build(root: Path, base: Base) -> None:
        src = base.labels()
        out = np.where(src == organ, 1, 0)
        if tumour:
            out[_inside(src == organ, 0.2)] = 2
        names = {"0": "background", "1": stem, **({"2": "cancer"} if tumour else {})}
        root.mkdir(parents=True)
        (root / "dataset.json").write_text(json.dumps({"name": task, "labels": names, "numTraining": 2}))
        for case in (f"{stem}_{'002' if tumour else '2'}", f"{stem}_{'010' if tumour else '10'}"):
            base.write(root / "imagesTr" / f"{case}.nii.gz", None)
            base.write(root / "labelsTr" / f"{case}.nii.gz", out)
            (root / "labelsTr" / f"._{case}.nii.gz").write_bytes(b"\x00\x05\x16\x07")  # macOS resource fork
        base.write(root / "imagesTs" / f"{stem}_1.nii.gz", None)

    return build


def _kits19(root: Path, base: Base) -> None:
    # one kidney label for both sides plus a tumour, stored slice axis first; case_00210 has imaging only
    src = base.labels()
    kidneys = (src == KIDNEY_LEFT) | (src == KIDNEY_RIGHT)
    out = np.where(kidneys, 1, 0)
    out[_inside(src == KIDNEY_LEFT, 0.3)] = 2
    for case in ("00000", "00001"):
        base.write(root / f"case_{case}" / "imaging.nii.gz", None, permute=True)
        base.write(root / f"case_{case}" / "segmentation.nii.gz", out, permute=True)
    base.write(root / "case_00210" / "imaging.nii.gz", None, permute=True)
    (root / "kits.json").write_text("[]")


# overlay -> (layout builder, case ids, organ -> the shared label values it must count)
DATASETS = {
    "btcv": (
        _btcv,
        ["0001", "0002"],
        {
            "liver": [LIVER],
            "spleen": [SPLEEN],
            "pancreas": [PANCREAS],
            "kidney_left": [KIDNEY_LEFT],
            "kidney_right": [KIDNEY_RIGHT],
        },
    ),
    "lits": (_lits, ["0", "28"], {"liver": [LIVER]}),
    "msd_spleen": (
        _msd("Task09_Spleen", "spleen", SPLEEN, False),
        ["spleen_10", "spleen_2"],
        {"spleen": [SPLEEN]},
    ),
    "msd_pancreas": (
        _msd("Task07_Pancreas", "pancreas", PANCREAS, True),
        ["pancreas_002", "pancreas_010"],
        {"pancreas": [PANCREAS]},
    ),
    "kits19": (_kits19, ["00000", "00001"], {"kidney_left": [KIDNEY_LEFT], "kidney_right": [KIDNEY_RIGHT]}),
}


def _random_model(path: Path, organs: list[str], site: str) -> None:
    spec = tiny_spec(len(organs) + 1)
    net = build_network(spec, seed=0)
    meta = {"network": spec.to_dict(), "organs": organs, "kind": "site_alone", "site": site}
    save_checkpoint(path, {"model": net.state_dict(), "meta": meta})


@needs_realdata
@pytest.mark.parametrize("name", list(DATASETS))
def test_data_set_layout_runs_through_the_pipeline(tmp_path, base, name):
    # Prepare: the data set's layout at the overlay's relative path, as if tmp_path were the checkout
    build, expected_ids, expected_organs = DATASETS[name]
    ((site, spec),) = drop_unset(_overlay(name))["sites"].items()  # nulls delete keys, as in common.smk
    root = tmp_path / spec["path"]
    build(root, base)
    source_labels = base.labels()
    expected = {o: int(np.isin(source_labels, v).sum()) for o, v in expected_organs.items()}

    # Execute: validate_site -> preprocess_case -> predict_site
    manifest = build_manifest(
        tmp_path / "manifest.json",
        site=site,
        source=spec["source"],
        root=root,
        labels=spec["labels"],
        background=spec.get("background"),
        ignore=spec.get("ignore"),
        files=spec.get("files"),
        split=SplitSettings.from_config({"test_fraction": 0.5}),
        seed=0,
    )
    settings = {"spacing": [SPACING] * 3, "image_order": 1, "clip": [-80.0, 305.0], "mean": 90.9, "std": 65.5}
    infos = {
        case: preprocess_manifest_case(
            tmp_path / "manifest.json", case, case_path(tmp_path / "npz", case), **settings
        )
        for case in expected_ids
    }
    _random_model(tmp_path / "model.pt", manifest["organs"], site)
    written = predict_site(
        model_path=tmp_path / "model.pt",
        manifest_path=tmp_path / "manifest.json",
        npz_dir=tmp_path / "npz",
        out_dir=tmp_path / "pred",
        patch_size=(8, 16, 16),
        device="cpu",
    )

    # Assert: the data set's case ids; every organ's voxels kept, other structures and tumours mapped;
    # predictions on each test image's own grid
    assert [c["case"] for c in manifest["cases"]] == expected_ids
    assert sorted(manifest["organs"]) == sorted(expected)
    for case, info in infos.items():
        assert info["voxels"] == expected, case
        assert info["ignored"] == 0
    assert [p.name for p in written] == [f"{c}.nii.gz" for c in manifest["test"]]
    paths = {c["case"]: Path(c["image"]) for c in manifest["cases"]}
    for path in written:
        image = sitk.ReadImage(str(paths[path.name.removesuffix(".nii.gz")]))
        pred = sitk.ReadImage(str(path))
        assert pred.GetSize() == image.GetSize()
        np.testing.assert_allclose(pred.GetSpacing(), image.GetSpacing(), atol=1e-6)
        np.testing.assert_allclose(pred.GetOrigin(), image.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(pred.GetDirection(), image.GetDirection(), atol=1e-6)
    assert all(n > 0 for n in expected.values()), expected
    if name in ("lits", "msd_pancreas", "kits19"):  # the tumour value was there, and joined its organ
        assert 2 in manifest["cases"][0]["label_values"]
    if name == "btcv":  # the other structures were there, and became background
        assert {4, 8, 13} <= set(manifest["cases"][0]["label_values"])
    if name == "kits19":  # stored slice axis first: the first index axis runs along the body's z
        assert image.GetSize()[0] == base.image.GetSize()[2]
        assert abs(image.GetDirection()[6]) == pytest.approx(1.0)
