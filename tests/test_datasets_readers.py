"""Readers against small fake trees built in the published layouts."""
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from regedu.datasets import FIRE, Learn2RegOASIS, NeuriteOASIS, load_vxm_labels, load_vxm_scan

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _fire_tree(root: Path, native=600):
    """FIRE layout: Images/<pair>_1.jpg, Ground Truth/control_points_<pair>_1_2.txt, Masks/."""
    (root / "Images").mkdir(parents=True)
    (root / "Ground Truth").mkdir()
    (root / "Masks").mkdir()
    # One bright spot per image, at the control point (x = column, y = row).
    ref, test = (150.0, 420.0), (171.0, 401.0)
    for k, (x, y) in ((1, ref), (2, test)):
        img = np.full((native, native, 3), 60, np.uint8)
        img[int(y) - 3:int(y) + 4, int(x) - 3:int(x) + 4, 1] = 255
        Image.fromarray(img).save(root / "Images" / f"S01_{k}.jpg", quality=95)
    lines = [f"{ref[0]} {ref[1]} {test[0]} {test[1]}"] + ["300 300 310 290"] * 9
    (root / "Ground Truth" / "control_points_S01_1_2.txt").write_text("\n".join(lines) + "\n")
    Image.open(root / "Images" / "S01_1.jpg").save(root / "Images" / "P07_1.jpg")  # no _2: skipped
    mask = np.zeros((native, native), np.uint8)
    mask[50:550, 50:550] = 255
    Image.fromarray(mask).save(root / "Masks" / "mask.png")
    return ref, test


def test_fire_control_point_lands_on_the_bright_pixel_after_resizing(tmp_path):
    ref, test = _fire_tree(tmp_path / "FIRE")
    fire = FIRE(tmp_path)  # one level above Images/ is accepted too
    assert fire.pairs == ["S01"] and fire.category("S01") == "S"
    item = fire.load("S01", size=128)
    assert item["fixed"].shape == (1, 128, 128) and item["fixed"].dtype == np.float32
    scale = 127 / 599
    assert np.allclose(item["fixed_points"][0], [ref[1] * scale, ref[0] * scale], atol=1e-4)
    for key, pts in (("fixed", item["fixed_points"]), ("moving", item["moving_points"])):
        peak = np.unravel_index(np.argmax(item[key][0]), (128, 128))
        assert np.abs(np.array(peak) - pts[0]).max() <= 1.0, (key, peak, pts[0])
    assert item["mask"].shape == (1, 128, 128) and item["mask"][0, 64, 64] and not item["mask"][0, 2, 2]
    native = fire.load("S01")
    assert native["fixed"].shape == (1, 600, 600) and np.allclose(native["fixed_points"][0], [420, 150])


def test_fire_missing_root_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="Images.*regedu fetch fire"):
        FIRE(tmp_path)


def _nifti(path: Path, arr):
    nib.save(nib.Nifti1Image(arr, np.eye(4)), str(path))


def _neurite_tree(root: Path, ndim: int):
    shape = (16, 20) if ndim == 2 else (16, 20, 24)
    names = ["OASIS_OAS1_0001_MR1", "OASIS_OAS1_0002_MR1", "OASIS_OAS1_0003_MR1"]
    rng = np.random.default_rng(0)
    for i, name in enumerate(names):
        (root / name).mkdir(parents=True)
        img = rng.uniform(0, 1, shape).astype(np.float32) * (i + 1)
        seg = rng.integers(0, 5, shape).astype(np.int32)
        if ndim == 2:  # the 2D slices are stored as (160, 192, 1) volumes
            img, seg = img[..., None], seg[..., None]
            _nifti(root / name / "slice_norm.nii.gz", img)
            _nifti(root / name / "slice_seg24.nii.gz", seg)
        else:
            _nifti(root / name / "aligned_norm.nii.gz", img)
            _nifti(root / name / "aligned_seg35.nii.gz", seg)
    (root / "subjects.txt").write_text("\n".join(names[:2]) + "\n")
    table = ("# comment\n0   Unknown                       0   0   0   0\n"
             "1   Left-Cerebral-White-Matter    245 245 245 0\n"
             "2   Left-Cerebral-Cortex          205 62  78  0\n"
             "3   Left-Thalamus-Proper          0   118 14  0\n"
             "4   Brain-Stem                    119 159 176 0\n")
    (root / ("seg24_labels.txt" if ndim == 2 else "seg35_labels.txt")).write_text(table)
    return shape


@pytest.mark.parametrize("ndim", [2, 3])
def test_neurite_oasis_reader(tmp_path, ndim):
    shape = _neurite_tree(tmp_path / "data", ndim)
    ds = NeuriteOASIS(tmp_path / "data", ndim=ndim)
    assert ds.subjects == ["OASIS_OAS1_0001_MR1", "OASIS_OAS1_0002_MR1"]  # subjects.txt order
    item = ds.load(1)
    assert item["image"].shape == (1, *shape) and item["seg"].shape == shape
    assert item["image"].dtype == np.float32 and 0 <= item["image"].min() and item["image"].max() == 1
    assert item["seg"].dtype == np.int64 and set(np.unique(item["seg"])) <= set(range(5))
    table = ds.labels
    assert table.set_index("label")["freesurfer"].to_dict() == {0: 0, 1: 2, 2: 3, 3: 10, 4: 16}


def test_neurite_missing_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="neurite-oasis-3d"):
        NeuriteOASIS(tmp_path, ndim=3)


def test_learn2reg_oasis_reader(tmp_path):
    root = tmp_path / "OASIS"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    shape = (8, 10, 12)
    for case in ("OASIS_0001_0000", "OASIS_0002_0000", "OASIS_0003_0000"):
        _nifti(root / "imagesTr" / f"{case}.nii.gz", np.full(shape, 7.0, np.float32))
        _nifti(root / "labelsTr" / f"{case}.nii.gz", np.ones(shape, np.uint8))
    meta = {"name": "OASIS", "training": [{"image": "./imagesTr/OASIS_0001_0000.nii.gz",
                                           "label": "./labelsTr/OASIS_0001_0000.nii.gz"}],
            "registration_val": [{"fixed": "./imagesTr/OASIS_0002_0000.nii.gz",
                                  "moving": "./imagesTr/OASIS_0003_0000.nii.gz"}]}
    (root / "OASIS_dataset.json").write_text(json.dumps(meta))
    ds = Learn2RegOASIS(tmp_path)
    assert ds.cases == ["OASIS_0001_0000", "OASIS_0002_0000", "OASIS_0003_0000"]
    assert ds.pairs("val") == [("OASIS_0002_0000", "OASIS_0003_0000")]
    item = ds.load("OASIS_0002_0000")
    assert item["image"].shape == (1, *shape) and item["seg"].dtype == np.int64
    with pytest.raises(ValueError, match="registration_test"):
        ds.pairs("test")


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data not present")
def test_vxm_scan_and_labels_from_shared():
    scan = load_vxm_scan(SHARED / "test_scan.npz")
    assert scan["image"].shape == (1, 160, 192, 224) and scan["seg"].shape == (160, 192, 224)
    labels = load_vxm_labels(SHARED / "labels.npz")
    assert len(labels) == 30 and labels[0] == 2 and labels[-1] == 63
    assert set(labels) <= set(np.unique(scan["seg"]))
    small = load_vxm_scan(SHARED / "test_scan.npz", shape=(80, 96, 112))
    assert small["image"].shape == (1, 80, 96, 112) and set(np.unique(small["seg"])) <= set(np.unique(scan["seg"]))


def test_vxm_scan_wrong_keys(tmp_path):
    np.savez(tmp_path / "x.npz", image=np.zeros(3))
    with pytest.raises(ValueError, match="'vol' and 'seg'"):
        load_vxm_scan(tmp_path / "x.npz")


def test_fire_and_subject_samplers_on_fake_trees(tmp_path):
    import torch

    from regedu.datasets import FIREPairs, SubjectPairs
    _fire_tree(tmp_path / "FIRE")
    item = FIREPairs(FIRE(tmp_path / "FIRE"), 64)[0]
    assert item["fixed"].shape == (1, 64, 64) and item["fixed_points"].shape == (10, 2)
    assert item["meta"]["category"] == "S" and item["fixed_mask"].dtype == torch.bool
    _neurite_tree(tmp_path / "oasis", 2)
    ds = NeuriteOASIS(tmp_path / "oasis", ndim=2)
    pairs = SubjectPairs(ds.load, ds.subjects)
    assert len(pairs) == 2 and pairs[1]["moving_seg"].shape == (1, 16, 20)
    assert pairs[1]["meta"]["moving"] == "OASIS_OAS1_0002_MR1"
