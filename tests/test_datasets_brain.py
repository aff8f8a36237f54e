"""Offline brain: template + labels, label table, synthetic subjects, donors, brain samplers."""
import numpy as np
import pytest
import torch

from conftest import SHARED_DATA
from regedu.datasets import (FREESURFER_30, MNI_NOTICE, STRUCTURE_NAMES, BrainPairs, SubjectPairs,
                             brain_slice, donor_brain, label_table, load_vxm_labels, mni_brain,
                             synth_subject, to_freesurfer)

THIRTY = [2, 3, 4, 7, 8, 10, 11, 12, 13, 14, 15, 16, 17, 18, 24, 28, 31,
          41, 42, 43, 46, 47, 49, 50, 51, 52, 53, 54, 60, 63]  # docs/conventions.md, written out independently

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("regedu_data")


@pytest.fixture(scope="module")
def brain(cache):
    return mni_brain(4, cache_dir=cache)  # the ci size; builds the 1 mm volume once


def test_template_shape_range_and_cache(brain, cache):
    assert brain.image.shape == (1, 40, 48, 56) and brain.image.dtype == np.float32
    assert brain.image.min() == 0 and brain.image.max() == 1
    assert brain.seg.shape == (40, 48, 56) and brain.seg.dtype == np.int64
    cached = cache / "offline" / "mni152_4mm.npz"
    assert cached.is_file() and (cache / "offline" / "MNI152_NOTICE.txt").read_text() == MNI_NOTICE
    assert "McConnell Brain Imaging Centre" in MNI_NOTICE and "McGill University" in MNI_NOTICE
    again = mni_brain(4, cache_dir=cache)
    assert np.array_equal(again.seg, brain.seg) and np.array_equal(again.image, brain.image)


def test_labels_cover_the_thirty_structures_where_a_source_exists(brain):
    present = set(np.unique(brain.seg)) - {0}
    assert list(FREESURFER_30) == THIRTY == list(STRUCTURE_NAMES)  # one vocabulary (datasets.freesurfer)
    missing = set(THIRTY) - present
    assert missing == {28, 31, 60, 63}  # ventral DC and choroid plexus: no source offline
    table = label_table()
    assert set(table.loc[table["in_30"], "freesurfer"]) == set(THIRTY) - missing
    assert len(table) == 83 + 11 and table["label"].is_unique
    assert set(np.unique(brain.parcels)) - {0} <= set(table["label"])
    assert np.array_equal(to_freesurfer(brain.parcels), brain.seg)


def test_structures_are_named_by_freesurfer_not_by_a_parcel():
    # Notebook 10 once named cortex 3/42 "L-bankssts"/"R-bankssts": the name of
    # the first DK parcel of the structure. One row per structure must carry
    # the structure's own FreeSurfer name.
    table = label_table()
    per_structure = table[table["in_30"]].drop_duplicates("freesurfer").set_index("freesurfer")
    names = per_structure["freesurfer_name"]
    assert names[3] == "Left-Cerebral-Cortex" and names[42] == "Right-Cerebral-Cortex"
    assert names[16] == "Brain-Stem" and names[2] == "Left-Cerebral-White-Matter"
    assert names.is_unique and not names.str.contains("bankssts").any()
    cortex = table[table["freesurfer"] == 3]
    assert len(cortex) == 34 and set(cortex["freesurfer_name"]) == {"Left-Cerebral-Cortex"}


def test_template_anatomy_is_where_it_should_be(brain):
    # FreeSurfer conformed orientation (Left, Inferior, Anterior), like voxelmorph's scan.
    centroid = {k: np.argwhere(brain.seg == k).mean(0) for k in (2, 41, 8, 16, 4)}
    assert centroid[2][0] > centroid[41][0]          # left WM at higher axis-0 index
    assert centroid[8][1] > centroid[2][1]           # cerebellum below the cerebrum
    assert centroid[8][2] < centroid[4][2]           # and behind the ventricles
    # Tissue intensities: white matter brighter than cortex, brighter than CSF.
    img = brain.image[0]
    wm, gm, csf = (np.median(img[np.isin(brain.seg, ks)]) for ks in ((2, 41), (3, 42), (4, 43)))
    assert wm > gm > csf


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data not present")
def test_template_labels_overlap_a_real_subject(brain):
    # Without any registration the template and voxelmorph's subject already
    # overlap: same orientation, same field of view, same label numbers.
    from regedu.datasets import load_vxm_scan
    from regedu.datasets.brain import donor_dice
    scan = load_vxm_scan(SHARED_DATA / "test_scan.npz", shape=(40, 48, 56))
    labels = load_vxm_labels(SHARED_DATA / "labels.npz")
    seg = np.where(np.isin(scan["seg"], labels), scan["seg"], 0)
    assert donor_dice(np.where(np.isin(brain.seg, labels), brain.seg, 0), seg) > 0.35


def test_synthetic_subjects_are_seeded_diffeomorphic_and_labelled(brain):
    a, b = synth_subject(brain, seed=1), synth_subject(brain, seed=1)
    c = synth_subject(brain, seed=2)
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["seg"], b["seg"])
    assert not torch.equal(a["image"], c["image"])
    assert a["image"].shape == (1, 40, 48, 56) and a["seg"].dtype == torch.int64
    assert set(torch.unique(a["seg"]).tolist()) <= set(np.unique(brain.seg).tolist())  # nearest
    from regedu.metrics import folding_stats
    stats = folding_stats(a["disp"][None])
    assert stats["percent_folding"] == 0 and 0 < a["disp"].abs().max() < 10
    from regedu.spatial import warp
    again = warp(torch.as_tensor(brain.seg)[None, None], a["disp"][None])[0]
    assert torch.equal(again, a["seg"])  # the returned field is the one applied


def test_brain_pairs_atlas_and_subject_modes(brain):
    ds = BrainPairs(3, atlas=brain, mode="atlas", seed=0)
    item = ds[0]
    assert item["moving"].shape == item["fixed"].shape == (1, 40, 48, 56)
    assert item["moving_seg"].shape == (1, 40, 48, 56)
    assert torch.equal(item["fixed"], torch.as_tensor(brain.image))  # the atlas is fixed
    assert torch.equal(ds[0]["moving"], item["moving"])  # same index, same pair
    s2s = BrainPairs(2, atlas=brain, mode="subject", ndim=2, seed=0)[1]
    assert s2s["moving"].shape == s2s["fixed"].shape == (1, 40, 48)
    assert not torch.equal(s2s["moving"], s2s["fixed"])
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2)))
    assert batch["moving"].shape == (2, 1, 40, 48, 56) and batch["meta"]["mode"] == ["atlas", "atlas"]


def test_subject_pairs_over_loaded_items(brain):
    subjects = {k: dict(image=synth_subject(brain, seed=k)["image"].numpy(),
                        seg=synth_subject(brain, seed=k)["seg"][0].numpy(), name=f"s{k}") for k in range(3)}
    pairs = SubjectPairs(subjects.__getitem__, list(subjects))
    assert len(pairs) == 6 and pairs[0]["meta"]["moving"] == "s0" and pairs[0]["meta"]["fixed"] == "s1"
    atlas_pairs = SubjectPairs(subjects.__getitem__, [0, 1, 2], atlas=brain_slice(brain) | dict(
        image=brain.image, seg=brain.seg, name="atlas"))
    assert len(atlas_pairs) == 3 and atlas_pairs[2]["meta"]["fixed"] == "atlas"
    assert atlas_pairs[2]["fixed_seg"].shape == (1, 40, 48, 56)


def test_donor_anatomy_is_aligned_to_the_template(cache):
    donor = donor_brain("10021", 4, cache_dir=cache)
    assert donor.image.shape == (1, 40, 48, 56)
    assert donor.meta["affine_rms_mm"] < 8 and donor.meta["dice"] > 0.5
