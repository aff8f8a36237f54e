"""Notebook 08: VV-Net, built from the paper, with and without deep supervision."""
from _nb import PROFILE_CELL, code, md, write

cells = [
md(r"""
# 08 · VV-Net

VV-Net (seed 000, *VV-Net based 3D medical image registration*; English summary
in docs/conventions.md, "VV-Net, from the paper") registers brain MRI with **three V-Nets**: V-Net 1 finds a
coarse field, V-Net 2 refines it on the warped image, and V-Net 3, a deeper
network grown out of V-Net 1's bottleneck, feeds large-scale context into V-Net
2. Stage-wise predictions are fused and **deeply supervised**. On four datasets
it edges out VoxelMorph (Table 2: ADNI 0.733 vs 0.720 mean Dice).

**Learning goals.** After this notebook you can

1. map each sentence of the paper's architecture section to a module of
   `regedu.nets.VVNet`;
2. read the shapes and parameter counts of the three V-Nets with `nets.summary`,
   at the paper's 160x192x224, and estimate the memory of training;
3. train VV-Net with the paper's kind of loss (similarity + $\lambda$ diffusion),
   here with VoxelMorph's Dice term added;
4. say what deep supervision adds to the loss, and measure what it changes in
   V-Net 1's coarse field $\varphi_1$.
"""),
code(PROFILE_CELL),
md(r"""
## 1. From the paper to the code

| paper (section 1.1) | `regedu.nets.VVNet` |
| --- | --- |
| input: $F$ and $M$ concatenated, 2 channels | `cat([M, F])`, any size (padded to a multiple of 16 inside) |
| each V-Net: 3x3x3 conv, stride-2 conv (1/2); residual unit, stride-2 conv (1/4); residual bottleneck; upsample + residual unit; upsample + conv | `nets.VNet` (`encode`, `bottleneck`, `decode`) |
| V-Net 1 predicts the coarse field $\varphi_1$ | `vnet1` + three flow heads, one per decoder stage, summed |
| $M \circ \varphi_1$ and $F$ are the input of V-Net 2 | `vnet2` on `cat([warp(M, phi1), F])` |
| V-Net 3 grows out of V-Net 1's bottleneck: two stride-2 convs (1/8, 1/16), two upsamplings back to 1/4 | `vnet3` applied to V-Net 1's bottleneck features |
| V-Net 3's features fused with V-Net 2's encoder features into V-Net 2's bottleneck | `fuse`: 1x1x1 conv on the concatenation |
| stage predictions of V-Net 3 and V-Net 2 fused as the input of the final layer | `final`: 1x1x1 conv over six stage fields (starts as their sum) |
| deep supervision of V-Net 1 | $\varphi_1$ returned in `output.deep`; the trainer supervises it like the final field |
| loss: MSE + $\lambda$ diffusion; Adam, lr $10^{-4}$, batch 1 | `train.fit(losses={"mse": 1, "diffusion": lam}, lr=1e-4)` |

One choice the paper leaves open: is V-Net 2's field the final field, or is it
*composed* with $\varphi_1$? V-Net 2 registers the already-warped image, so its
field is relative to $\varphi_1$, and composing ($\varphi = \varphi_1 \circ
\varphi_2$, as recursive cascades do) is the natural reading. It is the default
here (`compose=True`); `compose=False` is the literal reading.
"""),
code(r"""
import resource
import time
from pathlib import Path

import numpy as np
import torch

from regedu import checkpoints, datasets, evaluate, losses, nets, train, viz
from regedu.spatial import warp

paper = nets.VVNet(spatial_dims=3)                     # the paper's widths
print(paper.config)
for name in ("vnet1", "vnet2", "vnet3", "fuse", "heads1", "heads2", "heads3", "final"):
    print(f"{name:>7}: {sum(p.numel() for p in getattr(paper, name).parameters()):>9,} parameters")
n_params = sum(p.numel() for p in paper.parameters())
print(f"  total: {n_params:>9,} parameters")
vnet3_share = sum(p.numel() for p in paper.vnet3.parameters()) / n_params
print(f"V-Net 3 holds {vnet3_share:.0%} of them")
"""),
md(r"""
V-Net 3 holds most of the parameters (the share printed above; checked at the
end): its convolutions work on 64 channels at 1/4 to 1/16 resolution, where
voxels are cheap, so it adds capacity and a large receptive field without much
memory (its share of the activations is printed in the next section, and
checked).

## 2. Shapes and memory at 160x192x224

`nets.summary` runs one training-mode forward pass and records every tensor
autograd keeps for the backward pass. A forward at full resolution is too slow
on a CPU, so it measures at a smaller size and scales the memory by the number
of voxels (activations of a convolutional network grow linearly with it).
"""),
code(r"""
max_voxels = 160 * 192 * 224 if profile.name == "gpu" else 20 * 24 * 28   # CPUs: measure small (memory budget)
report = nets.summary(paper, (160, 192, 224), max_voxels=max_voxels)
print(report)
state_bytes = 4 * report.param_bytes          # weights, gradients and Adam's two moments
print(f"activations {report.activation_bytes / 2**30:.2f} GiB vs {state_bytes / 2**30:.3f} GiB of parameters, "
      f"gradients and Adam state: {report.activation_bytes / state_bytes:.0f} times more")
vnet3_activations = sum(r["activation_bytes"] for r in report.rows if r["name"].split(".")[0] == "vnet3") / report.activation_bytes
print(f"V-Net 3: {vnet3_share:.0%} of the parameters, {vnet3_activations:.1%} of the activations")
"""),
md(r"""
Read the last lines: the activations dominate the training memory (the ratio
is printed above and checked at the end), and they are what a 16 GB GPU
(the paper's) must hold. Notebook 09 estimates the same for VoxelMorph and,
on a GPU (its `gpu` profile), trains both at full resolution and compares the
estimate with the measured peak.

## 3. Training VV-Net

The atlas and subjects are notebook 06's: realistic subjects (pose, anatomy of
a real brain, intensity changes) **pre-aligned to the atlas with ANTs affine**,
as the paper prepares its data (`datasets.RealisticPairs`). The network trains
on subjects of the training brains and is tested on notebook 10's test sets:
new subjects of the training brains ("in-distribution") and subjects of the
two held-out donors ("held-out"), reported separately. The baseline is the
pre-alignment alone (no deformable step). The paper trains with MSE because its
intensities are normalised the same way for every scan; our subjects have a
bias field and a gamma change, so we use local NCC, as VoxelMorph, plus the
diffusion regulariser and VoxelMorph's Dice loss on the training subjects'
labels (the semi-supervised recipe of notebooks 06 and 10).

**Budget.** A VV-Net step of the paper's width takes about a second at 4 mm on two
CPU cores (the time per step is printed below), and the pre-trained network
below took about a thousand such steps, its validation Dice still climbing
(its recipe and validation curve are printed from the file below). So the `ci` and `cpu` profiles **fine-tune**: they start from the
**pre-trained VV-Net** of the paper's width that the project made with its own
command `regedu train` on these subjects (notebook 10's semi-supervised recipe:
NCC + diffusion + Dice, deep supervision on) and continue it for a few steps
at the paper's learning rate $10^{-4}$, twice (with and without deep
supervision), with the checkpoint's own loss (read from the file); each run
prints its loss on three fixed training pairs before and after (checked to
fall). Everything runs on the 4 mm grid, the
checkpoint's, in every profile; the `gpu` profile trains two new VV-Nets from
scratch for the profile's steps.
"""),
code(r"""
fine_tune = not profile.paper_scale
checkpoint = Path("checkpoints/brain_vvnet_4mm_semi_lr5e-4_s0.pt")
pre_state = checkpoints.load_checkpoint(checkpoint)
pre_recipe = checkpoints.training_recipe(pre_state)
spacing = pre_recipe["spacing"][0]
atlas = datasets.mni_brain(int(spacing))
structures = atlas.structures()
labels = list(structures)
train_pairs = datasets.RealisticPairs(profile.n_train_pairs, anatomy="train", seed=0, spacing_mm=spacing)
n_test = max(1, profile.n_test_pairs // 2)
test_sets = datasets.course_test_sets({name: n_test for name in datasets.COURSE_TEST_SETS}, spacing_mm=spacing)
test_pairs = [pair for pairs in test_sets.values() for pair in pairs]
print(f"{len(train_pairs)} training pairs of {', '.join(train_pairs.names)}; test pairs:",
      {name: len(pairs) for name, pairs in test_sets.items()}, f"on the {spacing:g} mm grid")
print("the checkpoint's recipe:", {k: v for k, v in pre_recipe.items() if k != "validation_dice"})
val = pre_state["history"]["val"]
print("its validation Dice (subjects of the training brains):",
      ", ".join(f"{d:.3f} at step {s}" for s, d in zip(val["step"], val["dice"])))

steps = {"ci": 5, "cpu": 20}.get(profile.name, profile.steps_3d)
lr = 1e-4
objective = pre_recipe["losses"]


def training_loss(model, deep_weight, n=3):
    # The run's loss on the first n training pairs, the same pairs every time (the logged training
    # loss changes with the pair drawn at each step, too noisy over a few steps).
    with torch.no_grad():
        return float(np.mean([float(losses.loss_terms(model(p["moving"][None], p["fixed"][None]), p["moving"][None],
                                                      p["fixed"][None], losses=objective, deep_weight=deep_weight,
                                                      moving_seg=p["moving_seg"][None], fixed_seg=p["fixed_seg"][None],
                                                      labels=labels)["loss"])
                              for p in (train_pairs[i] for i in range(n))]))


fit_loss = {}   # deep_weight -> the loss on those pairs before and after the run


def train_vvnet(deep_weight):
    torch.manual_seed(0)
    model = checkpoints.load_model(pre_state).train() if fine_tune else nets.create("vvnet", spatial_dims=3)
    before = training_loss(model.eval(), deep_weight)
    start = time.perf_counter()
    history = train.fit(model.train(), train_pairs, losses=objective, steps=steps, lr=lr, deep_weight=deep_weight,
                        labels=labels, grad_clip=1.0, progress=False)
    seconds = time.perf_counter() - start
    fit_loss[deep_weight] = before, training_loss(model.eval(), deep_weight)
    print(f"deep_weight={deep_weight}: {'fine-tuned from ' + checkpoint.name if fine_tune else 'new'}, "
          f"{sum(p.numel() for p in model.parameters()):,} parameters, "
          f"{steps} steps at {spacing:g} mm, lr {lr:g}, losses {objective}, in {seconds:.0f} s ({seconds / steps:.1f} s a step); "
          f"logged terms: {sorted(history['train'])}; loss on 3 training pairs "
          f"{fit_loss[deep_weight][0]:.4f} -> {fit_loss[deep_weight][1]:.4f}")
    return model.eval(), history


vvnet, history = train_vvnet(deep_weight=1.0)
fig = viz.plot_history(history, smooth=5)
fig
"""),
md(r"""
## 4. What deep supervision changes

With deep supervision the loss has one more term: V-Net 1's field $\varphi_1$ is
scored exactly like the final field (similarity of $F$ and $M \circ \varphi_1$,
its regulariser and the Dice term of its warped labels), and the `"deep"` term
is its weighted loss:

$$\mathcal{L} = \mathcal{L}(\varphi) + w_{\text{deep}}\,\mathcal{L}(\varphi_1).$$

Without it (`deep_weight=0`), nothing asks $\varphi_1$ to be a registration on
its own: V-Net 1 only has to produce whatever helps V-Net 2. We run the
training a second time with `deep_weight=0` (from the same start), score one
output under both weights to see the extra term, and compare the coarse fields
of the two runs.
"""),
code(r"""
vvnet_no_ds, history_no_ds = train_vvnet(deep_weight=0.0)
pair = test_pairs[0]
moving, fixed = pair["moving"][None], pair["fixed"][None]
with torch.no_grad():
    out = vvnet(moving, fixed)
    segs = dict(moving_seg=pair["moving_seg"][None], fixed_seg=pair["fixed_seg"][None], labels=labels)
    terms_ds = losses.loss_terms(out, moving, fixed, losses=objective, deep_weight=1.0, **segs)
    terms_no = losses.loss_terms(out, moving, fixed, losses=objective, deep_weight=0.0, **segs)
print("same output, deep_weight=1:", {k: round(float(v), 4) for k, v in terms_ds.items()})
print("same output, deep_weight=0:", {k: round(float(v), 4) for k, v in terms_no.items()})
"""),
code(r"""
def coarse(model):
    # Register with V-Net 1's field phi1 alone.
    def method(moving, fixed):
        with torch.no_grad():
            return model(moving, fixed).stages[0]
    return method


pretrained = checkpoints.load_model(pre_state).eval()
methods = {"affine (pre-alignment)": evaluate.identity, "VV-Net": vvnet, "VV-Net, no deep supervision": vvnet_no_ds,
           "phi1 of VV-Net": coarse(vvnet), "phi1 without deep supervision": coarse(vvnet_no_ds),
           "VV-Net (pre-trained)": pretrained, "phi1 of VV-Net (pre-trained)": coarse(pretrained)}
results = evaluate.compare(methods, test_pairs, labels=structures, progress=False)
evaluate.summary(results, metrics=("dice", "percent_folding"), by="dataset")
"""),
code(r"""
mean_dice = {ev.name: ev.mean_dice() for ev in results}
folds = {ev.name: float(ev.table()["percent_folding"].mean()) for ev in results}
fig = viz.plot_dice({k: ev.dice.to_numpy(float) for k, ev in zip(methods, results)
                     if k in ("affine (pre-alignment)", "VV-Net", "VV-Net, no deep supervision", "VV-Net (pre-trained)")}, labels=labels)
fig
"""),
code(r"""
with torch.no_grad():
    out_pre = pretrained(moving, fixed)
viewer = viz.SliceViewer(pair["fixed"][0], pair["moving"][0], out_pre.warped[0, 0], disp=out_pre.disp,
                         rows=["fixed", "warped", "grid"], index=tuple(n // 2 for n in atlas.image.shape[1:]))
viewer
"""),
md(r"""
What to look for:

* with deep supervision, $\varphi_1$ alone is already a registration: it makes
  the test pairs more similar (local NCC, checked at the end) and, after
  enough training, its Dice is above the pre-alignment's (the pre-trained row); without
  it, $\varphi_1$ is free to be anything V-Net 2 can use, and its Dice on its
  own tells you little;
* deep supervision mainly helps the *optimisation* (gradients reach V-Net 1
  directly instead of through V-Net 2), which is expected to matter most early
  in training and for deep networks (Lee et al., *Deeply-Supervised Nets*,
  AISTATS 2015); these runs do not measure that. In the `ci` and `cpu` profiles both runs start from a
  network trained *with* deep supervision and take a few steps only, so their
  $\varphi_1$ is a registration either way (its Dice above the pre-alignment's: printed
  for both, checked for the run without deep supervision)
  and their differences, printed below, are small (checked: under 0.02 Dice);
  the `gpu` profile trains both from scratch, long enough to compare them;
* the pre-trained VV-Net (trained with deep supervision) shows the end state:
  Dice above the pre-alignment's by more than 0.02, on the held-out donors as
  well as on new subjects of its training brains, and its $\varphi_1$ alone
  already a registration (all checked, and printed below).
"""),
code(r"""
baseline = "affine (pre-alignment)"
for name in methods:
    if name != baseline:
        print(f"{name:<32} {mean_dice[name]:.3f} Dice ({mean_dice[name] - mean_dice[baseline]:+.3f} over the pre-alignment)")
ds_gap = mean_dice["VV-Net"] - mean_dice["VV-Net, no deep supervision"]
phi1_gap = mean_dice["phi1 of VV-Net"] - mean_dice["phi1 without deep supervision"]
print(f"with minus without deep supervision: final field {ds_gap:+.3f}, phi1 {phi1_gap:+.3f} Dice")
by_set = {ds: {ev.name: ev.mean_dice(ds) for ev in results} for ds in test_sets}
for ds, d in by_set.items():
    print(f"{ds}: pre-alignment {d[baseline]:.3f}, pre-trained VV-Net {d['VV-Net (pre-trained)']:.3f}, "
          f"fine-tuned here {d['VV-Net']:.3f}")
"""),
md(r"""

## Exercises

1. Build `nets.VVNet(spatial_dims=3, compose=False)` (the paper's literal
   reading) and train it the same way. Does Dice change? Why might the literal
   reading need more training?
2. Use the paper's loss, `{"mse": 1.0, "diffusion": 0.01}`. Which of our subjects'
   intensity changes does MSE handle badly?
3. Print `nets.summary(nets.create("unet", spatial_dims=3), (160, 192, 224), max_voxels=...)`.
   How many times more parameters does VV-Net have, and how much more memory?
4. Set `deep_weight=5`. What happens to the final field's Dice and to $\varphi_1$'s?

## Checks
"""),
code(r"""
print({k: round(v, 4) for k, v in mean_dice.items()})
assert report.outputs["disp"] == (1, 3, 160, 192, 224), f"VV-Net's field at the paper's size should be (1, 3, 160, 192, 224): {report.outputs}"
assert report.outputs["warped"] == (1, 1, 160, 192, 224), f"the warped image should have the input's shape: {report.outputs}"
assert report.params == n_params == 2_340_596, f"the paper-width VV-Net has 2,340,596 parameters here, got {report.params:,}"
assert "deep" in history["train"] and "deep" not in history_no_ds["train"], "deep supervision should add the 'deep' loss term, and only when deep_weight > 0"
assert "deep" in terms_ds and "deep" not in terms_no and float(terms_ds["loss"]) != float(terms_no["loss"]), "deep supervision should change the loss of the same output"
# What the runs did: each lowered its own loss on the same training pairs (zero steps would not).
for w, (before, after) in fit_loss.items():
    assert after < before, f"the run with deep_weight={w} should lower its loss on 3 training pairs: {before:.4f} -> {after:.4f}"
# Where they ended: Dice and the similarity (local NCC, lower is better) above the pre-alignment's. In the ci and
# cpu profiles both runs start from the pre-trained VV-Net, which passes these before any step.
with torch.no_grad():
    ncc = {k: float(np.mean([float(losses.ncc_local(p["fixed"][None], warp(p["moving"][None], disp(p))))
                             for p in test_pairs]))
           for k, disp in {baseline: lambda p: torch.zeros(1, 3, *p["fixed"].shape[1:]),
                           "VV-Net": lambda p: vvnet(p["moving"][None], p["fixed"][None]).disp,
                           "phi1 of VV-Net": lambda p: vvnet(p["moving"][None], p["fixed"][None]).stages[0]}.items()}
print("local NCC over the test pairs (lower is better):", {k: round(v, 4) for k, v in ncc.items()})
MARGIN = 0.02
for name in ("VV-Net", "VV-Net, no deep supervision"):
    assert mean_dice[name] > mean_dice[baseline] + MARGIN, f"{name} should beat the pre-alignment by more than {MARGIN} Dice: {mean_dice}"
assert ncc["VV-Net"] < ncc[baseline], f"trained VV-Net should make the test pairs more similar: {ncc}"
assert ncc["phi1 of VV-Net"] < ncc[baseline], f"with deep supervision, phi1 alone should already improve the similarity: {ncc}"
assert mean_dice["VV-Net (pre-trained)"] > mean_dice[baseline] + 0.02, f"the pre-trained VV-Net should beat the pre-alignment by more than 0.02 Dice: {mean_dice}"
assert by_set["held-out"]["VV-Net (pre-trained)"] > by_set["held-out"][baseline] + MARGIN, f"on held-out anatomy too: {by_set}"
assert by_set["in-distribution"]["VV-Net (pre-trained)"] > by_set["in-distribution"][baseline] + MARGIN, f"and on new subjects of its training brains: {by_set}"
assert mean_dice["phi1 of VV-Net (pre-trained)"] > mean_dice[baseline], f"with deep supervision, the pre-trained phi1 alone should beat the pre-alignment: {mean_dice}"
assert mean_dice["VV-Net (pre-trained)"] >= mean_dice["phi1 of VV-Net (pre-trained)"] - 0.005, f"V-Net 2 should not undo phi1's work: {mean_dice}"
assert folds["VV-Net"] < 1.0 and folds["VV-Net (pre-trained)"] < 1.0, f"folding should stay below 1% of the voxels: {folds}"
assert 500 <= pre_recipe["steps"] <= 2000, f"the prose says the pre-trained VV-Net took about a thousand steps: {pre_recipe['steps']}"
assert val["dice"][-1] > max(val["dice"][:-1]) and val["dice"][-1] > val["dice"][0] + 0.05, f"the prose says its validation Dice climbed and was still climbing: {val['dice']}"
if fine_tune:   # the short runs from one deep-supervised start: the claims of "What to look for"
    assert mean_dice["phi1 without deep supervision"] > mean_dice[baseline], f"starting from a deep-supervised network, phi1 should stay a registration after a few steps without deep supervision: {mean_dice}"
    assert abs(ds_gap) < 0.02 and abs(phi1_gap) < 0.02, f"a few steps from the same start should change little: final {ds_gap:+.3f}, phi1 {phi1_gap:+.3f} Dice"
assert vnet3_share > 0.5, f"V-Net 3 should hold most of the parameters, holds {vnet3_share:.0%}"
assert vnet3_activations < 0.1, f"V-Net 3 should add little activation memory (coarse voxels): {vnet3_activations:.1%} of it"
assert report.activation_bytes > 10 * state_bytes, f"activations should dominate the training memory: {report.activation_bytes:,} vs {state_bytes:,} bytes"
print("all checks passed")
print(f"peak memory of this kernel: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
"""),
]

if __name__ == "__main__":
    print(write("08_vvnet.ipynb", cells))
