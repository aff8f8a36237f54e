"""The command line under bad input, interrupts and mistakes: nothing silently
wrong, no work lost, and one line that says what was expected and what came."""
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from regedu import _checks, cli, nets
from regedu.cli import main
from regedu.datasets import write_image
from regedu.checkpoints import load_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINTS = ROOT / "notebooks" / "checkpoints"


def blob(shape, seed):
    g = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    img = np.zeros(shape, np.float32)
    for _ in range(5):
        centre = [g.uniform(3, n - 3) for n in shape]
        img += np.exp(-sum((x - c) ** 2 for x, c in zip(grids, centre)) / (2 * 3.0 ** 2))
    img = 200 * img / img.max()
    return img, ((img > 60).astype(np.int16) + (img > 120)).astype(np.int16)


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code, err, *fragments):
    assert code == 2, err
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith("note:")]
    assert len(lines) == 1 and lines[0].startswith("regedu: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture
def folder2d(tmp_path):
    d = tmp_path / "pairs2d"
    d.mkdir()
    for i in range(3):
        img, seg = blob((32, 28), i)
        np.savez(d / f"img{i}.npz", vol=img, seg=seg)
    return d


def save_nifti(path, array, spacing=(1.0, 1.0, 1.0), **header):
    img = nib.Nifti1Image(array, np.diag([*spacing, 1.0]))
    for k, v in header.items():
        img.header[k] = v
    nib.save(img, str(path))
    return path


@pytest.fixture
def volumes(tmp_path):
    """Fixed and moving 3D images with labels, 1 mm, 32x32x32."""
    out = {}
    for name, seed in (("fixed", 0), ("moving", 1)):
        img, seg = blob((32, 32, 32), seed)
        out[name] = save_nifti(tmp_path / f"{name}.nii.gz", img)
        out[name + "_seg"] = save_nifti(tmp_path / f"{name}_seg.nii.gz", seg)
        out[name + "_array"] = img
    return out


def checkpoint(path, *, spatial_dims=3, spacing=None, shape=None, **train_config):
    torch.manual_seed(0)
    model = nets.create("unet", spatial_dims=spatial_dims, encoder=(4, 4), decoder=(4, 4, 4))
    state = {"model": model.state_dict(), "config": model.config}
    if spacing is not None or shape is not None or train_config:
        state["train_config"] = {"spacing": spacing, "shape": shape, **train_config}
    return save_checkpoint(path, state)


# ---------------------------------------------------------------- NaN, inf and empty images

@pytest.mark.parametrize("where", ["some", "all", "inf"])
def test_register_refuses_a_fixed_image_with_nan_or_inf(volumes, tmp_path, capsys, where):
    img = volumes["fixed_array"].copy()
    if where == "some":
        img[3:5, 3:5, 3:5] = np.nan
    elif where == "all":
        img[:] = np.nan
    else:
        img[0, 0, 0] = np.inf
    bad = save_nifti(tmp_path / "bad.nii.gz", img)
    ckpt = checkpoint(tmp_path / "m.pt")
    code, _, err = run(["register", "--model", ckpt, "--fixed", bad, "--moving", volumes["moving"],
                        "--warped", tmp_path / "w.nii.gz"], capsys)
    expected = {"some": "got 8 NaN and 0 infinite", "all": "got 32768 NaN",
                "inf": "got 0 NaN and 1 infinite"}[where]
    one_line_error(code, err, "--fixed '", "bad.nii.gz", "expected finite intensities", expected,
                   "nan_to_num")
    assert not (tmp_path / "w.nii.gz").exists()


def test_evaluate_refuses_nan_and_constant_images(volumes, tmp_path, capsys):
    ckpt = checkpoint(tmp_path / "m.pt")
    img = volumes["moving_array"].copy()
    img[5, 5, 5] = np.nan
    bad = save_nifti(tmp_path / "bad.nii.gz", img)
    code, _, err = run(["evaluate", "--model", ckpt, "--fixed", volumes["fixed"], "--moving", bad,
                        "--fixed-seg", volumes["fixed_seg"], "--moving-seg", volumes["moving_seg"]],
                       capsys)
    one_line_error(code, err, "--moving", "1 NaN")
    flat = save_nifti(tmp_path / "flat.nii.gz", np.zeros((32, 32, 32), np.float32))
    code, _, err = run(["register", "--model", ckpt, "--fixed", flat, "--moving", volumes["moving"],
                        "--warped", tmp_path / "w.nii.gz"], capsys)
    one_line_error(code, err, "--fixed", "every voxel is 0", "nothing to register")


def test_train_refuses_a_folder_with_a_partly_nan_image_before_training(folder2d, tmp_path, capsys):
    img, seg = blob((32, 28), 7)
    img[10:12, 10:12] = np.nan
    np.savez(folder2d / "img9.npz", vol=img, seg=seg)
    code, out, err = run(["train", "--data", folder2d, "--steps", 2, "--out", tmp_path / "m.pt",
                          "--no-progress"], capsys)
    one_line_error(code, err, "data", "img9.npz", "4 NaN")
    assert "training" not in out and not (tmp_path / "m.pt").exists()


# ---------------------------------------------------------------- labels

@pytest.mark.parametrize("kind, message", [
    ("fractional", "non-integer values"),
    ("nan", "got NaN or infinite values"),
    ("intensities", "does not look like a label map"),
    ("the image itself", "holds the same values as its image"),
])
def test_what_is_not_a_label_map_is_refused_everywhere(volumes, tmp_path, capsys, kind, message):
    seg = nib.load(volumes["moving_seg"]).get_fdata()
    if kind == "fractional":
        bad = seg + 0.3
    elif kind == "nan":
        bad = seg.copy()
        bad[0, 0, 0] = np.nan
    elif kind == "intensities":
        bad = np.rint(volumes["moving_array"]).astype(np.int16)  # 200 integer levels
    else:
        bad = volumes["moving_array"]
    path = save_nifti(tmp_path / "bad_seg.nii.gz", np.asarray(bad, np.float32 if kind != "intensities" else np.int16))
    ckpt = checkpoint(tmp_path / "m.pt")
    code, _, err = run(["evaluate", "--model", ckpt, "--fixed", volumes["fixed"], "--moving",
                        volumes["moving"], "--fixed-seg", volumes["fixed_seg"], "--moving-seg", path],
                       capsys)
    one_line_error(code, err, "--moving-seg", message)
    code, _, err = run(["register", "--model", ckpt, "--fixed", volumes["fixed"], "--moving",
                        volumes["moving"], "--warped", tmp_path / "w.nii.gz", "--moving-seg", path,
                        "--warped-seg", tmp_path / "ws.nii.gz"], capsys)
    one_line_error(code, err, "--moving-seg", message)
    assert not (tmp_path / "w.nii.gz").exists()


def test_train_refuses_fractional_labels_instead_of_truncating_them(folder2d, tmp_path, capsys):
    img, seg = blob((32, 28), 5)
    np.savez(folder2d / "img1.npz", vol=img, seg=seg + 0.5)
    code, _, err = run(["train", "--data", folder2d, "--steps", 1, "--out", tmp_path / "m.pt",
                        "--no-progress"], capsys)
    one_line_error(code, err, "img1.npz", "expected a label map of whole numbers")


def test_labels_absent_from_every_map_are_refused_and_partly_absent_ones_named(volumes, tmp_path,
                                                                              capsys):
    ckpt = checkpoint(tmp_path / "m.pt")
    base = ["evaluate", "--model", ckpt, "--fixed", volumes["fixed"], "--moving", volumes["moving"],
            "--fixed-seg", volumes["fixed_seg"], "--moving-seg", volumes["moving_seg"]]
    code, _, err = run(base + ["--labels", "999,1000"], capsys)
    one_line_error(code, err, "--labels: none of 999, 1000 is in the label maps", "they hold 1, 2")
    code, out, err = run(base + ["--labels", "1,999"], capsys)
    assert code == 0, err
    assert "labels 999 are in no label map" in err
    for bad, message in (("1.5", "expected integers"), ("1,1", "each once"), ("0", "other than background")):
        code, _, err = run(base + ["--labels", bad], capsys)
        one_line_error(code, err, "--labels", message)


def test_train_with_a_dice_term_needs_labels_and_present_ones(tmp_path, capsys):
    d = tmp_path / "nolabels"
    d.mkdir()
    for i in range(2):
        np.save(d / f"img{i}.npy", blob((32, 28), i)[0])
    code, _, err = run(["train", "--data", d, "--steps", 1, "--losses", "ncc=1,dice=1",
                        "--out", tmp_path / "m.pt"], capsys)
    one_line_error(code, err, "--losses: the dice term needs label maps")


# ---------------------------------------------------------------- checkpoints: nothing lost

def test_train_refuses_to_replace_a_checkpoint_without_resume_or_force(folder2d, tmp_path, capsys):
    ckpt = tmp_path / "m.pt"
    base = ["train", "--data", folder2d, "--steps", 2, "--out", ckpt, "--no-progress"]
    assert run(base, capsys)[0] == 0
    before = ckpt.read_bytes()
    code, out, err = run(base, capsys)
    one_line_error(code, err, "--out:", "already exists (a unet checkpoint at step 2)", "--resume",
                   "--force")
    assert ckpt.read_bytes() == before and "training" not in out
    code, _, err = run(base + ["--resume", "--force"], capsys)
    one_line_error(code, err, "--resume and --force contradict")
    code, out, err = run(base + ["--force", "--steps", 1], capsys)
    assert code == 0, err
    assert load_checkpoint(ckpt)["step"] == 1


@pytest.mark.parametrize("where", ["folder", "parent is a file"])
def test_an_unusable_out_fails_before_training(folder2d, tmp_path, capsys, where):
    if where == "folder":
        out, message = tmp_path, "is a folder"
    else:
        (tmp_path / "f").write_text("x")
        out, message = tmp_path / "f" / "m.pt", "is a file, not a folder"
    code, stdout, err = run(["train", "--data", folder2d, "--steps", 2, "--out", out], capsys)
    one_line_error(code, err, "--out:", message)
    assert "training" not in stdout


def test_resume_takes_unset_options_from_the_checkpoint_and_applies_a_new_lr(folder2d, tmp_path,
                                                                             capsys):
    ckpt = tmp_path / "m.pt"
    assert run(["train", "--data", folder2d, "--steps", 2, "--out", ckpt, "--no-progress", "--lr",
                "1e-3", "--losses", "mse=1,diffusion=0.5"], capsys)[0] == 0
    # Neither the data nor the losses nor the lr again: all come from the checkpoint.
    code, out, err = run(["train", "--out", ckpt, "--resume", "--steps", 3, "--no-progress"], capsys)
    assert code == 0, err
    assert "resuming from step 2 of 3" in out
    state = load_checkpoint(ckpt)
    assert state["train_config"]["lr"] == 1e-3 and state["train_config"]["changes"] == []
    assert state["train_config"]["losses"] == {"mse": 1.0, "diffusion": 0.5}
    code, out, err = run(["train", "--out", ckpt, "--resume", "--steps", 4, "--no-progress",
                          "--lr", "1e-4"], capsys)
    assert code == 0, err
    assert "lr 0.001 -> 0.0001 from here on" in out
    state = load_checkpoint(ckpt)
    assert state["optimizer"]["param_groups"][0]["lr"] == 1e-4
    assert state["train_config"]["changes"] == [{"step": 3, "lr": [1e-3, 1e-4]}]


@pytest.mark.parametrize("flags, message", [
    (["--losses", "ncc=1,diffusion=1"], "other settings (losses:"),
    (["--model", "vnet"], "another model than this run builds (name: 'unet' in the checkpoint, "
                          "'vnet' here"),
])
def test_resume_refuses_another_objective_or_model_in_one_line(folder2d, tmp_path, capsys, flags,
                                                               message):
    ckpt = tmp_path / "m.pt"
    assert run(["train", "--data", folder2d, "--steps", 1, "--out", ckpt, "--no-progress",
                "--losses", "mse=1"], capsys)[0] == 0
    code, _, err = run(["train", "--out", ckpt, "--resume", "--steps", 2, "--no-progress"] + flags,
                       capsys)
    one_line_error(code, err, message)
    assert load_checkpoint(ckpt)["step"] == 1


def test_the_shipped_weights_only_checkpoint_says_how_to_continue(tmp_path, capsys):
    ckpt = tmp_path / "brain_vvnet_4mm.pt"
    ckpt.write_bytes((CHECKPOINTS / "brain_vvnet_4mm.pt").read_bytes())
    code, out, err = run(["train", "--data", "brain", "--out", ckpt, "--resume"], capsys)
    one_line_error(code, err, "holds weights only (no 'optimizer', 'rng', 'rng_epoch_start')",
                   f"--init-from {ckpt}", "re-run the command")
    assert "training" not in out


def test_init_from_starts_a_new_run_from_a_weights_only_checkpoint(folder2d, tmp_path, capsys):
    source = tmp_path / "weights.pt"
    model = nets.create("unet", spatial_dims=2, encoder=(4, 4), decoder=(4, 4, 4))
    save_checkpoint(source, {"model": model.state_dict(), "config": model.config})
    out = tmp_path / "new.pt"
    code, stdout, err = run(["train", "--data", folder2d, "--steps", 1, "--out", out, "--no-progress",
                             "--init-from", source], capsys)
    assert code == 0, err
    state = load_checkpoint(out)
    assert state["config"] == model.config and state["step"] == 1
    assert state["metadata"]["cli"]["init_from"] == str(source)
    code, _, err = run(["train", "--data", folder2d, "--steps", 1, "--out", tmp_path / "b.pt",
                        "--init-from", source, "--model", "vnet"], capsys)
    one_line_error(code, err, "--init-from builds the model its checkpoint holds")


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_during_training_saves_the_checkpoint(folder2d, tmp_path, sig, code):
    ckpt = tmp_path / "m.pt"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "regedu", "train", "--data", str(folder2d),
                             "--steps", "100000", "--out", str(ckpt)],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            # A terminal's SIGINT, even when this run's parent ignores it (a job
                            # started in the background inherits SIG_IGN, and Python keeps it).
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        # Wait for the progress bar to pass step 2: training has started, and the first
        # periodic save (a tenth of 100000 steps) is far away.
        seen, deadline = b"", time.monotonic() + 120
        while not re.search(rb"\b([2-9]|\d\d+)/100000", seen) and time.monotonic() < deadline:
            if select.select([proc.stderr], [], [], 1)[0]:
                seen += os.read(proc.stderr.fileno(), 4096)
        assert not ckpt.exists(), seen
        proc.send_signal(sig)
        _, rest = proc.communicate(timeout=120)
        err = (seen + rest).decode()
    finally:
        proc.kill()
    assert proc.returncode == code, err
    step = load_checkpoint(ckpt)["step"]
    assert step >= 1
    assert f"interrupted after step {step}; saved {ckpt}" in err and "--resume" in err
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("name, step", [("brain_unet_4mm", 2000), ("fundus_unet_256", 10000)])
def test_the_shipped_checkpoints_with_optimiser_state_resume(tmp_path, capsys, monkeypatch, name,
                                                             step):
    # README: the command beside each, with --resume and one more step, continues it.
    command = (CHECKPOINTS / f"{name}.txt").read_text().splitlines()[0].split()
    monkeypatch.setenv("REGEDU_PROFILE", command[0].split("=")[1])
    ckpt = tmp_path / f"{name}.pt"
    ckpt.write_bytes((CHECKPOINTS / f"{name}.pt").read_bytes())
    argv = command[command.index("regedu") + 1:]
    argv[argv.index("--out") + 1] = str(ckpt)
    argv[argv.index("--steps") + 1] = str(step + 1)
    argv[argv.index("--val-every") + 1] = "100000"  # one validation at the end, not the point here
    code, out, err = run(argv + ["--no-progress"], capsys)
    assert code == 0, err
    assert f"resuming from step {step} of {step + 1}" in out
    state = load_checkpoint(ckpt)
    assert state["step"] == step + 1 and len(state["history"]["train"]["loss"]) == step + 1


# ---------------------------------------------------------------- resolution

def test_a_4mm_checkpoint_runs_on_1mm_images_with_factor_4_and_says_so(volumes, tmp_path, capsys):
    ckpt = checkpoint(tmp_path / "m.pt", spacing=[4.0, 4.0, 4.0], shape=[8, 8, 8])
    code, out, err = run(["register", "--model", ckpt, "--fixed", volumes["fixed"], "--moving",
                          volumes["moving"], "--warped", tmp_path / "w.nii.gz", "--disp",
                          tmp_path / "d.nii.gz"], capsys)
    assert code == 0, err
    assert err.count("\n") == 1 and "trained at 4 mm voxels and the images have 1 mm: running it " \
                                      "on their grid coarsened 4 times" in err
    assert nib.load(tmp_path / "d.nii.gz").shape == (32, 32, 32, 1, 3)
    # The field is the one of the model run on the 4x coarser grid.
    from regedu.checkpoints import load_model
    model = nets.Rescaled(load_model(ckpt), 4)
    scale = lambda a: torch.from_numpy((a - a.min()) / (a.max() - a.min()))[None, None]
    with torch.no_grad():
        expected = model(scale(volumes["moving_array"]), scale(volumes["fixed_array"])).disp[0]
    got = np.moveaxis(nib.load(tmp_path / "d.nii.gz").get_fdata()[..., 0, :], -1, 0)
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-5)
    # --factor overrides, with a note when it disagrees with the spacing.
    code, _, err = run(["register", "--model", ckpt, "--fixed", volumes["fixed"], "--moving",
                        volumes["moving"], "--warped", tmp_path / "w.nii.gz", "--factor", 2], capsys)
    assert code == 0 and "--factor 2 although" in err and "suggests 4" in err


def test_a_non_integer_spacing_ratio_is_refused(volumes, tmp_path, capsys):
    ckpt = checkpoint(tmp_path / "m.pt", spacing=[4.0, 4.0, 4.0])
    fixed = save_nifti(tmp_path / "f15.nii.gz", volumes["fixed_array"], spacing=(1.5, 1.5, 1.5))
    moving = save_nifti(tmp_path / "m15.nii.gz", volumes["moving_array"], spacing=(1.5, 1.5, 1.5))
    code, _, err = run(["register", "--model", ckpt, "--fixed", fixed, "--moving", moving,
                        "--warped", tmp_path / "w.nii.gz"], capsys)
    one_line_error(code, err, "trained at 4 mm voxels and the images have 1.5 mm", "not one whole",
                   "--factor N")
    code, _, err = run(["register", "--model", ckpt, "--fixed", fixed, "--moving", moving,
                        "--warped", tmp_path / "w.nii.gz", "--factor", 3], capsys)  # 32 % 3 != 0
    one_line_error(code, err, "--factor 3: every image size must be a multiple of 3")
    code, _, err = run(["register", "--model", ckpt, "--fixed", fixed, "--moving", moving,
                        "--warped", tmp_path / "w.nii.gz", "--factor", 2], capsys)
    assert code == 0, err


def test_an_old_checkpoint_without_its_spacing_is_noted_once(volumes, tmp_path, capsys):
    ckpt = checkpoint(tmp_path / "old.pt")
    code, _, err = run(["evaluate", "--model", ckpt, "--fixed", volumes["fixed"], "--moving",
                        volumes["moving"], "--fixed-seg", volumes["fixed_seg"], "--moving-seg",
                        volumes["moving_seg"]], capsys)
    assert code == 0, err
    assert err.count("does not record the voxel size it was trained at") == 1
    assert "--factor" in err


def test_fixed_and_moving_of_different_voxel_sizes_are_refused(volumes, tmp_path, capsys):
    ckpt = checkpoint(tmp_path / "m.pt")
    moving = save_nifti(tmp_path / "m2.nii.gz", volumes["moving_array"], spacing=(2.0, 2.0, 2.0))
    code, _, err = run(["register", "--model", ckpt, "--fixed", volumes["fixed"], "--moving", moving,
                        "--warped", tmp_path / "w.nii.gz"], capsys)
    one_line_error(code, err, "different voxel sizes (1 mm and 2 mm)")


def test_training_records_the_spacing_of_its_images(tmp_path, capsys):
    d = tmp_path / "vols"
    d.mkdir()
    for i in range(2):
        img, seg = blob((16, 16, 16), i)
        save_nifti(d / f"s{i}.nii.gz", img, spacing=(2.0, 2.0, 2.0))
    ckpt = tmp_path / "m.pt"
    code, _, err = run(["train", "--data", d, "--steps", 1, "--out", ckpt, "--no-progress",
                        "--model-arg", "encoder=[4,4]", "--model-arg", "decoder=[4,4,4]"], capsys)
    assert code == 0, err
    state = load_checkpoint(ckpt)
    assert state["train_config"]["spacing"] == [2.0, 2.0, 2.0]
    assert state["train_config"]["shape"] == [16, 16, 16]
    save_nifti(d / "s2.nii.gz", blob((16, 16, 16), 2)[0], spacing=(1.0, 1.0, 1.0))
    code, _, err = run(["train", "--data", d, "--steps", 1, "--out", tmp_path / "n.pt"], capsys)
    one_line_error(code, err, "all images must have the same voxel size")


@pytest.mark.parametrize("profile, spacing", [("ci", 4.0), ("cpu", 2.0), ("gpu", 1.0)])
def test_the_offline_brain_records_the_profile_spacing(monkeypatch, profile, spacing):
    from regedu.datasets import OfflinePairs, brain
    monkeypatch.setenv("REGEDU_PROFILE", profile)
    monkeypatch.setattr(brain, "mni_brain", lambda: None)  # the grid is the profile's
    assert OfflinePairs("brain", 2).spacing == (spacing,) * 3
    assert OfflinePairs("fundus", 2).spacing is None


# ---------------------------------------------------------------- outputs

def test_outputs_keep_the_fixed_header(tmp_path, capsys, volumes):
    fixed = nib.Nifti1Image(volumes["fixed_array"], np.diag([1.0, 1.0, 1.0, 1.0]))
    fixed.set_qform(fixed.affine, code=1)
    fixed.set_sform(fixed.affine, code=4)
    fixed.header.set_xyzt_units("mm", "sec")
    fixed.header["descrip"] = b"subject 7, T1"
    nib.save(fixed, tmp_path / "fx.nii.gz")
    ckpt = checkpoint(tmp_path / "m.pt")
    outs = [tmp_path / "w.nii.gz", tmp_path / "d.nii.gz", tmp_path / "ws.nii.gz"]
    code, _, err = run(["register", "--model", ckpt, "--fixed", tmp_path / "fx.nii.gz", "--moving",
                        volumes["moving"], "--warped", outs[0], "--disp", outs[1], "--moving-seg",
                        volumes["moving_seg"], "--warped-seg", outs[2]], capsys)
    assert code == 0, err
    for path in outs:
        h = nib.load(path).header
        assert int(h["qform_code"]) == 1 and int(h["sform_code"]) == 4, path
        assert h.get_xyzt_units() == ("mm", "sec")
        assert h["descrip"].tobytes().rstrip(b"\0") == b"subject 7, T1"
    assert nib.load(outs[0]).get_data_dtype() == np.float32
    assert nib.load(outs[2]).get_data_dtype() == np.int32


@pytest.mark.parametrize("flag", ["--warped", "--disp"])
def test_an_output_never_overwrites_an_input(volumes, tmp_path, capsys, flag):
    ckpt = checkpoint(tmp_path / "m.pt")
    before = volumes["moving"].read_bytes()
    argv = ["register", "--model", ckpt, "--fixed", volumes["fixed"], "--moving", volumes["moving"]]
    if flag == "--warped":
        argv += ["--warped", volumes["moving"]]
    else:
        argv += ["--warped", tmp_path / "w.nii.gz", "--disp", volumes["fixed"]]
    code, _, err = run(argv, capsys)
    one_line_error(code, err, flag, "is also an input")
    assert volumes["moving"].read_bytes() == before


def test_outputs_that_are_folders_or_the_same_file_fail_before_registering(volumes, tmp_path, capsys):
    ckpt = checkpoint(tmp_path / "m.pt")
    base = ["register", "--model", ckpt, "--fixed", volumes["fixed"], "--moving", volumes["moving"]]
    (tmp_path / "dir.nii.gz").mkdir()
    code, _, err = run(base + ["--warped", tmp_path / "dir.nii.gz"], capsys)
    one_line_error(code, err, "--warped", "is a folder")
    code, _, err = run(base + ["--warped", tmp_path / "a.nii.gz", "--disp", tmp_path / "a.nii.gz"],
                       capsys)
    one_line_error(code, err, "--disp", "is also --warped")
    code, _, err = run(["evaluate", "--model", ckpt, "--fixed", volumes["fixed"], "--moving",
                        volumes["moving"], "--csv", tmp_path], capsys)
    one_line_error(code, err, "--csv")


def test_an_interrupted_write_leaves_no_half_file(tmp_path, monkeypatch):
    target = tmp_path / "w.nii.gz"
    target.write_bytes(b"previous result")

    def crash(img, filename):
        Path(filename).write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(nib, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        write_image(target, np.zeros((4, 4, 4), np.float32), np.eye(4))
    assert target.read_bytes() == b"previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.nii.gz"]


# ---------------------------------------------------------------- memory

def test_a_header_claiming_4000_cubed_voxels_is_refused_before_reading(tmp_path, capsys, volumes):
    header = nib.Nifti1Header()
    header.set_data_shape((4000, 4000, 4000))
    header.set_data_dtype(np.int16)
    path = tmp_path / "huge.nii"
    with open(path, "wb") as f:
        f.write(header.binaryblock + b"\0" * 4 + b"\0" * 100)
    ckpt = checkpoint(tmp_path / "m.pt")
    code, _, err = run(["register", "--model", ckpt, "--fixed", path, "--moving", volumes["moving"],
                        "--warped", tmp_path / "w.nii.gz"], capsys)
    one_line_error(code, err, "--fixed: reading", "huge.nii", "4000x4000x4000 voxels", "needs about",
                   "GiB of memory, more than the", "available", "header may be wrong")


def test_a_billion_pairs_are_refused_with_the_estimate(tmp_path, capsys, monkeypatch):
    # torch would shuffle them as a Python list of 10^9 ints (~45 GiB), here with 24 GiB free.
    monkeypatch.setattr(_checks, "available_memory", lambda: 24 * 2**30)
    code, _, err = run(["train", "--data", "fundus", "--pairs", 10 ** 9, "--steps", 1,
                        "--out", tmp_path / "m.pt"], capsys)
    one_line_error(code, err, "--pairs 1000000000: shuffling 1,000,000,000 pairs needs about 44.7 GiB",
                   "more than the 24.0 GiB available", "ask for fewer pairs")


def test_a_model_run_too_large_for_the_memory_is_refused_before_it_starts(volumes, tmp_path, capsys,
                                                                         monkeypatch):
    big = blob((128, 128, 72), 3)[0]  # 1.2 M voxels: the estimate is measured
    fixed = save_nifti(tmp_path / "bf.nii.gz", big)
    moving = save_nifti(tmp_path / "bm.nii.gz", np.roll(big, 2, 0))
    ckpt = checkpoint(tmp_path / "m.pt")
    monkeypatch.setattr(cli, "check_memory", lambda needed, what, fix: _checks.check_memory(
        needed, what, fix, available=2 * 2**20 if what.startswith("register:") else None))
    code, _, err = run(["register", "--model", ckpt, "--fixed", fixed, "--moving", moving,
                        "--warped", tmp_path / "w.nii.gz"], capsys)
    one_line_error(code, err, "register: running the model on 128x128x72 voxels needs about",
                   "more than the 2.0 MiB available", "--factor 2")


def test_running_out_of_memory_anyway_is_one_line(volumes, tmp_path, capsys, monkeypatch):
    ckpt = checkpoint(tmp_path / "m.pt")

    def no_memory(self, moving, fixed):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate "
                           "memory: you tried to allocate 8589934592 bytes.")

    monkeypatch.setattr(type(nets.create("unet", spatial_dims=3)), "forward", no_memory)
    code, _, err = run(["register", "--model", ckpt, "--fixed", volumes["fixed"], "--moving",
                        volumes["moving"], "--warped", tmp_path / "w.nii.gz"], capsys)
    one_line_error(code, err, "ran out of memory running the model on 32x32x32 voxels", "--factor 2")


# ---------------------------------------------------------------- progress

def test_evaluate_pairs_shows_progress_on_a_terminal(folder2d, tmp_path, capsys, monkeypatch):
    ckpt = checkpoint(tmp_path / "m.pt", spatial_dims=2)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    code, _, err = run(["evaluate", "--model", ckpt, "--pairs", folder2d], capsys)
    assert code == 0, err
    assert "evaluate unet" in err and "6/6" in err


def test_a_full_disk_while_writing_is_one_line(volumes, tmp_path, capsys, monkeypatch):
    ckpt = checkpoint(tmp_path / "m.pt")

    def full(img, filename):
        Path(filename).write_bytes(b"par")
        raise OSError(28, "No space left on device", str(filename))

    monkeypatch.setattr(nib, "save", full)
    code, _, err = run(["register", "--model", ckpt, "--fixed", volumes["fixed"], "--moving",
                        volumes["moving"], "--warped", tmp_path / "w.nii.gz"], capsys)
    one_line_error(code, err, "No space left on device", "nothing was left half-written")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith((".w", "w"))) == []


def test_evaluate_without_labels_says_there_is_no_dice(volumes, tmp_path, capsys):
    ckpt = checkpoint(tmp_path / "m.pt", spacing=[1.0, 1.0, 1.0])
    code, out, err = run(["evaluate", "--model", ckpt, "--fixed", volumes["fixed"], "--moving",
                          volumes["moving"]], capsys)
    assert code == 0, err
    assert "no label maps" in err and "dice" not in out


def test_training_too_large_for_the_memory_is_refused_before_it_starts(tmp_path, capsys, monkeypatch):
    d = tmp_path / "big"
    d.mkdir()
    for i in range(2):
        np.save(d / f"v{i}.npy", blob((128, 128, 72), i)[0])  # 1.2 M voxels: the estimate is measured
    monkeypatch.setattr(cli, "check_memory", lambda needed, what, fix: _checks.check_memory(
        needed, what, fix, available=2 * 2**20 if what.startswith("training on") else None))
    code, out, err = run(["train", "--data", d, "--steps", 1, "--out", tmp_path / "m.pt",
                          "--model-arg", "encoder=[4,4]", "--model-arg", "decoder=[4,4,4]"], capsys)
    one_line_error(code, err, "training on 1 x 128x128x72 voxels needs about",
                   "more than the 2.0 MiB available", "--model rescaled")
    assert "training unet" not in out and not (tmp_path / "m.pt").exists()
