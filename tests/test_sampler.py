"""Patch sampling and augmentation: the patch index is respected, sites stay separate, draws are seeded."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from fedpsmos.organs import labelled_mask
from fedpsmos.preprocessing.storage import case_path, read_case, write_case
from fedpsmos.training.augmentation import AugmentationSettings, _spatial, augment_batch
from fedpsmos.training.sampler import PatchSampler, crop_patch
from fedpsmos.training.site_data import SamplerError, SiteData, site_data_from_manifest

PATCH = (4, 8, 8)


def write_site(
    root: Path,
    site: str,
    organs: tuple[str, ...],
    *,
    cases: int = 2,
    shape: tuple[int, int, int] = (8, 12, 12),
    seed: int = 0,
    test_cases: int = 0,
) -> SiteData:
    """Write a tiny site in the architecture's formats: ``{case}.b2zip``, a patch-index parquet, a manifest.

    Labels hold every global organ (partially labelled sites zero the others, as preprocessing does); the
    patch index lists corners on a coarse grid, including test cases that must never be sampled.
    """
    rng = np.random.default_rng(seed)
    mask = labelled_mask(organs)
    npz_dir = root / "preprocessed" / site
    npz_dir.mkdir(parents=True, exist_ok=True)
    rows, names = [], []
    for i in range(cases + test_cases):
        case = f"{site}_{i:03d}"
        names.append(case)
        label = np.zeros(shape, dtype=np.uint8)
        for c in range(1, 6):  # one block per organ, placed along x
            label[2:6, 2:10, 1 + 2 * (c - 1) : 3 + 2 * (c - 1)] = c
        label[~mask[label]] = 0  # unlabelled organs look like background
        image = (rng.normal(size=shape) + label).astype(np.float32)
        write_case(
            case_path(npz_dir, case),
            {
                "image": image,
                "label": label,
                "labelled": mask,
                "spacing": np.ones(3),
                "sitk_size": np.array(shape[::-1], dtype=np.int64),
                "sitk_spacing": np.ones(3),
                "sitk_origin": np.zeros(3),
                "sitk_direction": np.eye(3).reshape(-1),
            },
        )
        for z, y, x in [(0, 0, 0), (4, 4, 4), (2, 0, 4), (6, 8, 8)]:  # the last one overhangs: padded
            rows.append(
                {"case": case, "z": z, "y": y, "x": x, "organ": organs[0], "fraction": 0.5, "site": site}
            )
    patches = root / "patches" / f"{site}.parquet"
    patches.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(patches)
    manifest = root / "data" / site / "manifest.json"
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text(
        json.dumps(
            {"site": site, "organs": list(organs), "train": names[:cases], "test": names[cases:], "cases": []}
        )
    )
    return site_data_from_manifest(site, manifest, npz_dir, patches)


def test_every_patch_comes_from_the_index_of_a_given_training_case(tmp_path: Path) -> None:
    # Prepare
    site = write_site(tmp_path, "site2", ("liver",), cases=2, test_cases=1)
    index = pd.read_parquet(site.patches)
    rows = {(r.case, r.z, r.y, r.x) for r in index.itertuples()}
    sampler = PatchSampler([site], patch_size=PATCH, patches_per_iteration=3, seed=1, augment=False)
    # Execute
    seen = []
    for _ in range(30):
        image, target, labelled = sampler.next_batch()
        seen.extend(sampler.last_draw)
    # Assert
    assert image.shape == (3, 1, *PATCH) and image.dtype == torch.float32
    assert target.shape == (3, 1, *PATCH) and target.dtype == torch.int64
    assert (
        labelled.dtype == torch.bool and labelled.tolist() == [[True, True, False, False, False, False]] * 3
    )
    assert all((case, *corner) in rows for _, case, corner in seen)
    assert {case for _, case, _ in seen} <= set(site.npz_paths)  # never the test case site2_002
    assert len({corner for _, _, corner in seen}) > 1


def test_sampler_reads_only_the_given_sites_files(tmp_path: Path) -> None:
    # Prepare: another site's files exist but are garbage; reading them would fail
    mine = write_site(tmp_path, "site3", ("spleen",))
    other = write_site(tmp_path, "site4", ("pancreas",))
    for path in other.npz_paths.values():
        Path(path).write_bytes(b"not an npz")
    sampler = PatchSampler([mine], patch_size=PATCH, patches_per_iteration=2, seed=0, augment=True)
    # Execute
    for _ in range(10):
        sampler.next_batch()
    # Assert
    assert sampler.opened and sampler.opened <= {Path(p) for p in mine.npz_paths.values()}


def test_batches_mix_sites_with_their_own_masks(tmp_path: Path) -> None:
    # Prepare
    full = write_site(tmp_path, "site1", ("liver", "spleen", "pancreas", "kidney_left", "kidney_right"))
    kidneys = write_site(tmp_path, "site5", ("kidney_left", "kidney_right"), seed=1)
    sampler = PatchSampler([full, kidneys], patch_size=PATCH, patches_per_iteration=2, seed=3, augment=False)
    expected = {"site1": [True] * 6, "site5": [True, False, False, False, True, True]}
    # Execute
    sites_seen = []
    for _ in range(40):
        _, target, labelled = sampler.next_batch()
        for b, (site, _, _) in enumerate(sampler.last_draw):
            sites_seen.append(site)
            # Assert: each sample carries its site's mask and only that site's labelled classes
            assert labelled[b].tolist() == expected[site]
            present = set(torch.unique(target[b]).tolist())
            assert present <= {i for i, m in enumerate(expected[site]) if m}
    assert 20 <= sites_seen.count("site1") <= 60  # equal case counts: p = 0.5 either way, 80 draws


@pytest.mark.parametrize(("sampling", "expected"), [("proportional", 0.75), ("uniform", 0.5)])
def test_sites_are_drawn_as_pooled_data_in_proportion_to_their_cases(
    tmp_path: Path, sampling: str, expected: float
) -> None:
    # Prepare: site1 holds 3 training cases, site3 one; pooled data draws site1 with p = 3/4 (FedAvg's n_k/n)
    big = write_site(tmp_path, "site1", ("liver",), cases=3)
    small = write_site(tmp_path, "site3", ("spleen",), cases=1)
    sampler = PatchSampler(
        [big, small], patch_size=PATCH, patches_per_iteration=4, seed=0, augment=False, site_sampling=sampling
    )
    # Execute
    seen = []
    for _ in range(200):
        sampler.next_batch()
        seen += [site for site, _, _ in sampler.last_draw]
    # Assert: 800 draws; 4 binomial standard deviations is about 0.06
    assert sampler.site_probabilities.tolist() == pytest.approx([expected, 1 - expected])
    assert abs(seen.count("site1") / len(seen) - expected) < 0.06


def test_unknown_site_sampling_is_refused(tmp_path: Path) -> None:
    site = write_site(tmp_path, "site1", ("liver",))
    with pytest.raises(SamplerError, match="site_sampling"):
        PatchSampler(
            [site], patch_size=PATCH, patches_per_iteration=1, seed=0, augment=False, site_sampling="x"
        )


def test_overhanging_patch_is_padded_with_minimum_and_background() -> None:
    # Prepare
    image = np.arange(2 * 3 * 3, dtype=np.float32).reshape(2, 3, 3) + 5.0
    # Execute
    out = crop_patch(image, (1, 2, -1), (2, 2, 3), fill=float(image.min()))
    # Assert
    assert out.shape == (2, 2, 3)
    assert out[0, 0, 1:].tolist() == image[1, 2, :2].tolist()
    assert out[0, 0, 0] == 5.0 and out[1].tolist() == [[5.0] * 3] * 2 and out[0, 1].tolist() == [5.0] * 3


def test_sampling_is_seeded_and_its_state_restores(tmp_path: Path) -> None:
    # Prepare
    site = write_site(tmp_path, "site1", ("liver", "spleen"))
    a = PatchSampler([site], patch_size=PATCH, patches_per_iteration=2, seed=7, augment=True)
    b = PatchSampler([site], patch_size=PATCH, patches_per_iteration=2, seed=7, augment=True)
    # Execute
    for _ in range(3):
        a.next_batch()
    state = a.state_dict()
    after_a = a.next_batch()
    b.load_state_dict(state)
    after_b = b.next_batch()
    # Assert
    assert json.loads(json.dumps(state)) == state  # plain data
    for x, y in zip(after_a, after_b, strict=True):
        assert torch.equal(x, y)


def test_batch_i_is_a_function_of_seed_and_i_alone(tmp_path: Path) -> None:
    # Prepare: two samplers of one site and seed, one of another seed
    site = write_site(tmp_path, "site1", ("liver", "spleen"), cases=3)
    a = PatchSampler([site], patch_size=PATCH, patches_per_iteration=2, seed=7, augment=True)
    b = PatchSampler([site], patch_size=PATCH, patches_per_iteration=2, seed=7, augment=True)
    other = PatchSampler([site], patch_size=PATCH, patches_per_iteration=2, seed=8, augment=True)
    # Execute: a in order, b backwards, other with a's seed passed per batch
    forward = [a.next_batch() for _ in range(6)]
    backward = {i: b.batch(i) for i in reversed(range(6))}
    passed = [other.batch(i, seed=7) for i in range(6)]
    own = [other.batch(i) for i in range(6)]
    # Assert
    for i in range(6):
        assert all(torch.equal(x, y) for x, y in zip(forward[i], backward[i], strict=True))
        assert all(torch.equal(x, y) for x, y in zip(forward[i], passed[i], strict=True))
    assert any(not torch.equal(x[0], y[0]) for x, y in zip(forward, own, strict=True))
    assert a.state_dict() == {"iteration": 6} and b.state_dict() == {"iteration": 0}


def test_patch_outside_the_volume_is_padded_with_the_stored_minimum(tmp_path: Path) -> None:
    # Prepare: one row whose patch hangs over the far corner of an 8 x 12 x 12 case
    site = write_site(tmp_path, "site1", ("liver",), cases=1)
    pd.DataFrame(
        [{"case": "site1_000", "z": 6, "y": 8, "x": 8, "organ": "liver", "fraction": 0.5}]
    ).to_parquet(site.patches)
    sampler = PatchSampler([site], patch_size=PATCH, patches_per_iteration=1, seed=0, augment=False)
    case = read_case(site.npz_paths["site1_000"])
    # Execute
    image, target, _ = sampler.next_batch()
    # Assert: the inside is the case's corner, the outside its minimum intensity and background
    assert torch.equal(image[0, 0, :2, :4, :4], torch.from_numpy(case["image"][6:, 8:, 8:]))
    assert float(image[0, 0, 2:].unique()) == float(case["image"].min())
    assert int(target[0, 0, 2:].max()) == 0


def test_corrupt_case_file_is_refused_with_its_name(tmp_path: Path) -> None:
    # Prepare: flip one byte inside the stored image of one case
    site = write_site(tmp_path, "site1", ("liver",), cases=1)
    path = site.npz_paths["site1_000"]
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0xFF
    path.write_bytes(bytes(data))
    sampler = PatchSampler([site], patch_size=PATCH, patches_per_iteration=1, seed=0, augment=False)
    # Execute / Assert
    with pytest.raises(SamplerError, match=f"{path.name}.*corrupt"):
        sampler.next_batch()


def test_class_map_turns_a_partial_site_into_a_fully_labelled_binary_one(tmp_path: Path) -> None:
    # Prepare: site-alone liver model: liver -> 1, everything else -> background
    full = write_site(tmp_path, "site1", ("liver", "spleen", "pancreas", "kidney_left", "kidney_right"))
    class_map = np.array([0, 1, 0, 0, 0, 0])
    sampler = PatchSampler(
        [full], patch_size=PATCH, patches_per_iteration=2, seed=0, augment=False, class_map=class_map
    )
    # Execute
    targets = [sampler.next_batch() for _ in range(10)]
    # Assert
    assert sampler.num_classes == 2
    assert all(set(torch.unique(t).tolist()) <= {0, 1} for _, t, _ in targets)
    assert any(1 in torch.unique(t).tolist() for _, t, _ in targets)
    assert all(m.all() and m.shape == (2, 2) for _, _, m in targets)


def test_index_without_training_rows_is_refused(tmp_path: Path) -> None:
    # Prepare
    site = write_site(tmp_path, "site2", ("liver",))
    no_rows = SiteData(site="site2", npz_paths={"site2_999": Path("x.b2zip")}, patches=site.patches)
    # Execute / Assert
    with pytest.raises(SamplerError, match="site2.parquet: no patch"):
        PatchSampler([no_rows], patch_size=PATCH, patches_per_iteration=2, seed=0, augment=False)


def test_identity_affine_and_quarter_turn_keep_labels_exact() -> None:
    # Prepare
    label = torch.randint(0, 6, (1, 4, 6, 6))
    image = label.float() * 2.0
    turn = np.array([[1, 0, 0], [0, 0, -1], [0, 1, 0]], dtype=np.float64)  # quarter turn in the (y, x) plane
    # Execute
    same_img, same_lab = _spatial(image, label, np.eye(3))
    turned_img, turned_lab = _spatial(image, label, turn)
    # Assert
    assert torch.equal(same_lab, label) and torch.allclose(same_img, image, atol=1e-5)
    rotated = {torch.rot90(label, k, dims=(2, 3)).numpy().tobytes() for k in (1, 3)}
    assert turned_lab.numpy().tobytes() in rotated
    assert torch.allclose(turned_img, turned_lab.float() * 2.0, atol=1e-4)


def test_augmentation_is_a_function_of_the_generator_and_keeps_classes() -> None:
    # Prepare
    image = torch.randn(2, 1, 6, 10, 10)
    target = torch.randint(0, 3, (2, 1, 6, 10, 10))
    always = AugmentationSettings(
        p_rotation=1, p_scaling=1, p_noise=1, p_brightness=1, p_contrast=1, p_gamma_inverted=1, p_gamma=1
    )
    # Execute
    a = augment_batch(image, target, np.random.default_rng(5), always)
    b = augment_batch(image, target, np.random.default_rng(5), always)
    c = augment_batch(image, target, np.random.default_rng(6), always)
    # Assert
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert a[0].shape == image.shape and a[1].dtype == torch.int64
    assert set(torch.unique(a[1]).tolist()) <= {0, 1, 2}
    assert all(math.isfinite(v) for v in a[0].flatten().tolist())


def test_extended_augmentation_cuts_the_enlarged_crop_centred_on_the_patch(tmp_path: Path) -> None:
    # Prepare: extended settings whose rotation and scaling are drawn but do nothing, and no other transform,
    # so the augmented batch is the centre of the enlarged crop: the plain patch, if the crop is centred
    site = write_site(tmp_path, "site1", ("liver", "spleen"), cases=2, shape=(12, 24, 24))
    patch = (4, 16, 16)  # enlarged to (4, 18, 18): the crop starts one voxel before the patch in y and x
    still = AugmentationSettings(
        extended=True,
        p_rotation=1.0,
        rotation=0.0,
        p_scaling=0.0,
        p_noise=0.0,
        p_blur=0.0,
        p_brightness=0.0,
        p_contrast=0.0,
        p_low_resolution=0.0,
        p_gamma_inverted=0.0,
        p_gamma=0.0,
        p_mirror=0.0,
    )
    plain = PatchSampler([site], patch_size=patch, patches_per_iteration=2, seed=3, augment=False)
    enlarged = PatchSampler(
        [site], patch_size=patch, patches_per_iteration=2, seed=3, augment=True, augmentation=still
    )
    # Execute
    batches = [(plain.batch(i), enlarged.batch(i)) for i in range(6)]
    # Assert
    assert enlarged.crop_size == (4, 18, 18)
    for (image, target, _), (image_e, target_e, _) in batches:
        assert image_e.shape == image.shape and torch.equal(target_e, target)
        assert torch.allclose(image_e, image, atol=1e-5)
