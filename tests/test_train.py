"""Tests of regedu.train: learning, exact resume, checkpoints, loss terms."""
import time

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset

from regedu import checkpoints, losses, nets, train
from regedu.nets import RegistrationOutput
from regedu.spatial import warp


class TinyNet(nn.Module):
    """Two convolutions and a flow head; the head's bias alone can learn a translation.

    ``deep=True`` adds a second head whose field is only seen by deep supervision;
    ``dropout`` makes the forward pass consume the torch RNG (for the resume test).
    """

    def __init__(self, deep=False, dropout=0.0):
        super().__init__()
        self.config = {"name": "tiny", "deep": deep, "dropout": dropout}
        self.body = nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.LeakyReLU(0.2),
                                  nn.Dropout(dropout))
        self.flow = nn.Conv2d(8, 2, 3, padding=1)
        self.deep_flow = nn.Conv2d(8, 2, 3, padding=1) if deep else None
        for head in (self.flow, self.deep_flow):
            if head is not None:
                nn.init.normal_(head.weight, std=1e-5)
                nn.init.zeros_(head.bias)

    def forward(self, moving, fixed):
        h = self.body(torch.cat([moving, fixed], 1))
        disp = self.flow(h)
        deep = [self.deep_flow(h)] if self.deep_flow is not None else []
        return RegistrationOutput(warp(moving, disp), disp, [], deep, None)


def blobs(shape=(32, 32), seed=0):
    """A smooth random image in [0, 1]: a sum of Gaussian blobs."""
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[:shape[0], :shape[1]].astype(np.float32)
    img = np.zeros(shape, np.float32)
    for _ in range(6):
        cy, cx = g.uniform(6, shape[0] - 6), g.uniform(6, shape[1] - 6)
        img += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * g.uniform(2, 4) ** 2))
    return torch.from_numpy(img / img.max())[None]


class ShiftPairs(Dataset):
    """Pairs (moving, fixed) where fixed(x) = moving(x + shift); labels by thresholding.

    ``noise`` adds NumPy-drawn noise in __getitem__, so the data consume the NumPy RNG.
    """

    def __init__(self, n=1, shift=(2.0, -1.0), noise=0.0):
        self.images = [blobs(seed=i) for i in range(n)]
        self.shift, self.noise = shift, noise

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        moving = self.images[i]
        u = torch.tensor(self.shift).view(1, 2, 1, 1).expand(1, 2, *moving.shape[1:])
        fixed = warp(moving[None], u, padding="border")[0]
        if self.noise:
            moving = moving + torch.from_numpy(np.random.normal(0, self.noise, moving.shape)
                                               .astype(np.float32))
        seg = lambda x: (x > 0.3).long() + (x > 0.6).long()
        return {"moving": moving, "fixed": fixed, "moving_seg": seg(moving), "fixed_seg": seg(fixed)}


def test_fit_is_a_loop_of_train_step():
    # The algorithm has one home: fit's history and weights are those of a plain
    # loop of train_step over the same shuffled batches, to the bit.
    objective = {"ncc": 1.0, "diffusion": 0.5, "dice": 0.2}
    data = ShiftPairs(n=3, noise=0.05)
    torch.manual_seed(0)
    fitted = TinyNet(deep=True, dropout=0.3)
    history = train.fit(fitted, data, losses=objective, steps=5, lr=1e-3, batch_size=2, seed=7,
                        grad_clip=1.0, progress=False, device="cpu")
    torch.manual_seed(0)
    looped = TinyNet(deep=True, dropout=0.3).train()
    optimizer = torch.optim.Adam(looped.parameters(), lr=1e-3)
    train.seed_everything(7)
    loader = torch.utils.data.DataLoader(data, batch_size=2, shuffle=True)
    losses_by_step = []
    while len(losses_by_step) < 5:
        for batch in loader:
            values = train.train_step(looped, batch, optimizer, losses=objective, grad_clip=1.0)
            losses_by_step.append(float(values["loss"]))
            if len(losses_by_step) == 5:
                break
    assert history["train"]["loss"] == losses_by_step
    assert all(torch.equal(a, b) for a, b in zip(fitted.state_dict().values(), looped.state_dict().values()))


def test_a_supervised_field_term_learns_the_true_displacement():
    # Notebook 05's RegNet-style training: the label is the field itself.
    class KnownFields(ShiftPairs):
        def __getitem__(self, i):
            item = super().__getitem__(i)
            item["disp"] = torch.tensor(self.shift).view(2, 1, 1).expand(2, *item["moving"].shape[1:])
            return item

    model = TinyNet()
    history = train.fit(model, KnownFields(), losses={"field": 1.0}, steps=30, lr=1e-2, progress=False,
                        device="cpu")
    loss = history["train"]["field"]
    assert loss[-1] < 0.1 * loss[0]
    with pytest.raises(ValueError, match=r"losses\['field'\]: the batch holds no true displacement"):
        train.fit(TinyNet(), ShiftPairs(), losses={"field": 1.0}, steps=1, progress=False, device="cpu")


def test_a_regedu_unet_learns_a_known_translation(tmp_path):
    torch.manual_seed(0)
    model = nets.create("unet", spatial_dims=2, encoder=(8, 16), decoder=(16, 8, 8))
    ckpt = tmp_path / "unet.pt"
    history = train.fit(model, ShiftPairs(), losses={"mse": 1.0, "diffusion": 0.01}, steps=40,
                        lr=1e-2, checkpoint=ckpt, progress=False, device="cpu")
    loss = history["train"]["loss"]
    assert len(loss) == 40 and history["train"]["step"][-1] == 40
    assert loss[-1] < 0.5 * loss[0], f"loss fell only from {loss[0]:.4g} to {loss[-1]:.4g}"
    item = ShiftPairs()[0]
    moving, fixed = item["moving"][None], item["fixed"][None]
    with torch.no_grad():
        disp = model(moving, fixed).disp
    # fixed(x) = moving(x + shift) and warped(x) = moving(x + u(x)): u must be the shift.
    mean = disp[0, :, 8:-8, 8:-8].mean(dim=(1, 2))
    assert torch.allclose(mean, torch.tensor([2.0, -1.0]), atol=0.3), mean
    # The checkpoint rebuilds the same network from its config.
    rebuilt = checkpoints.load_model(ckpt)
    with torch.no_grad():
        assert torch.equal(rebuilt(moving, fixed).disp, model.eval()(moving, fixed).disp)
        # ... and so does a checkpoint already read (the file read once for its metadata and model).
        assert torch.equal(checkpoints.load_model(checkpoints.load_checkpoint(ckpt))(moving, fixed).disp,
                           rebuilt(moving, fixed).disp)
    # factor=2: the same network on the pair at twice the resolution finds twice the shift.
    fine = [F.interpolate(x, scale_factor=2, mode="nearest") for x in (moving, fixed)]
    with torch.no_grad():
        disp2 = checkpoints.load_model(ckpt, factor=2)(*fine).disp
    mean2 = disp2[0, :, 16:-16, 16:-16].mean(dim=(1, 2))
    assert torch.allclose(mean2, torch.tensor([4.0, -2.0]), atol=0.6), mean2
    ckpt.with_suffix(".txt").write_text("regedu train --steps 40\n")
    note = checkpoints.checkpoint_note(ckpt)
    assert "LOADED" in note and "step 40" in note and "regedu train --steps 40" in note, note
    assert checkpoints.checkpoint_note(ckpt, checkpoints.load_checkpoint(ckpt)) == note  # read once by the caller


def test_a_diffeomorphic_model_regularises_its_velocity():
    torch.manual_seed(0)
    model = nets.create("unet", spatial_dims=2, encoder=(8,), decoder=(8,), integrate_steps=5)
    nn.init.normal_(model.flow.weight, std=0.1)
    item = ShiftPairs()[0]
    moving, fixed = item["moving"][None], item["fixed"][None]
    output = model(moving, fixed)
    terms = losses.loss_terms(output, moving, fixed, losses={"ncc": 1.0, "diffusion": 2.0})
    assert torch.allclose(terms["diffusion"], 2.0 * losses.diffusion(output.velocity))
    assert not torch.allclose(terms["diffusion"], 2.0 * losses.diffusion(output.disp))


def test_each_weighted_term_is_logged_and_sums_to_the_loss():
    torch.manual_seed(0)
    history = train.fit(TinyNet(), ShiftPairs(), losses={"ncc": 1.0, "diffusion": 0.5, "dice": 0.2},
                        steps=3, progress=False, device="cpu")
    h = history["train"]
    assert {"ncc", "diffusion", "dice", "loss"} <= set(h)
    total = np.array(h["ncc"]) + np.array(h["diffusion"]) + np.array(h["dice"])
    np.testing.assert_allclose(total, h["loss"], rtol=1e-5)


def test_deep_supervision_terms_are_present_and_trained():
    torch.manual_seed(0)
    model = TinyNet(deep=True)
    item = ShiftPairs()[0]
    moving, fixed = item["moving"][None], item["fixed"][None]
    terms = losses.loss_terms(model(moving, fixed), moving, fixed, losses={"mse": 1.0, "diffusion": 0.1})
    assert "deep" in terms
    terms["loss"].backward()
    # The deep head only reaches the loss through deep supervision.
    assert model.deep_flow.bias.grad is not None and model.deep_flow.bias.grad.abs().sum() > 0

    model.zero_grad(set_to_none=True)
    terms = losses.loss_terms(model(moving, fixed), moving, fixed, losses={"mse": 1.0}, deep_weight=0)
    assert "deep" not in terms
    terms["loss"].backward()
    assert model.deep_flow.bias.grad is None

    history = train.fit(TinyNet(deep=True), ShiftPairs(), losses={"mse": 1.0}, steps=2, progress=False,
                        device="cpu", deep_weight=0.5)
    assert len(history["train"]["deep"]) == 2


def _resume_run(tmp_path, split):
    """8 steps over 5 noisy pairs in batches of 2 (3 batches an epoch), with dropout;
    ``split`` stops after that many steps and resumes from the checkpoint."""
    data, val = ShiftPairs(n=5, noise=0.05), ShiftPairs(n=2)
    kwargs = dict(val_data=val, losses={"ncc": 1.0, "diffusion": 0.1, "dice": 0.1}, batch_size=2,
                  lr=1e-2, seed=3, progress=False, device="cpu", val_every=3)
    ckpt = tmp_path / f"run{split}.pt"
    torch.manual_seed(0)
    model = TinyNet(dropout=0.3)
    if split:
        train.fit(model, data, steps=split, checkpoint=ckpt, **kwargs)
        torch.manual_seed(123)  # a different initialisation and RNG state: resume must undo both
        model = TinyNet(dropout=0.3)
        np.random.seed(99)
    history = train.fit(model, data, steps=8, checkpoint=ckpt, resume=True, **kwargs)
    return history, model


@pytest.mark.parametrize("split", [4, 3])
def test_resume_continues_exactly(tmp_path, split):
    # split 4 stops mid-epoch; split 3 stops exactly at an epoch's end.
    straight, model_a = _resume_run(tmp_path, 0)
    resumed, model_b = _resume_run(tmp_path, split)
    assert straight["train"]["loss"] == resumed["train"]["loss"]
    # The stopped run also validated at its last step; every other validation matches.
    val_a, val_b = straight["val"], resumed["val"]
    keep = [i for i, s in enumerate(val_b["step"]) if s in val_a["step"]]
    assert val_a == {k: [v[i] for i in keep] for k, v in val_b.items()}
    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(a, b), name


class CrashingPairs(ShiftPairs):
    """Raises (like a killed job) when item ``crash_at`` is drawn."""

    def __init__(self, crash_at, **kwargs):
        super().__init__(**kwargs)
        self.crash_at, self.drawn = crash_at, 0

    def __getitem__(self, i):
        self.drawn += 1
        if self.drawn == self.crash_at:
            raise KeyboardInterrupt("job killed")
        return super().__getitem__(i)


def test_a_killed_run_resumes_from_its_last_checkpoint_exactly(tmp_path):
    kwargs = dict(losses={"ncc": 1.0, "diffusion": 0.1}, batch_size=2, lr=1e-2, seed=3,
                  progress=False, device="cpu", steps=7, checkpoint_every=2)
    torch.manual_seed(0)
    model = TinyNet(dropout=0.3)
    straight = train.fit(model, ShiftPairs(n=5, noise=0.05), checkpoint=tmp_path / "a.pt", **kwargs)

    torch.manual_seed(0)
    ckpt = tmp_path / "b.pt"
    with pytest.raises(KeyboardInterrupt):  # killed while drawing step 5's batch (items 8, 9)
        train.fit(TinyNet(dropout=0.3), CrashingPairs(8, n=5, noise=0.05), checkpoint=ckpt, **kwargs)
    assert checkpoints.load_checkpoint(ckpt)["step"] == 4
    resumed = train.fit(TinyNet(dropout=0.3), ShiftPairs(n=5, noise=0.05), checkpoint=ckpt,
                        resume=True, **kwargs)
    assert straight["train"] == resumed["train"]


def test_checkpoint_holds_config_and_loads_with_weights_only(tmp_path):
    ckpt = tmp_path / "sub" / "model.pt"
    train.fit(TinyNet(), ShiftPairs(), losses={"mse": 1.0}, steps=2, checkpoint=ckpt, progress=False,
              device="cpu", seed=5)
    state = torch.load(ckpt, weights_only=True)
    assert state["config"] == {"name": "tiny", "deep": False, "dropout": 0.0}
    assert state["train_config"]["losses"] == {"mse": 1.0}
    assert state["train_config"]["seed"] == 5
    assert state["step"] == 2
    assert set(state["rng"]) >= {"torch", "numpy", "python"}
    assert set(state["model"]) == set(TinyNet().state_dict())
    assert state["optimizer"]["state"], "optimiser moments are saved"


def test_training_recipe_reads_the_run_back_from_its_checkpoint(tmp_path):
    ckpt = tmp_path / "model.pt"
    data = ShiftPairs()
    train.fit(TinyNet(), data, losses={"mse": 1.0, "diffusion": 0.5}, steps=3, lr=2e-3, batch_size=2, grad_clip=1.5,
              checkpoint=ckpt, progress=False, device="cpu", seed=7, spacing=(2.0, 2.0),
              metadata={"cli": {"data": "shift", "pairs": 16, "misalign": True}})
    recipe = checkpoints.training_recipe(checkpoints.load_checkpoint(ckpt))
    assert recipe == dict(model="tiny", seed=7, steps=3, batch=2, lr=2e-3, grad_clip=1.5,
                          losses={"mse": 1.0, "diffusion": 0.5},
                          data="shift", pairs=16, misalign=True, shape=list(data[0]["moving"].shape[1:]), spacing=[2.0, 2.0],
                          parameters=sum(p.numel() for p in TinyNet().parameters()), validation_dice=[])
    # A run started from Python has no command line: its data are unknown, not invented.
    train.fit(TinyNet(), data, losses={"mse": 1.0}, steps=1, checkpoint=tmp_path / "b.pt", progress=False,
              device="cpu")
    recipe = checkpoints.training_recipe(checkpoints.load_checkpoint(tmp_path / "b.pt"))
    assert (recipe["data"], recipe["pairs"], recipe["misalign"]) == (None, None, False)
    with pytest.raises(ValueError, match="state: expected a checkpoint written by regedu.train.fit"):
        checkpoints.training_recipe({"model": {}})


def test_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    checkpoints.save_checkpoint(path, {"step": 1, "w": torch.arange(3)})
    before = path.read_bytes()

    def crash(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.save_checkpoint(path, {"step": 2, "w": torch.arange(4)})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert checkpoints.load_checkpoint(path)["step"] == 1
    assert list(tmp_path.iterdir()) == [path], "no temporary file left behind"


def test_validation_metrics_are_recorded():
    torch.manual_seed(0)
    history = train.fit(TinyNet(), ShiftPairs(), val_data=ShiftPairs(n=2), losses={"mse": 1.0},
                        steps=4, val_every=2, lr=0.05, progress=False, device="cpu", labels=[1, 2])
    val = history["val"]
    assert val["step"] == [2, 4]
    assert {"loss", "dice", "percent_folding", "sdlogj"} <= set(val)
    assert all(0 <= d <= 1 for d in val["dice"])
    assert val["percent_folding"] == [0.0, 0.0]


def test_epochs_count_batches():
    history = train.fit(TinyNet(), ShiftPairs(n=3), losses={"mse": 1.0}, epochs=2, batch_size=2,
                        progress=False, device="cpu")
    assert history["train"]["step"] == [1, 2, 3, 4]


def test_progress_bar_runs(capsys):
    train.fit(TinyNet(), ShiftPairs(), losses={"mse": 1.0}, steps=2, progress=True, device="cpu")
    assert "2/2" in capsys.readouterr().err


@pytest.mark.parametrize("kwargs, message", [
    (dict(losses={"ncc": 1.0, "smooth": 1.0}, steps=1), "unknown term 'smooth'"),
    (dict(losses={"diffusion": 1.0}, steps=1), "no similarity term"),
    (dict(steps=2, epochs=1), "exactly one of steps and epochs"),
    (dict(steps=0), "steps: expected a positive integer"),
    (dict(steps=1, amp=True), "amp and channels_last are for CUDA"),
    (dict(steps=1, resume=True), "resume=True needs checkpoint"),
])
def test_bad_arguments_say_what_is_wrong(kwargs, message):
    with pytest.raises(ValueError, match=message):
        train.fit(TinyNet(), ShiftPairs(), progress=False, device="cpu", **kwargs)


def test_mismatched_pair_is_reported():
    data = [{"moving": torch.zeros(1, 32, 32), "fixed": torch.zeros(1, 30, 32)}]
    with pytest.raises(ValueError, match=r"moving and fixed must have the same shape"):
        train.fit(TinyNet(), data, steps=1, progress=False, device="cpu")


def test_missing_resume_file_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint file"):
        train.fit(TinyNet(), ShiftPairs(), steps=1, resume=tmp_path / "nope.pt", progress=False,
                  device="cpu")


def test_load_checkpoint_rejects_other_files(tmp_path):
    bad = tmp_path / "notes.pt"
    bad.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a regedu checkpoint"):
        checkpoints.load_checkpoint(bad)
    with pytest.raises(FileNotFoundError, match="no file"):
        checkpoints.load_checkpoint(tmp_path / "missing.pt")


def test_grad_clip_bounds_the_norm_the_optimiser_sees(tmp_path):
    seen = []

    def record(optimizer, args, kwargs):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        seen.append(float(torch.nn.utils.get_total_norm(grads)))

    from torch.optim.optimizer import register_optimizer_step_pre_hook
    handle = register_optimizer_step_pre_hook(record)
    try:
        for clip in (None, 1e-4):
            torch.manual_seed(0)
            train.fit(TinyNet(), ShiftPairs(), losses={"mse": 1.0}, steps=3, lr=1e-3, progress=False,
                      device="cpu", grad_clip=clip, checkpoint=tmp_path / f"clip{clip}.pt")
    finally:
        handle.remove()
    unclipped, clipped = seen[:3], seen[3:]
    assert min(unclipped) > 1e-4, unclipped  # so that the clip below binds
    assert all(n <= 1e-4 * (1 + 1e-4) for n in clipped), clipped
    assert checkpoints.load_checkpoint(tmp_path / "clip0.0001.pt")["train_config"]["grad_clip"] == 1e-4
    with pytest.raises(ValueError, match="grad_clip"):
        train.fit(TinyNet(), ShiftPairs(), losses={"mse": 1.0}, steps=1, progress=False, grad_clip=-1.0)


# ---------------------------------------------------------------- nothing lost, nothing silently wrong

class CountingPairs(ShiftPairs):
    """Counts the items drawn; ``on_item`` (index of the draw -> action) can act on a draw."""

    def __init__(self, on_item=None, **kwargs):
        super().__init__(**kwargs)
        self.drawn, self.on_item = 0, on_item or {}

    def __getitem__(self, i):
        self.drawn += 1
        action = self.on_item.get(self.drawn)
        if action is not None:
            action()
        return super().__getitem__(i)


def test_an_existing_checkpoint_is_not_replaced_without_resume_or_overwrite(tmp_path):
    ckpt = tmp_path / "m.pt"
    train.fit(TinyNet(), ShiftPairs(), losses={"mse": 1.0}, steps=2, checkpoint=ckpt, progress=False,
              device="cpu")
    before = ckpt.read_bytes()
    data = CountingPairs()
    with pytest.raises(FileExistsError, match=r"checkpoint: '.*m.pt' already exists \(a tiny "
                                              r"checkpoint at step 2\); continue it with resume=True"):
        train.fit(TinyNet(), data, losses={"mse": 1.0}, steps=2, checkpoint=ckpt, progress=False,
                  device="cpu")
    assert data.drawn == 0 and ckpt.read_bytes() == before
    train.fit(TinyNet(), ShiftPairs(), losses={"mse": 1.0}, steps=1, checkpoint=ckpt, progress=False,
              device="cpu", overwrite=True)
    assert checkpoints.load_checkpoint(ckpt)["step"] == 1


@pytest.mark.parametrize("where", ["folder", "parent is a file", "read-only folder"])
def test_an_unwritable_checkpoint_path_fails_before_training(tmp_path, where):
    import os
    if where == "folder":
        ckpt, message = tmp_path, "is a folder"
    elif where == "parent is a file":
        (tmp_path / "file").write_text("x")
        ckpt, message = tmp_path / "file" / "m.pt", "is a file, not a folder"
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        ckpt, message = locked / "m.pt", "not writable"
    data = CountingPairs()
    with pytest.raises(ValueError, match=f"checkpoint: .*{message}"):
        train.fit(TinyNet(), data, losses={"mse": 1.0}, steps=2, checkpoint=ckpt, progress=False,
                  device="cpu")
    assert data.drawn == 0


@pytest.fixture
def terminal_sigint():
    """Python's own SIGINT handler during the test, as under a terminal, even when the run's parent
    ignores SIGINT (a background job inherits SIG_IGN, and fit rightly leaves an ignored signal alone)."""
    import signal
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_sigint_saves_at_the_end_of_the_step_and_resumes_exactly(tmp_path, capsys, terminal_sigint):
    import os
    import signal
    kwargs = dict(losses={"ncc": 1.0, "diffusion": 0.1}, batch_size=2, lr=1e-2, seed=3,
                  progress=False, device="cpu", steps=7, checkpoint_every=100, checkpoint_minutes=None)
    torch.manual_seed(0)
    straight = train.fit(TinyNet(dropout=0.3), ShiftPairs(n=5, noise=0.05),
                         checkpoint=tmp_path / "a.pt", **kwargs)
    torch.manual_seed(0)
    ckpt = tmp_path / "b.pt"
    # Ctrl-C while step 3's batch is being drawn (items 5 and 6): step 3 finishes, then it saves.
    ctrl_c = CountingPairs({5: lambda: os.kill(os.getpid(), signal.SIGINT)}, n=5, noise=0.05)
    with pytest.raises(train.TrainingInterrupted) as stopped:
        train.fit(TinyNet(dropout=0.3), ctrl_c, checkpoint=ckpt, **kwargs)
    assert stopped.value.step == 3 and stopped.value.checkpoint == ckpt
    assert "SIGINT: finishing this step, then saving" in capsys.readouterr().err
    assert checkpoints.load_checkpoint(ckpt)["step"] == 3
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler, "handler restored"
    resumed = train.fit(TinyNet(dropout=0.3), ShiftPairs(n=5, noise=0.05), checkpoint=ckpt,
                        resume=True, **kwargs)
    assert straight["train"] == resumed["train"]
    assert "resuming from step 3 of 7" in capsys.readouterr().out


def test_checkpoints_are_periodic_by_default(tmp_path):
    ckpt = tmp_path / "m.pt"
    with pytest.raises(KeyboardInterrupt):  # killed while drawing the 8th step's batch
        train.fit(TinyNet(), CrashingPairs(8, n=1), losses={"mse": 1.0}, steps=20, checkpoint=ckpt,
                  progress=False, device="cpu")
    assert checkpoints.load_checkpoint(ckpt)["step"] == 6  # every tenth of the run: 2, 4, 6


def test_resume_skips_used_batches_without_loading_them(tmp_path):
    kwargs = dict(losses={"mse": 1.0}, batch_size=2, progress=False, device="cpu",
                  checkpoint=tmp_path / "m.pt")
    train.fit(TinyNet(), ShiftPairs(n=6), steps=2, **kwargs)  # 3 batches an epoch: stops mid-epoch
    data = CountingPairs(n=6)
    train.fit(TinyNet(), data, steps=3, resume=True, **kwargs)
    assert data.drawn == 2  # only the third batch is drawn; the first two are skipped unread


def test_resume_applies_a_new_learning_rate_and_records_it(tmp_path, capsys):
    ckpt = tmp_path / "m.pt"
    kwargs = dict(losses={"mse": 1.0}, progress=False, device="cpu", checkpoint=ckpt)
    train.fit(TinyNet(), ShiftPairs(), steps=2, lr=1e-3, **kwargs)
    train.fit(TinyNet(), ShiftPairs(), steps=4, lr=1e-4, resume=True, **kwargs)
    state = checkpoints.load_checkpoint(ckpt)
    assert state["optimizer"]["param_groups"][0]["lr"] == 1e-4
    assert state["train_config"]["lr"] == 1e-4
    assert state["train_config"]["changes"] == [{"step": 2, "lr": [1e-3, 1e-4]}]
    assert "lr 0.001 -> 0.0001 from here on" in capsys.readouterr().out


@pytest.mark.parametrize("change, message", [
    (dict(losses={"ncc": 1.0}), r"other settings \(losses: \{'mse': 1.0\} in the checkpoint, "
                                r"\{'ncc': 1.0\} here\)"),
    (dict(batch_size=2), "other settings.*batch_size: 1 in the checkpoint, 2 here"),
    (dict(model=TinyNet(deep=True)), "another model than this run builds.*deep: False in the checkpoint, True here"),
    (dict(spacing=2.0), "spacing: \\[1.0\\] in the checkpoint, \\[2.0\\] here"),
])
def test_resume_refuses_another_model_or_objective(tmp_path, change, message):
    ckpt = tmp_path / "m.pt"
    train.fit(TinyNet(), ShiftPairs(), steps=1, losses={"mse": 1.0}, progress=False, device="cpu",
              checkpoint=ckpt, spacing=1.0)
    kwargs = dict(steps=2, losses={"mse": 1.0}, progress=False, device="cpu", checkpoint=ckpt,
                  resume=True, spacing=1.0)
    model = change.pop("model", TinyNet())
    kwargs.update(change)
    with pytest.raises(ValueError, match=message) as err:
        train.fit(model, ShiftPairs(), **kwargs)
    assert "\n" not in str(err.value)
    assert checkpoints.load_checkpoint(ckpt)["step"] == 1


def test_resume_of_a_weights_only_checkpoint_says_what_is_missing(tmp_path):
    ckpt = tmp_path / "m.pt"
    train.fit(TinyNet(), ShiftPairs(), steps=1, losses={"mse": 1.0}, progress=False, device="cpu",
              checkpoint=ckpt)
    state = checkpoints.load_checkpoint(ckpt)
    for k in ("optimizer", "scaler", "rng", "rng_epoch_start"):
        state.pop(k)
    checkpoints.save_checkpoint(ckpt, state)
    with pytest.raises(ValueError, match=r"resume: .* holds weights only \(no 'optimizer', 'rng', "
                                         r"'rng_epoch_start'\).*--init-from"):
        train.fit(TinyNet(), ShiftPairs(), steps=2, losses={"mse": 1.0}, progress=False,
                  device="cpu", checkpoint=ckpt, resume=True)


def test_resume_without_a_file_says_it_starts_a_new_run(tmp_path, capsys):
    train.fit(TinyNet(), ShiftPairs(), steps=1, losses={"mse": 1.0}, progress=False, device="cpu",
              checkpoint=tmp_path / "new.pt", resume=True)
    assert "no checkpoint at" in capsys.readouterr().out


def test_nan_images_and_fractional_labels_are_refused():
    nan_image = [{"moving": torch.full((1, 32, 32), float("nan")), "fixed": torch.zeros(1, 32, 32)}]
    with pytest.raises(ValueError, match="moving: expected finite values, got 1024 NaN"):
        train.fit(TinyNet(), nan_image, steps=1, losses={"mse": 1.0}, progress=False, device="cpu")
    item = ShiftPairs()[0]
    item["moving_seg"] = item["moving"] * 2.5  # an intensity image given as labels
    with pytest.raises(ValueError, match="moving_seg: expected a label map of whole numbers"):
        train.fit(TinyNet(), [item], steps=1, losses={"mse": 1.0, "dice": 1.0}, progress=False,
                  device="cpu")


def test_a_loss_that_becomes_nan_stops_the_run_and_keeps_the_last_checkpoint(tmp_path):
    calls = []

    def mse_then_nan(fixed, warped):
        calls.append(1)
        value = losses.mse(fixed, warped)
        return value * float("nan") if len(calls) == 4 else value

    ckpt = tmp_path / "m.pt"
    model = TinyNet()
    with pytest.raises(ValueError, match=r"loss: not finite at step 4 .*the model was not updated "
                                         r"by it and the checkpoint .* \(step 3\) is kept"):
        train.fit(model, ShiftPairs(), losses={"mse": (mse_then_nan, 1.0)}, steps=6, lr=1e-3,
                  checkpoint=ckpt, checkpoint_every=1, progress=False, device="cpu")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert checkpoints.load_checkpoint(ckpt)["step"] == 3


def test_nan_weights_are_neither_saved_nor_loaded(tmp_path):
    model = TinyNet()
    with torch.no_grad():
        model.flow.bias.fill_(float("nan"))
    ckpt = tmp_path / "m.pt"
    checkpoints.save_checkpoint(ckpt, {"model": model.state_dict(),
                                       "config": {"name": "unet", "spatial_dims": 2}})
    with pytest.raises(ValueError, match="1 weight tensors hold NaN"):
        checkpoints.load_model(ckpt)


@pytest.mark.parametrize("weight", [-1.0, float("nan"), float("inf")])
def test_loss_weights_must_be_finite_and_non_negative(weight):
    with pytest.raises(ValueError, match=r"losses\['diffusion'\]: expected a finite weight >= 0"):
        train.fit(TinyNet(), ShiftPairs(), steps=1, losses={"mse": 1.0, "diffusion": weight},
                  progress=False, device="cpu")


def test_stale_temporary_files_of_killed_saves_are_removed(tmp_path):
    import os
    ckpt = tmp_path / "m.pt"
    dead = tmp_path / ".m.pt.999999999.abcd.tmp"  # no such pid
    alive = tmp_path / f".m.pt.{os.getppid()}.abcd.tmp"  # a live process may still be writing it
    dead.write_bytes(b"x" * 1000)
    alive.write_bytes(b"x")
    checkpoints.save_checkpoint(ckpt, {"step": 1})
    assert not dead.exists() and alive.exists()


def test_validation_shows_its_progress(capsys):
    train.fit(TinyNet(), ShiftPairs(), val_data=ShiftPairs(n=3), losses={"mse": 1.0}, steps=1,
              progress=True, device="cpu")
    assert "validating" in capsys.readouterr().err


def test_spacing_and_shape_are_recorded_and_pick_the_factor(tmp_path):
    from regedu import nets
    ckpt = tmp_path / "m.pt"
    model = nets.create("unet", spatial_dims=2, encoder=(4, 4), decoder=(4, 4, 4))
    train.fit(model, ShiftPairs(), steps=1, losses={"mse": 1.0}, progress=False, device="cpu",
              checkpoint=ckpt, spacing=4.0)
    state = checkpoints.load_checkpoint(ckpt)
    assert state["train_config"]["spacing"] == [4.0] and state["train_config"]["shape"] == [32, 32]
    assert checkpoints.trained_spacing(state) == (4.0,)
    assert isinstance(checkpoints.load_model(ckpt, spacing=(1.0, 1.0)), nets.Rescaled)
    assert checkpoints.load_model(ckpt, spacing=(1.0, 1.0)).factor == 4
    assert not isinstance(checkpoints.load_model(ckpt, spacing=4.0), nets.Rescaled)


@pytest.mark.parametrize("trained, spacing, factor_or_message", [
    (4.0, (1.0, 1.0, 1.0), 4), ([2.0, 2.0, 2.0], 1.0, 2), (1.0, 1.0, 1),
    (4.0, 1.5, "the ratio 2.67 is not one whole number"),
    (4.0, (1.0, 1.0, 2.0), "the ratio 4x4x2 is not one whole number"),
    (1.0, 4.0, "the images are coarser than the model's grid")])
def test_choose_factor(trained, spacing, factor_or_message):
    if isinstance(factor_or_message, int):
        assert checkpoints.choose_factor(trained, spacing) == factor_or_message
    else:
        with pytest.raises(ValueError, match=factor_or_message):
            checkpoints.choose_factor(trained, spacing)


def test_optimizer_step_takes_the_known_step_clips_and_refuses_a_non_finite_loss():
    w = nn.Parameter(torch.tensor([3.0, 4.0]))
    opt = torch.optim.SGD([w], lr=0.1)
    # d/dw |w|^2 = 2w = (6, 8), norm 10: clipped to norm 1 it is (0.6, 0.8).
    out = train.optimizer_step([w], opt, {"loss": (w ** 2).sum(), "other": w.sum()}, grad_clip=1.0)
    assert sorted(out) == ["loss", "other"] and not out["loss"].requires_grad
    assert torch.allclose(w.detach(), torch.tensor([3.0 - 0.06, 4.0 - 0.08]), atol=1e-6)
    before = w.detach().clone()
    with pytest.raises(train.NonFiniteLoss, match=r"loss: not finite \(loss nan\)"):
        train.optimizer_step([w], opt, {"loss": w.sum() * float("nan")})
    assert torch.equal(w.detach(), before)  # nothing was updated


def test_fit_objective_refuses_a_non_finite_loss_through_the_same_step():
    from regedu import supervised
    model = nets.create("unet", spatial_dims=2, encoder=(4, 4), decoder=(4, 4))
    data = {"moving": torch.rand(2, 1, 16, 16), "fixed": torch.rand(2, 1, 16, 16)}
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(train.NonFiniteLoss, match="loss: not finite at step 1"):
        supervised.fit_objective(model, data, lambda out, b: out.warped.mean() * float("nan"), steps=2)
    assert all(torch.equal(a, p.detach()) for a, p in zip(before, model.parameters()))


class SlowPairs(ShiftPairs):
    """Each item takes ``delay`` seconds to draw, so a run's time has a known floor."""

    def __init__(self, delay, **kwargs):
        super().__init__(**kwargs)
        self.delay = delay

    def __getitem__(self, i):
        time.sleep(self.delay)
        return super().__getitem__(i)


def test_the_time_a_run_took_is_kept_and_summed_over_resumes(tmp_path):
    ckpt = tmp_path / "m.pt"
    kwargs = dict(losses={"mse": 1.0}, batch_size=1, progress=False, device="cpu", checkpoint=ckpt)
    train.fit(TinyNet(), SlowPairs(0.1, n=6), steps=2, **kwargs)
    first = checkpoints.load_checkpoint(ckpt)["seconds"]
    assert 0.2 <= first < 0.2 + 30
    train.fit(TinyNet(), SlowPairs(0.3, n=6), steps=4, resume=True, **kwargs)
    # two steps at 0.1 s an item, then two at 0.3 s: at least 0.8 s in all
    assert checkpoints.load_checkpoint(ckpt)["seconds"] >= first + 0.6


def test_a_run_resumed_from_a_checkpoint_without_a_clock_says_its_time_is_unknown(tmp_path):
    ckpt = tmp_path / "m.pt"
    kwargs = dict(losses={"mse": 1.0}, progress=False, device="cpu", checkpoint=ckpt)
    train.fit(TinyNet(), ShiftPairs(), steps=2, **kwargs)
    state = checkpoints.load_checkpoint(ckpt)
    del state["seconds"]  # as written before the run's time was recorded
    checkpoints.save_checkpoint(ckpt, state)
    train.fit(TinyNet(), ShiftPairs(), steps=3, resume=True, **kwargs)
    assert checkpoints.load_checkpoint(ckpt)["seconds"] is None
