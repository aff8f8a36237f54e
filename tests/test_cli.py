"""Tests of the regedu command line: help, train, register, evaluate, errors."""
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from regedu import nets
from regedu.cli import main
from regedu.checkpoints import load_checkpoint, load_model, save_checkpoint, training_recipe

ROOT = Path(__file__).resolve().parents[1]


def blob_image(shape, seed):
    """A smooth random image (sum of Gaussian blobs) and a 2-label map from it."""
    g = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    img = np.zeros(shape, np.float32)
    for _ in range(5):
        centre = [g.uniform(3, n - 3) for n in shape]
        img += np.exp(-sum((x - c) ** 2 for x, c in zip(grids, centre)) / (2 * 3.0 ** 2))
    img = 200 * img / img.max()
    return img, ((img > 60).astype(np.int16) + (img > 120)).astype(np.int16)


@pytest.fixture
def folder2d(tmp_path):
    d = tmp_path / "pairs2d"
    d.mkdir()
    for i in range(3):
        img, seg = blob_image((32, 28), i)
        np.savez(d / f"img{i}.npz", vol=img, seg=seg)
    return d


@pytest.fixture
def checkpoint3d(tmp_path):
    torch.manual_seed(0)
    model = nets.create("unet", spatial_dims=3)
    path = tmp_path / "unet3d.pt"
    save_checkpoint(path, {"model": model.state_dict(), "config": model.config})
    return path


@pytest.fixture
def nifti_pair(tmp_path):
    affine = np.diag([2.0, 1.5, 3.0, 1.0])
    affine[:3, 3] = [-10, 20, 5]
    # The moving image has the same voxel size but another origin: outputs take the fixed one's.
    moving_affine = affine.copy()
    moving_affine[:3, 3] = [3, -4, 0]
    out = {}
    for name, seed in (("fixed", 0), ("moving", 1)):
        img, seg = blob_image((12, 14, 10), seed)
        nib.save(nib.Nifti1Image(img, affine if name == "fixed" else moving_affine),
                 tmp_path / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(seg, affine), tmp_path / f"{name}_seg.nii.gz")
        out[name] = tmp_path / f"{name}.nii.gz"
        out[name + "_seg"] = tmp_path / f"{name}_seg.nii.gz"
    out["affine"] = affine
    return out


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("command", ["doctor", "train", "register", "evaluate", "fetch"])
def test_every_subcommand_has_help(command, capsys):
    code, out, _ = run([command, "--help"], capsys)
    assert code == 0
    assert f"usage: regedu {command}" in out


def test_python_dash_m_regedu(tmp_path):
    # One process start (torch's import dominates): the status and the one-line error.
    bad = subprocess.run([sys.executable, "-m", "regedu", "register", "--model", tmp_path / "none.pt",
                          "--fixed", "f.nii.gz", "--moving", "m.nii.gz", "--warped", "w.nii.gz"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.strip() == "regedu: error: --fixed: no file 'f.nii.gz'"


def test_doctor_reports_versions_cuda_profile_cache_and_widgets(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("REGEDU_DATA", str(tmp_path / "cache"))
    monkeypatch.setenv("REGEDU_PROFILE", "ci")
    code, out, _ = run(["doctor", "--json"], capsys)
    assert code == 0
    report = json.loads(out)
    assert report["torch"] == torch.__version__.split("+")[0] or report["torch"].startswith(
        torch.__version__.split("+")[0])
    assert report["CUDA"].startswith("yes" if torch.cuda.is_available() else "no")
    assert report["profile"].startswith("ci (REGEDU_PROFILE=ci)")
    assert str(tmp_path / "cache") in report["data cache"]
    assert report["widgets"].startswith("yes")


def test_train_from_flags_then_evaluate(folder2d, tmp_path, capsys):
    ckpt = tmp_path / "out" / "model.pt"
    code, out, err = run(["train", "--data", folder2d, "--steps", 3, "--out", ckpt, "--no-progress",
                          "--losses", "mse=1,diffusion=0.1,dice=0.1", "--labels", "1,2",
                          "--lr", 1e-3], capsys)
    assert code == 0, err
    assert "done: 3 steps" in out
    state = load_checkpoint(ckpt)
    assert state["config"]["name"] == "unet" and state["config"]["spatial_dims"] == 2
    assert state["train_config"]["losses"] == {"mse": 1.0, "diffusion": 0.1, "dice": 0.1}
    assert state["step"] == 3

    csv = tmp_path / "table.csv"
    code, out, err = run(["evaluate", "--model", ckpt, "--pairs", folder2d, "--csv", csv], capsys)
    assert code == 0, err
    import pandas as pd
    table = pd.read_csv(csv)
    assert len(table) == 6  # every ordered pair of 3 images
    assert table["dice_mean"].between(0, 1).all() and (table["percent_folding"] >= 0).all()
    assert "mean Dice" in out


def test_train_on_the_offline_fundus_pairs(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("REGEDU_PROFILE", "ci")
    ckpt = tmp_path / "fundus.pt"
    code, out, err = run(["train", "--data", "fundus", "--steps", 2, "--out", ckpt, "--no-progress",
                          "--model-arg", "encoder=[8,8]", "--model-arg", "decoder=[8,8,8]"], capsys)
    assert code == 0, err
    assert "on 8 pairs of 128x128 from fundus" in out
    state = load_checkpoint(ckpt)
    assert state["config"]["encoder"] == [8, 8] and state["step"] == 2
    assert state["history"]["val"]["step"] == [1, 2]  # held-out pairs, every tenth of the run
    code, out, err = run(["train", "--data", "fundus", "--pairs", 3, "--steps", 1, "--out", ckpt,
                          "--force", "--no-progress", "--grad-clip", 1, "--model-arg", "encoder=[8,8]",
                          "--model-arg", "decoder=[8,8,8]"], capsys)
    assert code == 0, err
    assert "on 3 pairs of 128x128 from fundus" in out
    assert load_checkpoint(ckpt)["train_config"]["grad_clip"] == 1.0


class FakeSubjects(torch.utils.data.Dataset):
    """Stands in for RealisticPairs (whose pairs take ANTs to make): small 3D pairs, moving = fixed."""

    spacing, shape = 4.0, (12, 14, 16)

    def __init__(self, n, anatomy, seed):
        self.n = n

    def __len__(self):
        return self.n

    def labels_present(self):
        return {2, 3}

    def __getitem__(self, i):
        image = torch.rand(1, *self.shape, generator=torch.Generator().manual_seed(i))
        seg = (image > 0.5).long() + 2
        return {"moving": image, "fixed": image, "moving_seg": seg, "fixed_seg": seg}


def test_train_misaligns_the_subjects_for_an_affine_stage_and_records_it(tmp_path, capsys, monkeypatch):
    import regedu.datasets
    monkeypatch.setattr(regedu.datasets, "RealisticPairs", FakeSubjects)
    ckpt = tmp_path / "affine.pt"
    code, out, err = run(["train", "--data", "subjects", "--pairs", 3, "--misalign", "--model", "affine",
                          "--losses", "mse=1", "--labels", "2,3", "--steps", 2, "--out", ckpt, "--no-progress"],
                         capsys)
    assert code == 0, err
    assert "training affine (3D) on 3 pairs of 12x14x16 from subjects" in out
    state = load_checkpoint(ckpt)
    recipe = training_recipe(state)
    assert (recipe["data"], recipe["pairs"], recipe["misalign"], recipe["spacing"]) == ("subjects", 3, True, [4.0])
    # Misaligned, the moving image is no longer the fixed one: the loss starts above zero.
    assert state["history"]["train"]["loss"][0] > 1e-3


def test_train_from_a_toml_config_and_resume(folder2d, tmp_path, capsys):
    ckpt = tmp_path / "model.pt"
    config = tmp_path / "run.toml"
    config.write_text(f'data = "{folder2d}"\nsteps = 2\nout = "{ckpt}"\nprogress = false\n'
                      f'lr = 0.001\n[losses]\nncc = 1.0\ndiffusion = 0.5\n')
    code, _, err = run(["train", "--config", config], capsys)
    assert code == 0, err
    assert load_checkpoint(ckpt)["train_config"]["losses"] == {"ncc": 1.0, "diffusion": 0.5}
    # Flags override the file: two more steps from the checkpoint.
    code, out, err = run(["train", "--config", config, "--steps", 4, "--resume"], capsys)
    assert code == 0, err
    assert load_checkpoint(ckpt)["step"] == 4
    assert "done: 4 steps" in out


def test_register_round_trip_writes_nifti_with_the_fixed_affine(nifti_pair, checkpoint3d, tmp_path,
                                                                capsys):
    warped, disp, warped_seg = tmp_path / "w.nii.gz", tmp_path / "d.nii.gz", tmp_path / "ws.nii.gz"
    code, out, err = run(["register", "--model", checkpoint3d, "--fixed", nifti_pair["fixed"],
                          "--moving", nifti_pair["moving"], "--warped", warped, "--disp", disp,
                          "--moving-seg", nifti_pair["moving_seg"], "--warped-seg", warped_seg,
                          "--device", "cpu"], capsys)
    assert code == 0, err
    w, d, s = nib.load(warped), nib.load(disp), nib.load(warped_seg)
    for img in (w, d, s):
        np.testing.assert_allclose(img.affine, nifti_pair["affine"])
    assert w.shape == (12, 14, 10) and s.shape == (12, 14, 10)
    assert d.shape == (12, 14, 10, 1, 3) and d.header.get_intent()[0] == "vector"

    # The files hold what the model computes in Python, on images scaled to [0, 1].
    model = load_model(checkpoint3d)
    fixed = nib.load(nifti_pair["fixed"]).get_fdata().astype(np.float32)
    moving = nib.load(nifti_pair["moving"]).get_fdata().astype(np.float32)
    scale = lambda a: torch.from_numpy((a - a.min()) / (a.max() - a.min()))[None, None]
    with torch.no_grad():
        expected = model(scale(moving), scale(fixed)).disp[0]
    np.testing.assert_allclose(np.moveaxis(d.get_fdata()[..., 0, :], -1, 0), expected.numpy(), atol=1e-5)
    # Near identity at initialisation: the warped image is the moving one, in its own units.
    np.testing.assert_allclose(w.get_fdata(), moving, atol=0.05 * moving.max())
    assert set(np.unique(s.get_fdata())) <= {0, 1, 2}


def test_evaluate_one_labelled_pair(nifti_pair, checkpoint3d, capsys):
    code, out, err = run(["evaluate", "--model", checkpoint3d, "--fixed", nifti_pair["fixed"],
                          "--moving", nifti_pair["moving"], "--fixed-seg", nifti_pair["fixed_seg"],
                          "--moving-seg", nifti_pair["moving_seg"], "--labels", "1,2"], capsys)
    assert code == 0, err
    header, row = out.strip().splitlines()[:2]
    assert header.split() == ["pair", "dice_before", "dice_mean", "dice_std", "percent_folding",
                              "sdlogj", "seconds"]
    # Near identity at initialisation: Dice after is Dice before.
    values = row.split()
    assert values[:3] == ["moving.nii.gz", "->", "fixed.nii.gz"]
    assert abs(float(values[3]) - float(values[4])) < 0.05


def test_register_to_npz(folder2d, tmp_path, capsys):
    torch.manual_seed(0)
    model = nets.create("unet", spatial_dims=2)
    ckpt = save_checkpoint(tmp_path / "m.pt", {"model": model.state_dict(), "config": model.config})
    out = tmp_path / "w.npz"
    code, _, err = run(["register", "--model", ckpt, "--fixed", folder2d / "img0.npz", "--moving",
                        folder2d / "img1.npz", "--warped", out, "--disp", tmp_path / "d.npz"], capsys)
    assert code == 0, err
    assert np.load(out)["vol"].shape == (32, 28)
    assert np.load(tmp_path / "d.npz")["disp"].shape == (2, 32, 28)


def one_line_error(code, err, *fragments):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("regedu: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_missing_files_are_named(nifti_pair, checkpoint3d, tmp_path, capsys):
    base = ["register", "--fixed", nifti_pair["fixed"], "--moving", nifti_pair["moving"],
            "--warped", tmp_path / "w.nii.gz"]
    code, _, err = run(base + ["--model", tmp_path / "missing.pt"], capsys)
    one_line_error(code, err, "--model: no checkpoint file", "missing.pt", "regedu train")
    code, _, err = run(["register", "--model", checkpoint3d, "--fixed", tmp_path / "nope.nii.gz",
                        "--moving", nifti_pair["moving"], "--warped", tmp_path / "w.nii.gz"], capsys)
    one_line_error(code, err, "--fixed: no file", "nope.nii.gz")
    code, _, err = run(["train", "--data", tmp_path / "no_such_folder", "--steps", 1], capsys)
    one_line_error(code, err, "data: no folder", "no_such_folder")
    code, _, err = run(["train", "--config", tmp_path / "none.toml"], capsys)
    one_line_error(code, err, "--config: no file")


def test_mismatched_shapes_and_dimensions_are_explained(nifti_pair, checkpoint3d, folder2d, tmp_path,
                                                        capsys):
    small = tmp_path / "small.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((12, 14, 9), np.float32), np.eye(4)), small)
    code, _, err = run(["register", "--model", checkpoint3d, "--fixed", nifti_pair["fixed"],
                        "--moving", small, "--warped", tmp_path / "w.nii.gz"], capsys)
    one_line_error(code, err, "fixed and moving must have the same shape", "(12, 14, 10)", "(12, 14, 9)")

    model2d = nets.create("unet", spatial_dims=2)
    ckpt2d = save_checkpoint(tmp_path / "m2d.pt", {"model": model2d.state_dict(), "config": model2d.config})
    code, _, err = run(["register", "--model", ckpt2d, "--fixed", nifti_pair["fixed"],
                        "--moving", nifti_pair["moving"], "--warped", tmp_path / "w.nii.gz"], capsys)
    one_line_error(code, err, "the model is 2D", "3D image")

    four_d = tmp_path / "4d.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6, 2), np.float32), np.eye(4)), four_d)
    code, _, err = run(["register", "--model", checkpoint3d, "--fixed", four_d, "--moving", four_d,
                        "--warped", tmp_path / "w.nii.gz"], capsys)
    one_line_error(code, err, "expected a 2D or 3D image", "(4, 5, 6, 2)")


def test_bad_options_are_explained(folder2d, tmp_path, capsys):
    code, _, err = run(["register", "--fixed", "a.nii.gz"], capsys)
    one_line_error(code, err, "required", "--model", "regedu register --help")
    code, _, err = run(["train", "--data", folder2d, "--steps", 1, "--losses", "ncc=1,smooth=2",
                        "--no-progress", "--out", tmp_path / "m.pt"], capsys)
    one_line_error(code, err, "unknown term 'smooth'")
    code, _, err = run(["train", "--data", folder2d, "--losses", "ncc=lots"], capsys)
    one_line_error(code, err, "--losses", "'ncc=lots'")
    bad = tmp_path / "bad.json"
    bad.write_text('{"stpes": 3}')
    code, _, err = run(["train", "--config", bad], capsys)
    one_line_error(code, err, "unknown keys ['stpes']")
    code, _, err = run(["evaluate", "--model", tmp_path / "x.pt"], capsys)
    one_line_error(code, err, "--model: no checkpoint file")
    code, _, err = run(["train", "--data", folder2d, "--pairs", 5], capsys)
    one_line_error(code, err, "--pairs: only for the offline data")
    code, _, err = run(["train", "--data", "brain", "--pairs", 0], capsys)
    one_line_error(code, err, "--pairs: expected a positive number")
    code, _, err = run(["train", "--data", "fundus", "--misalign"], capsys)
    one_line_error(code, err, "--misalign: only for --data subjects (pre-aligned pairs it can misalign again), "
                              "got --data 'fundus'")
    code, _, err = run(["frobnicate"], capsys)
    one_line_error(code, err, "invalid choice: 'frobnicate'")
    code, _, err = run(["train", "--data", folder2d, "--device", "tpu:0"], capsys)
    one_line_error(code, err, "--device: expected cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        code, _, err = run(["train", "--data", folder2d, "--device", "cuda"], capsys)
        one_line_error(code, err, "CUDA is not available here")
