"""Realistic subjects, the split of anatomy, the held-out scan and the paper's preprocessing."""
import dataclasses

import numpy as np
import pytest
from scipy.spatial.transform import Rotation
import torch

from conftest import SHARED_DATA
from regedu.datasets import (ANATOMIES, COURSE_TEST_SETS, DONORS, FREESURFER_30, HELD_OUT_ANATOMY, STRUCTURE_NAMES, TRAIN_ANATOMY,
                             DataUnavailableError, Misaligned, RealisticPairs, atlas_pair,
                             anatomy_split, complete_donor, course_test_sets, mni_brain, normalise_intensity, preprocess,
                             random_pose, realistic_subject, vxm_subject)
from regedu.metrics import dice
from regedu.spatial import affine_to_displacement, warp

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("regedu_data")


@pytest.fixture(scope="module")
def atlas(cache):
    return mni_brain(4, cache_dir=cache)


def _labels(atlas):
    return [k for k in FREESURFER_30 if (atlas.seg == k).any()]


def _crop(x, margin):
    return x[..., margin:-margin, margin:-margin, margin:-margin] if margin else x


# ------------------------------------------------------------------ the split

def test_the_split_never_lets_a_held_out_brain_into_training():
    split = anatomy_split()
    assert set(split) == {"train", "held_out"}
    train, held_out = set(split["train"]), set(split["held_out"])
    assert not train & held_out
    assert train | held_out == set(ANATOMIES) == set(DONORS) | {"mni152"}
    assert len(held_out) >= 2 and "mni152" in train  # the atlas is never held-out anatomy
    assert split["train"] == TRAIN_ANATOMY and split["held_out"] == HELD_OUT_ANATOMY


def test_pairs_of_a_split_are_made_of_its_brains_only(cache):
    train = RealisticPairs(23, anatomy="train", spacing_mm=4, cache_dir=cache)
    held_out = RealisticPairs(23, anatomy="held_out", spacing_mm=4, cache_dir=cache)
    made_of = {train.anatomy_of(i) for i in range(23)}
    assert made_of == set(TRAIN_ANATOMY)  # round robin: every training brain, no other
    assert {held_out.anatomy_of(i) for i in range(23)} == set(HELD_OUT_ANATOMY)
    with pytest.raises(ValueError, match="anatomy"):
        RealisticPairs(2, anatomy=["mni152", "no-such-brain"], spacing_mm=4, cache_dir=cache)


def test_the_pool_keeps_pre_aligned_pairs_on_disk(cache, atlas):
    pairs = RealisticPairs(2, anatomy=["mni152"], spacing_mm=4, seed=3, cache_dir=cache)
    seconds = pairs.build()
    files = sorted((cache / "offline" / "pool").rglob("*.npz"))
    assert [f.name for f in files] == ["mni152_000000.npz", "mni152_000001.npz"]
    assert not list((cache / "offline" / "pool").rglob(".*"))  # no temporary file left behind
    again = RealisticPairs(2, anatomy=["mni152"], spacing_mm=4, seed=3, cache_dir=cache)
    start = __import__("time").perf_counter()
    item = again[1]
    assert __import__("time").perf_counter() - start < seconds / 4  # loaded, not re-registered
    fresh = RealisticPairs(2, anatomy=["mni152"], spacing_mm=4, seed=3, cache_dir=cache, pool=False)[1]
    assert torch.equal(item["moving"], fresh["moving"]) and torch.equal(item["moving_seg"], fresh["moving_seg"])
    assert item["moving"].shape == item["fixed"].shape == (1, 40, 48, 56)
    assert item["meta"]["anatomy"] == "mni152" and np.asarray(item["meta"]["matrix"]).shape == (4, 4)
    # Pre-aligned pairs overlap far better than the same subjects as scanned.
    raw = RealisticPairs(2, anatomy=["mni152"], spacing_mm=4, seed=3, cache_dir=cache, prealign=None)[1]
    labels = _labels(atlas)
    assert dice(atlas.seg, item["moving_seg"][0].numpy(), labels).mean > \
        dice(atlas.seg, raw["moving_seg"][0].numpy(), labels).mean + 0.1
    # As a list for evaluation: the same items, tagged with their dataset.
    tagged = again.as_list("train set")
    assert [p["meta"]["id"] for p in tagged] == ["train set 0 (mni152)", "train set 1 (mni152)"]
    assert all(p["meta"]["dataset"] == "train set" for p in tagged) and torch.equal(tagged[1]["moving"], item["moving"])
    assert "dataset" not in again.as_list()[0]["meta"]


def test_course_test_sets_are_the_named_splits_and_seeds(cache):
    sets = course_test_sets({"held-out": 1, "in-distribution": 2}, spacing_mm=4, prealign=None, cache_dir=cache)
    assert list(sets) == ["held-out", "in-distribution"] and [len(v) for v in sets.values()] == [1, 2]
    assert sets["held-out"][0]["meta"]["anatomy"] in HELD_OUT_ANATOMY
    assert {p["meta"]["anatomy"] for p in sets["in-distribution"]} <= set(TRAIN_ANATOMY)
    assert [p["meta"]["id"] for p in sets["in-distribution"]] == [
        f"in-distribution {i} ({p['meta']['anatomy']})" for i, p in enumerate(sets["in-distribution"])]
    # The subjects of COURSE_TEST_SETS' seeds, never those of training (seed 0).
    anatomy, seed = COURSE_TEST_SETS["in-distribution"]
    same = RealisticPairs(2, anatomy=anatomy, seed=seed, spacing_mm=4, prealign=None, cache_dir=cache)[1]
    train = RealisticPairs(2, anatomy=anatomy, seed=0, spacing_mm=4, prealign=None, cache_dir=cache)[1]
    assert torch.equal(sets["in-distribution"][1]["moving"], same["moving"])
    assert not torch.equal(same["moving"], train["moving"])
    with pytest.raises(ValueError, match="sizes.*'held-out'"):
        course_test_sets({"held_out": 1}, spacing_mm=4, cache_dir=cache)
    with pytest.raises(ValueError, match="sizes\\['held-out'\\]"):
        course_test_sets({"held-out": 0}, spacing_mm=4, cache_dir=cache)


# ------------------------------------------------------------------ pose

def test_random_pose_is_seeded_and_within_its_ranges():
    shape, spacing = (48, 56, 64), 4.0
    poses = [random_pose(k, shape=shape, spacing_mm=spacing) for k in range(200)]
    again = random_pose(7, shape=shape, spacing_mm=spacing)
    assert np.array_equal(again["matrix"], poses[7]["matrix"])
    assert not np.allclose(poses[0]["matrix"], poses[1]["matrix"])
    angles = np.array([p["angles_deg"] for p in poses])
    scales = np.array([p["scales"] for p in poses])
    shifts = np.array([p["translation_mm"] for p in poses])
    assert np.abs(angles).max() <= 12 and np.abs(angles).max() > 10        # the range is used
    assert scales.min() >= 0.9 * 0.96 and scales.max() <= 1.1 * 1.04
    assert np.abs(shifts).max() <= 12 and np.abs(shifts).max() > 10
    # The matrix is the drawn pose: its linear part's singular values are the scales.
    for p in poses[:5]:
        sv = np.linalg.svd(p["matrix"][:3, :3], compute_uv=False)
        np.testing.assert_allclose(np.sort(sv), np.sort(p["scales"]), rtol=1e-9)
        # Rotation about the grid's centre: the centre moves by the translation alone.
        c = (np.array(shape) - 1) / 2
        np.testing.assert_allclose(p["matrix"][:3, :3] @ c + p["matrix"][:3, 3] - c,
                                   p["translation_mm"] / spacing, atol=1e-9)


# ------------------------------------------------------------------ subjects

def test_realistic_subjects_are_seeded_and_keep_their_labels_with_the_image(atlas):
    a, b = (realistic_subject(atlas, 3) for _ in range(2))
    c = realistic_subject(atlas, 4)
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["seg"], b["seg"])
    assert not torch.equal(a["image"], c["image"])
    m = a["margin"]
    assert m == 4 and a["image"].shape == (1, 48, 56, 64) and a["seg"].dtype == torch.int64
    # The labels are the anatomy's, warped by the returned field.
    padded = torch.nn.functional.pad(torch.from_numpy(atlas.seg)[None, None], (m, m) * 3)
    assert torch.equal(warp(padded, a["disp"][None])[0], a["seg"])
    assert set(a["seg"].unique().tolist()) <= set(np.unique(atlas.seg).tolist())
    # Raw scanner units: the gain is drawn, the background stays zero.
    assert a["image"].max() != pytest.approx(1.0) and (a["image"][a["seg"] == 0] == 0).all()


def test_a_pose_only_subject_is_the_anatomy_under_the_known_affine(atlas):
    s = realistic_subject(atlas, 5, deformation=False, intensity=False)
    m = s["margin"]
    truth = affine_to_displacement(torch.tensor(s["pose"][:3], dtype=torch.float32)[None], s["image"].shape[1:])
    torch.testing.assert_close(s["disp"][None], truth, atol=1e-4, rtol=0)
    padded = torch.nn.functional.pad(torch.from_numpy(atlas.image)[None], (m, m) * 3)
    torch.testing.assert_close(s["image"], warp(padded, truth)[0], atol=1e-5, rtol=0)
    assert np.abs(s["params"]["angles_deg"]).max() > 1  # a real pose, not the identity


def test_preprocessing_recovers_a_known_global_affine(atlas):
    # A subject that differs from the atlas by a known pose only: the
    # pre-alignment's matrix must map each atlas voxel where the pose put it.
    s = realistic_subject(atlas, 11, deformation=False, noise=0.0)
    m = s["margin"]
    shift = np.eye(4)
    shift[:3, 3] = m
    truth = np.linalg.inv(s["pose"]) @ shift  # atlas voxel -> subject canvas voxel
    inside = np.argwhere(atlas.seg > 0).astype(float)
    pts = np.c_[inside, np.ones(len(inside))]
    for method in ("ants", "regedu"):
        p = preprocess(s["image"], atlas.image, moving_seg=s["seg"], spacing_mm=4, method=method)
        error = np.linalg.norm((pts @ (p.matrix - truth).T)[:, :3], axis=1)
        assert error.mean() < 0.3, (method, error.mean())  # voxels of 4 mm
        assert p.image.shape == (1, 40, 48, 56) and 0 <= p.image.min() and p.image.max() <= 1


def test_preprocessing_raises_dice_on_a_pose_perturbed_pair(atlas):
    labels = _labels(atlas)
    s = realistic_subject(atlas, 2)  # pose, deformation and intensity changes
    m = s["margin"]
    before = dice(atlas.seg, _crop(s["seg"][0], m).numpy(), labels).mean
    p = preprocess(s["image"], atlas.image, moving_seg=s["seg"], spacing_mm=4)
    after = dice(atlas.seg, p.seg[0].numpy(), labels).mean
    assert after > before + 0.15, (before, after)
    # The same resampling applies to any other volume of the subject.
    assert torch.equal(p.apply(s["seg"], labels=True), p.seg)


def _ramps(shape=(20, 24, 28)):
    # One pair per axis: moving = that voxel coordinate, which linear interpolation resamples exactly.
    grids = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    seg = torch.zeros(1, *shape, dtype=torch.long)
    seg[:, 5:15, 6:18, 7:21] = 3
    return [{"moving": torch.from_numpy(g)[None], "fixed": torch.zeros(1, *shape), "moving_seg": seg,
             "fixed_seg": seg, "meta": {"index": k}} for k, g in enumerate(grids)]


def test_misaligned_pairs_are_the_moving_side_under_their_known_matrix():
    pairs = Misaligned(_ramps(), seed=3, spacing_mm=2)
    shape = pairs[0]["moving"].shape[1:]
    centre = np.array([(n - 1) / 2 for n in shape])
    inner = tuple(slice(4, n - 4) for n in shape)                # away from the border's padding
    x = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)[inner].reshape(-1, 3)
    for k in range(3):
        item, m = pairs[k], pairs.matrix(k)
        assert item["meta"] == {"index": k, "misalignment": m.tolist()}
        # Item k of the ramps is axis k: its warped value is axis k of the map L (x - c) + c + T.
        expected = ((x - centre) @ m[:, :3].T + centre + m[:, 3])[:, k]
        np.testing.assert_allclose(item["moving"][0][inner].reshape(-1).numpy(), expected, atol=1e-3)
        assert item["moving_seg"].dtype == torch.long and set(item["moving_seg"].unique().tolist()) == {0, 3}
    # The same (seed, index) gives the same matrix; within the ranges: 4 degrees, 4 %, 4 mm = 2 voxels.
    again = Misaligned(_ramps(), seed=3, spacing_mm=2)
    matrices = [Misaligned(_ramps(), seed=s, spacing_mm=2).matrix(0) for s in range(50)]
    np.testing.assert_array_equal(again.matrix(1), pairs.matrix(1))
    assert not np.array_equal(pairs.matrix(0), pairs.matrix(1))
    assert all(np.abs(m[:, 3]).max() <= 2 for m in matrices)
    assert max(np.abs(m[:, 3]).max() for m in matrices) > 1.5
    # L = R S: the rotation and the per-axis scales come back from a polar decomposition.
    scales = np.array([np.linalg.svd(m[:, :3], compute_uv=False) for m in matrices])
    assert 0.96 <= scales.min() and scales.max() <= 1.04 and scales.max() > 1.03
    rotations = [Rotation.from_matrix(m[:, :3] @ np.diag(1 / np.linalg.norm(m[:, :3], axis=0))) for m in matrices]
    angles = np.array([r.as_euler("xyz", degrees=True) for r in rotations])
    assert np.abs(angles).max() <= 4 + 1e-6 and (np.abs(angles).max(axis=0) > 3).all()  # about every axis
    # pose() reports the draw that matrix() applies.
    pose = Misaligned(_ramps(), seed=0, spacing_mm=2).pose(0)
    np.testing.assert_allclose(pose["angles_deg"], angles[0], atol=1e-6)
    np.testing.assert_allclose(pose["scales"], np.linalg.norm(matrices[0][:, :3], axis=0), atol=1e-9)


def test_misaligned_refuses_what_it_cannot_misalign():
    with pytest.raises(ValueError, match="spacing_mm: these pairs carry no .spacing"):
        Misaligned(_ramps())
    with pytest.raises(ValueError, match=r"rotation_deg: expected a non-negative number, got -1"):
        Misaligned(_ramps(), spacing_mm=2, rotation_deg=-1)
    flat = [{"moving": torch.zeros(1, 8, 8), "moving_seg": torch.zeros(1, 8, 8, dtype=torch.long)}]
    with pytest.raises(ValueError, match=r"pairs\[0\]\['moving'\]: expected a 3D image \(1, D, H, W\), got shape \(1, 8, 8\)"):
        Misaligned(flat, spacing_mm=2)[0]


def test_normalise_intensity_divides_by_a_high_percentile():
    x = torch.zeros(10, 10, 10)
    x[2:8, 2:8, 2:8] = torch.linspace(0.1, 3.0, 216).reshape(6, 6, 6)
    y = normalise_intensity(x * 7.0)
    assert y.max() == 1 and y.min() == 0 and (y[x == 0] == 0).all()
    torch.testing.assert_close(y, normalise_intensity(x))  # a gain changes nothing


# ------------------------------------------------------------------ errors

def test_bad_arguments_give_clear_errors(atlas):
    with pytest.raises(ValueError, match="source: expected one of 'mni152', '9861'"):
        realistic_subject("donor7", 0)
    with pytest.raises(ValueError, match="spacing_mm: a source given as arrays"):
        realistic_subject(dict(image=atlas.image, seg=atlas.seg), 0)
    with pytest.raises(ValueError, match="gain"):
        realistic_subject(atlas, 0, gain=(2.0, 1.0))
    with pytest.raises(ValueError, match="scale"):
        random_pose(0, shape=(8, 8, 8), spacing_mm=1, scale=(1.1, 0.9))
    with pytest.raises(ValueError, match="translation_mm"):
        random_pose(0, shape=(8, 8, 8), spacing_mm=1, translation_mm=-1)
    with pytest.raises(ValueError, match="moving: expected a grid at least as large"):
        preprocess(atlas.image[:, 1:], atlas.image)
    with pytest.raises(ValueError, match="method"):
        preprocess(atlas.image, atlas.image, method="elastix")
    with pytest.raises(ValueError, match="moving_seg: expected the shape"):
        preprocess(atlas.image, atlas.image, moving_seg=atlas.seg[1:])
    with pytest.raises(ValueError, match="no voxel above zero"):
        normalise_intensity(torch.zeros(4, 4, 4))
    with pytest.raises(ValueError, match="missing"):
        vxm_subject(4, missing="ignore")


# ------------------------------------------------------------------ held-out data

def test_vxm_subject_is_on_the_template_grid(shared_data, tmp_path, atlas):
    v = vxm_subject(4, cache_dir=tmp_path / "cache", mirror=shared_data)
    assert v.image.shape == atlas.image.shape and v.seg.shape == atlas.seg.shape
    assert v.image.min() == 0 and v.image.max() == 1 and v.meta["held_out"]
    # Same orientation as the template: the structures overlap before any registration.
    labels = _labels(atlas)
    assert set(labels) <= set(np.unique(v.seg)) and dice(atlas.seg, v.seg, labels).mean > 0.35


def test_structures_are_the_thirty_that_a_brain_labels(atlas):
    names = atlas.structures()
    assert list(names) == [k for k in FREESURFER_30 if k in names] and names[17] == STRUCTURE_NAMES[17]
    assert len(names) == 26  # the template lacks the ventral DC and the choroid plexus (docs/conventions.md)
    seg = atlas.seg.copy()
    seg[seg == 17] = 0
    assert list(dataclasses.replace(atlas, seg=seg).structures()) == [k for k in names if k != 17]


def test_atlas_pair_prepares_a_scan_as_the_paper_does(shared_data, tmp_path, atlas):
    v = vxm_subject(4, cache_dir=tmp_path / "cache", mirror=shared_data)
    labels = list(atlas.structures())
    scanned = atlas_pair(v, atlas, prealign=None, meta=dict(id="scan"))
    aligned = atlas_pair(v, atlas, meta=dict(id="scan"))
    for pair in (scanned, aligned):
        assert pair["moving"].shape == pair["fixed"].shape == (1, 40, 48, 56)
        assert pair["moving_seg"].dtype == pair["fixed_seg"].dtype == torch.int64
        assert pair["meta"]["id"] == "scan"
    assert scanned["meta"] == dict(id="scan", prealign=None, seconds=0.0) and aligned["meta"]["seconds"] > 0
    torch.testing.assert_close(scanned["moving"], normalise_intensity(v.image))
    before = dice(atlas.seg, scanned["moving_seg"][0].numpy(), labels).mean
    after = dice(atlas.seg, aligned["moving_seg"][0].numpy(), labels).mean
    assert after > before + 0.05, (before, after)
    # The atlas against itself is a perfect pair.
    self_pair = atlas_pair(atlas, atlas, prealign=None)
    assert torch.equal(self_pair["moving_seg"], self_pair["fixed_seg"])
    with pytest.raises(ValueError, match="subject: expected the atlas's voxel size, 4 mm, got 2 mm"):
        atlas_pair(mni_brain(2, cache_dir=tmp_path / "cache"), atlas)


def test_vxm_subject_without_the_scan_says_so(tmp_path, monkeypatch):
    monkeypatch.delenv("REGEDU_MIRROR", raising=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert vxm_subject(4, cache_dir=tmp_path / "cache", mirror=empty) is None
    with pytest.raises(DataUnavailableError, match="regedu fetch vxm-test-scan"):
        vxm_subject(4, cache_dir=tmp_path / "cache", mirror=empty, missing="raise")


def test_a_completed_donor_keeps_its_own_anatomy_and_gains_what_it_lacked(cache, atlas):
    pytest.importorskip("ants")
    from regedu.datasets import donor_brain
    donor = donor_brain("10021", 4, cache_dir=cache)
    full = complete_donor("10021", 4, cache_dir=cache)
    lacked = {4, 7, 8, 14, 15, 16, 24, 43, 46, 47}  # ventricles, cerebellum, brainstem, CSF
    assert not lacked & set(np.unique(donor.seg)) and lacked <= set(np.unique(full.seg))
    # The donor's own cortex and deep grey nuclei are kept (up to the 4 mm block
    # vote, which the added structures can tip at their borders).
    own = np.isin(donor.seg, [3, 42, 10, 11, 12, 13, 17, 18, 49, 50, 51, 52, 53, 54])
    assert (full.seg[own] == donor.seg[own]).mean() > 0.95
    before, after = full.meta["fit_dice"]
    assert after > before  # the template was fitted to the donor before its structures were carried
    assert full.meta["dice"] > 0.5
    # No unlabelled voxel is left enclosed in the brain at 1 mm (donor 15697's
    # open hull left 224,000 of them, black holes in its image).
    from scipy import ndimage
    from regedu.datasets.subjects import _fill_interior
    parcels = np.zeros((12, 12, 12), np.int64)
    parcels[2:10, 2:10, 2:10] = 3          # left cortex around...
    parcels[4:8, 4:8, 4:8] = 0             # ...an unlabelled core
    assert _fill_interior(parcels) == 64 and (parcels[4:8, 4:8, 4:8] == 101).all()
    assert not (ndimage.binary_fill_holes(parcels > 0) & (parcels == 0)).any()
