"""One synthetic CT-like abdomen: the phantom the synthetic sites are drawn from (docs/design.md, "Organs and
label maps").

Each case is drawn in physical LPS coordinates (x to the patient's left, y posterior, z superior;
millimetres) and sampled at the site's spacing: an elliptical body with subcutaneous fat, an abdominal wall,
spine, psoas and paraspinal muscles, aorta and IVC, stomach, bowel, and the five organs of the paper (liver
on the patient's right, spleen left posterior, pancreas across the midline in front of the spine, a kidney on
each side of the spine). Shapes vary per case through a random affine, per-organ jitter and a smooth random
displacement field; intensities overlap between organs (liver, spleen, pancreas, bowel and muscle are all
soft tissue) so that shape and context have to be learnt. :mod:`fedpsmos.data.synthetic` writes a site's
cases as an nnU-Net raw folder.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from fedpsmos.organs import CLASS_INDEX, ORGANS

# Nominal extent of the scanned volume (z, y, x) in mm at fov = 1: the body is ~330 x 260 mm in-plane,
# so the in-plane field of view leaves a little air around it; ~200 mm craniocaudal covers liver dome to
# kidney lower poles.
EXTENT_MM = (200.0, 290.0, 360.0)
BODY_SEMI_AXES_MM = (165.0, 130.0)  # (x, y)
FAT_HU = -100.0  # the reference of a site's organ-vs-fat contrast
AIR_HU = -1000.0
HU_MIN, HU_MAX = -1024, 3071

# Tissue ids of the painted phantom: the five organs keep their global class index so the label is a lookup.
_BACKGROUND_TISSUES = (
    "fat",
    "muscle",
    "bowel",
    "gas",
    "fluid",
    "bone_cortex",
    "bone_marrow",
    "disc",
    "csf",
    "aorta",
    "vein",
    "stomach_wall",
)
TISSUE: dict[str, int] = {
    "air": 0,
    **{organ: CLASS_INDEX[organ] for organ in ORGANS},
    **{name: 6 + i for i, name in enumerate(_BACKGROUND_TISSUES)},
}
# (mean HU, texture amplitude HU) before the site's contrast, offset and noise, roughly a portal-venous
# phase: the pancreas enhances above the liver and spleen, the kidneys above all three. Noise and texture make
# neighbouring soft tissues (liver, spleen, bowel, muscle, stomach wall) overlap, and the splenic vein behind
# the pancreas is brighter than it, so shape and context still have to be learnt. (With liver, spleen and
# pancreas at 60, 55 and 45 HU, a tube 2-3 voxels thick on the CPU grid, no model found the pancreas.)
_TISSUE_HU: dict[str, tuple[float, float]] = {
    "air": (AIR_HU, 0.0),
    "liver": (65.0, 10.0),
    "spleen": (100.0, 10.0),
    "pancreas": (135.0, 12.0),
    "kidney_left": (175.0, 14.0),
    "kidney_right": (175.0, 14.0),
    "fat": (FAT_HU, 10.0),
    "muscle": (50.0, 8.0),
    "bowel": (35.0, 15.0),
    "gas": (-850.0, 40.0),
    "fluid": (10.0, 5.0),
    "bone_cortex": (650.0, 60.0),
    "bone_marrow": (250.0, 40.0),
    "disc": (80.0, 10.0),
    "csf": (15.0, 5.0),
    "aorta": (170.0, 10.0),
    "vein": (155.0, 10.0),
    "stomach_wall": (45.0, 8.0),
}


# --------------------------------------------------------------------------------------------------------
# geometry helpers (all on float32 coordinate arrays in mm, broadcasting over the grid)


def _rot(angle_z_deg: float, angle_y_deg: float = 0.0, angle_x_deg: float = 0.0) -> np.ndarray:
    """Rotation matrix (x, y, z) about z, then y, then x."""
    a, b, c = np.deg2rad([angle_z_deg, angle_y_deg, angle_x_deg])
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rx = np.array([[1, 0, 0], [0, np.cos(c), -np.sin(c)], [0, np.sin(c), np.cos(c)]])
    return rx @ ry @ rz


def _ellipsoid(
    u: Sequence[np.ndarray], centre: Sequence[float], semi: Sequence[float], rot: np.ndarray
) -> np.ndarray:
    """Normalised radius of an ellipsoid (< 1 inside) at coordinates ``u = (x, y, z)``."""
    d = [u[i] - np.float32(centre[i]) for i in range(3)]
    r2 = np.zeros(np.broadcast_shapes(*(c.shape for c in d)), dtype=np.float32)
    for i in range(3):
        local = d[0] * np.float32(rot[i, 0]) + d[1] * np.float32(rot[i, 1]) + d[2] * np.float32(rot[i, 2])
        r2 += (local / np.float32(semi[i])) ** 2
    return np.sqrt(r2)


def _smooth_field(
    rng: np.random.Generator, u: Sequence[np.ndarray], wavelength: tuple[float, float], terms: int = 4
) -> np.ndarray:
    """Random low-frequency field (sum of cosines with random directions), roughly unit amplitude."""
    out = np.zeros_like(u[0])
    for _ in range(terms):
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        k = 2 * np.pi / rng.uniform(*wavelength) * direction
        phase = rng.uniform(0, 2 * np.pi)
        out += np.cos(u[0] * np.float32(k[0]) + u[1] * np.float32(k[1]) + u[2] * np.float32(k[2]) + phase)
    return out * np.float32(1 / np.sqrt(terms / 2))


def _tube(
    u: Sequence[np.ndarray],
    points: np.ndarray,
    radii: np.ndarray,
    candidates: np.ndarray,
) -> np.ndarray:
    """Mask of a tube (union of spheres along a polyline), evaluated only on ``candidates`` voxels."""
    mask = np.zeros(u[0].shape, dtype=bool)
    idx = np.flatnonzero(candidates)
    if idx.size == 0:
        return mask
    pts = [c.ravel()[idx] for c in u]
    best = np.full(idx.size, np.inf, dtype=np.float32)
    for p, r in zip(points, radii, strict=True):
        dist = np.sqrt((pts[0] - p[0]) ** 2 + (pts[1] - p[1]) ** 2 + (pts[2] - p[2]) ** 2) - np.float32(r)
        np.minimum(best, dist, out=best)
    mask.ravel()[idx[best < 0]] = True
    return mask


def _bezier(p0: np.ndarray, p1: np.ndarray, p2: np.ndarray, n: int) -> np.ndarray:
    t = np.linspace(0.0, 1.0, n)[:, None]
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2


# --------------------------------------------------------------------------------------------------------
# the phantom


def make_case(
    *,
    spacing: Sequence[float],
    fov: float,
    noise: float,
    contrast: float,
    offset: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one synthetic abdomen; returns ``(hu int16 [Z, Y, X], global label uint8 [Z, Y, X])``.

    Parameters
    ----------
    spacing: voxel size (z, y, x) in mm; fov: fraction of the nominal extent (``EXTENT_MM``) covered;
    noise: Gaussian noise std in HU; contrast: multiplier of every tissue's contrast against fat;
    offset: HU added to the whole body; rng: the case's random generator (all randomness comes from it).
    The global label uses the classes of ``fedpsmos.organs`` (1 liver ... 5 kidney_right); kidney_left lies
    on the patient's left, i.e. at larger x (LPS) with the identity direction the files are written with.
    """
    spacing_mm = np.asarray(spacing, dtype=float)
    if spacing_mm.shape != (3,) or np.any(spacing_mm <= 0) or not 0 < fov <= 2:
        raise ValueError(f"bad synthetic geometry: spacing {spacing_mm.tolist()}, fov {fov}")
    # The craniocaudal coverage varies a little per case, as scan ranges do.
    extent = np.array(EXTENT_MM) * fov * np.array([rng.uniform(0.92, 1.08), 1.0, 1.0])
    shape = tuple(max(8, round(e / s)) for e, s in zip(extent, spacing_mm, strict=True))
    # Physical position of each voxel centre relative to the grid centre, plus where the patient lies in it.
    shift = rng.uniform([-12, -8, -10], [12, 8, 10])  # (z, y, x) mm
    axes = [
        (np.arange(n, dtype=np.float32) - (n - 1) / 2) * np.float32(s)
        for n, s in zip(shape, spacing_mm, strict=True)
    ]
    z = axes[0][:, None, None] - np.float32(shift[0])
    y = axes[1][None, :, None] - np.float32(shift[1])
    x = axes[2][None, None, :] - np.float32(shift[2])
    z, y, x = np.broadcast_arrays(z, y, x)
    grid = (x, y, z)

    # Patient-specific anatomy: a global anisotropic scale and rotation, then a smooth displacement field.
    scale = rng.uniform([0.88, 0.88, 0.9], [1.1, 1.1, 1.1])
    rot = _rot(rng.uniform(-6, 6), rng.uniform(-3, 3), rng.uniform(-4, 4))
    inv = np.linalg.inv(rot * scale[None, :])  # anatomy coordinates from patient coordinates
    u = [
        grid[0] * np.float32(inv[i, 0]) + grid[1] * np.float32(inv[i, 1]) + grid[2] * np.float32(inv[i, 2])
        for i in range(3)
    ]
    amplitude = rng.uniform(3.0, 7.0)
    u = [c + np.float32(amplitude) * _smooth_field(rng, grid, (90.0, 220.0), terms=3) for c in u]

    tissue = np.zeros(shape, dtype=np.uint8)
    ident = np.eye(3)

    def paint(mask: np.ndarray, name: str) -> None:
        tissue[mask] = TISSUE[name]

    # Body outline: an ellipse flattened posteriorly, subcutaneous fat, the muscular abdominal wall.
    bx, by = np.array(BODY_SEMI_AXES_MM) * rng.uniform(0.92, 1.06, size=2)
    by_post = by * rng.uniform(0.85, 0.95)
    body_y = np.where(u[1] > 0, np.float32(by_post), np.float32(by))
    taper = 1.0 + 0.04 * (u[2] / 100.0)  # slightly wider superiorly (lower ribs)
    body_r = np.sqrt((u[0] / (bx * taper)) ** 2 + (u[1] / (body_y * taper)) ** 2)
    fat_mm = rng.uniform(12, 32)
    wall_mm = rng.uniform(8, 14)
    inner_r = body_r * (min(bx, by) / (min(bx, by) - fat_mm))
    cavity_r = body_r * (min(bx, by) / (min(bx, by) - fat_mm - wall_mm))
    paint(body_r < 1, "fat")
    paint(inner_r < 1, "muscle")
    cavity = cavity_r < 1

    # Abdominal contents not segmented: bowel loops and mesenteric fat, a few gas pockets.
    bowel_field = _smooth_field(rng, u, (35.0, 70.0), terms=6)
    paint(cavity & (bowel_field > -0.3), "bowel")
    paint(cavity & (bowel_field <= -0.3), "fat")
    gas_field = _smooth_field(rng, u, (20.0, 40.0), terms=5)
    paint(cavity & (gas_field > 1.3) & (u[1] < 0), "gas")

    # Ribs: cross-sections near the wall, upper half, posterior-lateral, z-periodic.
    rib_band = (inner_r > 0.93) & (inner_r < 1.0) & (u[2] > -20) & (np.abs(u[0]) > 60)
    paint(rib_band & (np.cos(2 * np.pi * u[2] / 28.0 + rng.uniform(0, 6.3)) > 0.55), "bone_cortex")

    # Spine at the posterior midline: vertebral body with discs, canal, posterior elements; muscles beside it.
    vb = np.sqrt((u[0] / 21.0) ** 2 + ((u[1] - 55.0) / 17.0) ** 2)
    disc = np.cos(2 * np.pi * u[2] / 34.0 + rng.uniform(0, 6.3)) > 0.8
    canal = np.sqrt(u[0] ** 2 + (u[1] - 84.0) ** 2)
    paraspinal = np.minimum(
        _ellipsoid(u, (38, 100, 0), (26, 20, 1e6), ident), _ellipsoid(u, (-38, 100, 0), (26, 20, 1e6), ident)
    )
    psoas_semi = 10.0 + 8.0 * np.clip((40.0 - u[2]) / 140.0, 0, 1)  # thickens caudally
    psoas = np.minimum(
        np.sqrt(((u[0] - 42) / psoas_semi) ** 2 + ((u[1] - 55) / psoas_semi) ** 2),
        np.sqrt(((u[0] + 42) / psoas_semi) ** 2 + ((u[1] - 55) / psoas_semi) ** 2),
    )
    paint(paraspinal < 1, "muscle")
    paint((psoas < 1) & (u[2] < 40), "muscle")
    paint((canal > 9) & (canal < 17) & (u[1] > 76), "bone_cortex")  # laminae
    paint((np.abs(u[0]) < 5) & (u[1] > 95) & (u[1] < 122), "bone_cortex")  # spinous process
    paint(vb < 1, "bone_cortex")
    paint(vb < 0.8, "bone_marrow")
    paint((vb < 1) & disc, "disc")
    paint(canal < 9, "csf")

    # Great vessels in front of the spine: aorta slightly left of the midline, IVC on the right. They are
    # painted again after the organs so that no organ swallows them.
    aorta = np.sqrt((u[0] - 12) ** 2 + (u[1] - 28) ** 2) < rng.uniform(9, 12)
    ivc = np.sqrt((u[0] + 24) ** 2 + (u[1] - 24) ** 2) < rng.uniform(9, 13)

    def jitter(centre: Sequence[float], semi: Sequence[float], rot_deg: float = 10.0):
        c = np.asarray(centre) + rng.normal(0, 5.0, size=3)
        s = np.asarray(semi) * rng.uniform(0.85, 1.15, size=3)
        r = _rot(rng.uniform(-rot_deg, rot_deg), rng.uniform(-rot_deg / 2, rot_deg / 2))
        return c, s, r

    lobulation = _smooth_field(rng, u, (25.0, 50.0), terms=6)

    # Liver first: it fills the right upper quadrant (right lobe against the wall, left lobe reaching over the
    # midline) and the organs painted after it cut into it where they abut, as they do in a real abdomen.
    c, s, r = jitter((-68.0, -2.0, 38.0), (72.0, 84.0, 76.0))
    right = _ellipsoid(u, c, s, r)
    c, s, r = jitter((0.0, -48.0, 58.0), (52.0, 32.0, 32.0))
    left = _ellipsoid(u, c, s, r)
    liver = (np.minimum(right, left) + np.float32(0.07) * lobulation < 1) & cavity
    liver &= ~((vb < 1.6) | (psoas < 1.2))  # never wraps around the spine
    paint(liver, "liver")

    # Stomach: left upper anterior, fluid with an anterior gas cap; a hard negative for spleen and liver.
    c, s, r = jitter((55.0, -45.0, 55.0), (45.0, 35.0, 45.0))
    st = _ellipsoid(u, c, s, r)
    paint((st < 1) & cavity, "stomach_wall")
    paint((st < 0.82) & cavity, "fluid")
    paint((st < 0.82) & cavity & (u[1] < c[1] - 0.45 * s[1]), "gas")

    # Spleen: left posterior upper quadrant, long axis tilted towards anterior-inferior; about 300 ml (a large
    # normal spleen), so that it is more than a few voxels thick on the CPU grid (6 mm in-plane).
    c, s, r = jitter((84.0, 38.0, 52.0), (30.0, 54.0, 48.0), rot_deg=15.0)
    r = _rot(-35.0, 0.0, 20.0) @ r
    paint((_ellipsoid(u, c, s, r) + np.float32(0.08) * lobulation < 1) & cavity, "spleen")

    # Kidneys: bean shapes (ellipsoid minus a medial hilum notch) in perirenal fat, tilted, the right lower.
    for organ, side, z0, yaw in (("kidney_left", 1.0, -12.0, 25.0), ("kidney_right", -1.0, -26.0, -25.0)):
        c, s, r = jitter((side * 76.0, 60.0, z0), (26.0, 30.0, 54.0))
        r = _rot(yaw, side * 12.0) @ r
        kid = _ellipsoid(u, c, s, r) + np.float32(0.06) * lobulation
        notch = _ellipsoid(u, c + np.array([-side * 24.0, -8.0, 0.0]), s * np.array([0.5, 0.4, 0.45]), r)
        soft = (tissue == TISSUE["bowel"]) | (tissue == TISSUE["gas"])
        paint((kid < 1.35) & cavity & soft, "fat")  # perirenal fat, leaving muscle, bone and liver alone
        paint((kid < 1) & (notch >= 1), organ)

    # Pancreas: a tube from the head (right of midline, by the duodenum) over the vessels to the tail at the
    # splenic hilum (radius 23 mm at the head, 14-15 mm along body and tail: about 130 ml, a large adult
    # pancreas), with the splenic vein along its back.
    head = np.array([-32.0, 2.0, -8.0]) + rng.normal(0, 5, 3)
    body = np.array([18.0, -18.0, 8.0]) + rng.normal(0, 6, 3)
    tail = np.array([80.0, 34.0, 26.0]) + rng.normal(0, 6, 3)
    path = _bezier(head, body, tail, 28)
    radii = np.interp(np.linspace(0, 1, 28), [0, 0.25, 1], [23.0, 15.0, 14.0]) * rng.uniform(0.85, 1.15)
    radii = radii * (1 + 0.12 * rng.normal(size=radii.size)).clip(0.7, 1.3)
    lo, hi = path.min(0) - 25, path.max(0) + 25
    near = (u[0] > lo[0]) & (u[0] < hi[0]) & (u[1] > lo[1]) & (u[1] < hi[1]) & (u[2] > lo[2]) & (u[2] < hi[2])
    vein_path = path[4:] + np.array([0.0, 11.0, 0.0])
    paint(_tube(u, vein_path, np.full(len(vein_path), 4.0), near) & cavity, "vein")
    paint(_tube(u, path, radii, near) & cavity, "pancreas")

    # Gallbladder under the liver (fluid, not liver), then the great vessels on top of everything.
    c, s, r = jitter((-45.0, -45.0, -5.0), (14.0, 14.0, 28.0))
    paint((_ellipsoid(u, c, s, r) < 1) & cavity, "fluid")
    paint(aorta, "aorta")
    paint(ivc, "vein")

    label = tissue.copy()
    label[label > CLASS_INDEX[ORGANS[-1]]] = 0

    # Intensities: tissue mean with per-case jitter for the organs, smooth texture, partial-volume blur.
    means = np.array([_TISSUE_HU[name][0] for name in TISSUE], dtype=np.float32)
    texture = np.array([_TISSUE_HU[name][1] for name in TISSUE], dtype=np.float32)
    for organ in ORGANS:
        means[TISSUE[organ]] += rng.normal(0, 8.0)
    means[TISSUE["kidney_right"]] = means[TISSUE["kidney_left"]] + rng.normal(0, 4.0)
    fine = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma=1.2)
    fine /= max(float(fine.std()), 1e-6)
    image = means[tissue] + texture[tissue] * fine
    # Kidney medulla and pancreatic fatty lobulation: darker inner structure inside the labels.
    for organ in ("kidney_left", "kidney_right"):
        k = tissue == TISSUE[organ]
        image[k & (fine < -0.5)] -= np.float32(35.0)
    image[(tissue == TISSUE["pancreas"]) & (lobulation > 1.1)] -= np.float32(35.0)
    in_body = tissue != TISSUE["air"]
    image = np.where(in_body, FAT_HU + np.float32(contrast) * (image - FAT_HU) + np.float32(offset), image)
    sigma_vox = np.clip(0.6 * spacing_mm.min() / spacing_mm, 0.2, 0.6)
    image = ndimage.gaussian_filter(image, sigma=sigma_vox)
    image = image + rng.normal(0.0, noise, size=shape).astype(np.float32)
    hu = np.clip(np.rint(image), HU_MIN, HU_MAX).astype(np.int16)
    return hu, label
