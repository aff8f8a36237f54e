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
3. train VV-Net with the paper's loss (similarity + $\lambda$ diffusion);
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
(the paper's) must hold. The same numbers for VoxelMorph come in notebook 09,
which trains both at full resolution on a GPU and compares the estimate with
the measured peak.

## 3. Training VV-Net

The atlas and subjects are those of notebook 07 before its misalignment
(`datasets.BrainPairs`: synthetic subjects of the template and the donors'
anatomy, the data the pre-trained VV-Net below was trained on). The paper trains with MSE because its intensities are normalised the
same way for every scan; our subjects have a bias field and a gamma change, so
we use local NCC, as VoxelMorph, plus the diffusion regulariser.

**Budget.** A VV-Net step of the paper's width takes seconds at 4 mm on two
CPU cores (the time per step is printed below), and the pre-trained network
below took 500 such steps to climb from the identity's validation Dice to its
own (its note, printed below, gives both). So the `ci` and `cpu` profiles **fine-tune**:
they start from the **pre-trained VV-Net** of the paper's width that the
project made with its own command `regedu train` at 4 mm (printed below; NCC +
diffusion + Dice, deep supervision on, 500 steps) and continue it for a few
steps at the paper's learning rate $10^{-4}$, twice (with and without deep
supervision), on the 4 mm grid; in the `cpu` profile the networks then run on
the 2 mm test pairs through `nets.Rescaled(model, 2)`, as in notebook 07. The
`gpu` profile trains two new VV-Nets on the full grid for the profile's steps.
"""),
code(r"""
atlas = datasets.mni_brain()
table = datasets.label_table()
labels = sorted(int(v) for v in table.loc[table["in_30"], "freesurfer"].unique())
names = {k: datasets.STRUCTURE_NAMES.get(k, str(k)) for k in labels}
donors = [datasets.donor_brain(d) for d in datasets.DONORS]
# The short runs of the ci and cpu profiles train on the 4 mm grid (as in notebook 07).
train_spacing = profile.train_spacing_mm
atlas_train = datasets.mni_brain(train_spacing)
train_pairs = datasets.BrainPairs(profile.n_train_pairs, atlas=atlas_train, seed=0, cache=True,
                                  subjects=[atlas_train] + [datasets.donor_brain(d, train_spacing) for d in datasets.DONORS[:4]])
n_test = max(1, profile.n_test_pairs // 2)
test_pairs = []
for name, subjects, seed in (("synthetic", None, 100), ("donors", donors[4:], 101)):
    source = datasets.BrainPairs(n_test, atlas=atlas, subjects=subjects, seed=seed)
    test_pairs += [{**source[i], "meta": {"dataset": name, "id": f"{name}-{i}"}} for i in range(n_test)]

fine_tune = not profile.paper_scale
checkpoint = Path("checkpoints/brain_vvnet_4mm.pt")
steps = {"ci": 8, "cpu": 20}.get(profile.name, profile.steps_3d)
lr = 1e-4
objective = {"ncc": 1.0, "diffusion": 1.0}
grid = checkpoints.choose_factor(train_spacing, atlas.spacing_mm)     # 2 in cpu: trained at 4 mm, used at 2 mm


def train_vvnet(deep_weight):
    torch.manual_seed(0)
    model = checkpoints.load_model(checkpoint).train() if fine_tune else nets.create("vvnet", spatial_dims=3)
    start = time.perf_counter()
    history = train.fit(model, train_pairs, losses=objective, steps=steps, lr=lr, deep_weight=deep_weight,
                        progress=False)
    seconds = time.perf_counter() - start
    print(f"deep_weight={deep_weight}: {'fine-tuned from ' + checkpoint.name if fine_tune else 'new'}, "
          f"{sum(p.numel() for p in model.parameters()):,} parameters, "
          f"{steps} steps at {train_spacing:g} mm, lr {lr:g}, in {seconds:.0f} s ({seconds / steps:.1f} s a step); "
          f"logged terms: {sorted(history['train'])}")
    return (nets.Rescaled(model, grid) if grid > 1 else model).eval(), history


vvnet, history = train_vvnet(deep_weight=1.0)
fig = viz.plot_history(history, smooth=5)
fig
"""),
md(r"""
## 4. What deep supervision changes

With deep supervision the loss has one more term: V-Net 1's field $\varphi_1$ is
scored exactly like the final field (similarity of $F$ and $M \circ \varphi_1$,
plus its regulariser), and the `"deep"` term is its weighted loss:

$$\mathcal{L} = \mathcal{L}(\varphi) + w_{\text{deep}}\,\mathcal{L}(\varphi_1).$$

Without it (`deep_weight=0`), nothing asks $\varphi_1$ to be a registration on
its own: V-Net 1 only has to produce whatever helps V-Net 2. We train the same
network both ways and compare the loss terms and the coarse field.
"""),
code(r"""
vvnet_no_ds, history_no_ds = train_vvnet(deep_weight=0.0)
pair = test_pairs[0]
moving, fixed = pair["moving"][None], pair["fixed"][None]
with torch.no_grad():
    out = vvnet(moving, fixed)
    terms_ds = losses.loss_terms(out, moving, fixed, losses=objective, deep_weight=1.0)
    terms_no = losses.loss_terms(out, moving, fixed, losses=objective, deep_weight=0.0)
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


print(checkpoints.checkpoint_note(checkpoint))
pretrained = checkpoints.load_model(checkpoint, factor=checkpoints.choose_factor(4, atlas.spacing_mm))
methods = {"identity": evaluate.identity, "VV-Net": vvnet, "VV-Net, no deep supervision": vvnet_no_ds,
           "phi1 of VV-Net": coarse(vvnet), "phi1 without deep supervision": coarse(vvnet_no_ds),
           "VV-Net (pre-trained)": pretrained, "phi1 of VV-Net (pre-trained)": coarse(pretrained)}
results = evaluate.compare(methods, test_pairs, labels=names, progress=False)
evaluate.summary(results, metrics=("dice", "percent_folding", "seconds"), by=None)
"""),
code(r"""
mean_dice = {ev.name: float(np.nanmean(ev.dice.to_numpy(float))) for ev in results}
folds = {ev.name: float(ev.table()["percent_folding"].mean()) for ev in results}
fig = viz.plot_dice({k: ev.dice.to_numpy(float) for k, ev in zip(methods, results)
                     if k in ("identity", "VV-Net", "VV-Net, no deep supervision", "VV-Net (pre-trained)")}, labels=labels)
fig
"""),
code(r"""
with torch.no_grad():
    out_pre = pretrained(moving, fixed)
viewer = viz.SliceViewer(pair["fixed"][0], pair["moving"][0], out_pre.warped[0, 0], disp=out_pre.disp,
                         rows=["fixed", "warped", "grid"], index=profile.slices)
viewer
"""),
md(r"""
What to look for:

* with deep supervision, $\varphi_1$ alone is already a registration: it makes
  held-out pairs more similar (local NCC, checked at the end) and, after
  enough training, its Dice is above identity's (the pre-trained row); without
  it, $\varphi_1$ is free to be anything V-Net 2 can use, and its Dice on its
  own tells you little;
* deep supervision mainly helps the *optimisation* (gradients reach V-Net 1
  directly instead of through V-Net 2), which is expected to matter most early
  in training and for deep networks (Lee et al., *Deeply-Supervised Nets*,
  AISTATS 2015); these runs do not measure that. In the `ci` and `cpu` profiles both runs start from a
  network trained *with* deep supervision and take a few steps only, so their
  $\varphi_1$ is a registration either way (its Dice above identity's: checked)
  and their differences, printed below, are small (checked: under 0.02 Dice);
  the `gpu` profile trains both from scratch, long enough to compare them;
* the pre-trained VV-Net (trained with deep supervision) shows the end state:
  Dice above identity by more than 0.02, and its $\varphi_1$ alone already a registration
  (both checked, and printed below).
"""),
code(r"""
identity = mean_dice["identity"]
for name in methods:
    if name != "identity":
        print(f"{name:<32} {mean_dice[name]:.3f} Dice ({mean_dice[name] - identity:+.3f} over identity)")
ds_gap = mean_dice["VV-Net"] - mean_dice["VV-Net, no deep supervision"]
phi1_gap = mean_dice["phi1 of VV-Net"] - mean_dice["phi1 without deep supervision"]
print(f"with minus without deep supervision: final field {ds_gap:+.3f}, phi1 {phi1_gap:+.3f} Dice")
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
# The networks trained here must improve the similarity (local NCC, lower is better) as well as Dice.
with torch.no_grad():
    ncc = {k: float(np.mean([float(losses.ncc_local(p["fixed"][None], warp(p["moving"][None], disp(p))))
                             for p in test_pairs]))
           for k, disp in {"identity": lambda p: torch.zeros(1, 3, *p["fixed"].shape[1:]),
                           "VV-Net": lambda p: vvnet(p["moving"][None], p["fixed"][None]).disp,
                           "phi1 of VV-Net": lambda p: vvnet(p["moving"][None], p["fixed"][None]).stages[0]}.items()}
print("held-out local NCC (lower is better):", {k: round(v, 4) for k, v in ncc.items()})
MARGIN = 0.02
for name in ("VV-Net", "VV-Net, no deep supervision"):
    assert mean_dice[name] > mean_dice["identity"] + MARGIN, f"{name} (trained or fine-tuned here) should beat identity by more than {MARGIN} Dice: {mean_dice}"
assert ncc["VV-Net"] < ncc["identity"], f"trained VV-Net should make held-out pairs more similar: {ncc}"
assert ncc["phi1 of VV-Net"] < ncc["identity"], f"with deep supervision, phi1 alone should already improve the similarity: {ncc}"
assert mean_dice["VV-Net (pre-trained)"] > mean_dice["identity"] + 0.02, f"the pre-trained VV-Net should beat identity by more than 0.02 Dice: {mean_dice}"
assert mean_dice["phi1 of VV-Net (pre-trained)"] > mean_dice["identity"], f"with deep supervision, the pre-trained phi1 alone should beat identity: {mean_dice}"
assert mean_dice["VV-Net (pre-trained)"] >= mean_dice["phi1 of VV-Net (pre-trained)"] - 0.005, f"V-Net 2 should not undo phi1's work: {mean_dice}"
assert folds["VV-Net"] < 1.0 and folds["VV-Net (pre-trained)"] < 1.0, f"folding should stay below 1% of the voxels: {folds}"
assert checkpoints.load_checkpoint(checkpoint)["step"] == 500, "the prose says the pre-trained VV-Net took 500 steps"
if fine_tune:   # the short runs from one deep-supervised start: the claims of "What to look for"
    assert mean_dice["phi1 without deep supervision"] > mean_dice["identity"], f"starting from a deep-supervised network, phi1 should stay a registration after a few steps without deep supervision: {mean_dice}"
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
