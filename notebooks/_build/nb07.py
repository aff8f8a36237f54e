"""Notebook 07: affine + deformable pipelines, recursive cascades and pyramids."""
from _nb import PROFILE_CELL, code, md, write

cells = [
md(r"""
# 07 · Cascades and pyramids

One network, one forward pass, one field: VoxelMorph (notebook 06) has to get
large and small motions right at once. Three families of models split the work:

* **affine, then deformable**: the "ideal" pipeline of the registration survey (seed 001,
  section on pipelines): an affine network removes the global pose, a
  deformable U-Net the local differences, and a single spatial transformer warps
  the image once;
* **recursive cascades** (Zhao et al., *Recursive Cascaded Networks for
  Unsupervised Medical Image Registration*, ICCV 2019): register, warp, register
  the warped image again; with shared weights the same network can be applied
  more times at test time than in training;
* **pyramids** (Hu et al., *Dual-Stream Pyramid Registration Network*, MICCAI
  2019): coarse-to-fine inside one network, a residual field per resolution.

VV-Net (notebook 08) is a two-stage cascade with a pyramid-like helper network,
so this notebook is its background.

**Learning goals.** After this notebook you can

1. explain why cascades **compose fields** and warp the original image once,
   instead of warping a warped image again;
2. build the affine-then-deformable pipeline and read its affine matrix;
3. train recursive cascades with 1, 2 and 3 stages and run more recursions at
   test time;
4. explain how a pyramid network refines a field level by level;
5. compare every variant in one table: Dice over structures, folding, seconds.
"""),
code(PROFILE_CELL),
md(r"""
## 1. Data: subjects slightly out of pose

The subjects and test sets are notebooks 06, 08 and 10's: realistic subjects
(pose, the anatomy of a real brain, intensity changes) **pre-aligned to the
atlas with ANTs affine**, as the VV-Net paper prepares its data
(`datasets.RealisticPairs`), and new subjects of the training brains
("in-distribution") and of the two held-out donors ("held-out") for testing.
Everything runs on the 4 mm grid the pre-trained networks below know, in every
profile. The pre-alignment has already taken the pose out, so to give the
affine stage something to find, every subject gets a small random affine
misalignment on top of it (a few degrees, a few percent of scale, a few
millimetres of shift): `datasets.Misaligned`, which draws each pair's matrix
from a seed and keeps it, the known answer the affine stage is checked against.
"""),
code(r"""
import resource
import time
from pathlib import Path

import numpy as np
import torch

from regedu import checkpoints, datasets, evaluate, nets, train, viz
from regedu.losses import loss_terms
from regedu.spatial import warp

checkpoint = Path("checkpoints/brain_unet_4mm_semi_lr5e-4_s0.pt")
pyramid_checkpoint = Path("checkpoints/brain_pyramid_4mm_semi_lr5e-4_s0.pt")
affine_checkpoint = Path("checkpoints/brain_affine_4mm_mse_s0.pt")
states = {path: checkpoints.load_checkpoint(path) for path in (checkpoint, pyramid_checkpoint, affine_checkpoint)}
recipes = {path.name: checkpoints.training_recipe(state) for path, state in states.items()}
spacing = int(recipes[checkpoint.name]["spacing"][0])
atlas = datasets.mni_brain(spacing)
structures = atlas.structures()
labels = list(structures)
shape = tuple(atlas.image.shape[1:])


train_pairs = datasets.Misaligned(datasets.RealisticPairs(profile.n_train_pairs, anatomy="train", seed=0,
                                                         spacing_mm=spacing), seed=1)
n_test = max(1, profile.n_test_pairs // 2)
test_sets = datasets.course_test_sets({name: n_test for name in datasets.COURSE_TEST_SETS}, spacing_mm=spacing)
test_pairs, applied, poses = [], [], []
for k, pairs in enumerate(test_sets.values()):
    source = datasets.Misaligned(pairs, seed=100 + k, spacing_mm=spacing)
    test_pairs += [source[i] for i in range(len(pairs))]
    applied += [source.matrix(i) for i in range(len(pairs))]
    poses += [source.pose(i) for i in range(len(pairs))]
print(f"{len(train_pairs)} training pairs, test pairs:", {name: len(pairs) for name, pairs in test_sets.items()},
      f"on the {spacing} mm grid, {'x'.join(map(str, shape))}")
angles = np.abs([p["angles_deg"] for p in poses])
scales = np.abs([p["scales"] for p in poses]) - 1
shifts = np.abs([p["translation_mm"] for p in poses])
print(f"misalignment of the test pairs: rotations about each axis up to {angles.max():.1f} degrees, scalings up to "
      f"{100 * np.abs(scales).max():.1f} %, shifts along an axis up to {shifts.max():.1f} mm "
      f"({shifts.max() / atlas.spacing_mm:.1f} voxels)")
"""),
md(r"""
**Budget.** Training five 3D networks from scratch is far beyond a CPU
notebook. So every variant that contains a VoxelMorph U-Net **starts from the
VoxelMorph the project trained on these subjects**
(`checkpoints/brain_unet_4mm_semi_lr5e-4_s0.pt`, seed 0 of notebook 10's
semi-supervised comparison, made by `regedu train`; the command is printed
below) and is fine-tuned for a few steps (the number is printed with each run)
at $10^{-4}$ on this notebook's misaligned pairs, with the checkpoint's own
loss (local NCC + diffusion + the Dice term, read from the file). The pyramid
network has different layers: it starts from its own checkpoint, made by the
same command with `--model pyramid` (`checkpoints/brain_pyramid_4mm_semi_lr5e-4_s0.pt`,
printed in section 4: the same data, steps, batch, learning rate and loss),
and is fine-tuned the same way. The `gpu` profile fine-tunes for the profile's
steps.
"""),
code(r"""
print(checkpoints.checkpoint_note(checkpoint, states[checkpoint]))
unet = checkpoints.load_model(states[checkpoint])
steps = {"ci": 10, "cpu": 20}.get(profile.name, profile.steps_3d)
lr = 1e-4
losses = recipes[checkpoint.name]["losses"]
print("the checkpoint's loss:", losses)
seconds = {}


def fit(model, n_steps, name, lr=lr):
    torch.manual_seed(0)
    start = time.perf_counter()
    history = train.fit(model.train(), train_pairs, losses=losses, steps=n_steps, lr=lr, labels=labels,
                        grad_clip=1.0, progress=False)
    seconds[name] = time.perf_counter() - start
    # (The logged loss of single pairs is too noisy over a few steps to say which way it went.)
    print(f"{name}: {sum(p.numel() for p in model.parameters()):,} parameters, {n_steps} steps at {spacing} mm "
          f"in {seconds[name]:.0f} s")
    return model.eval(), history
"""),
md(r"""
## 2. Affine, then deformable

`nets.AffineThenDeformable` (registry `"affine_unet"`) runs an `AffineNet`
(strided convolutions, global average pooling, a linear layer to the 12
parameters $[A \mid t]$, exactly the identity at initialisation) on the pair,
warps the moving image by it, runs a VoxelMorph U-Net on the result and returns

$$u = \mathrm{compose}(u_{\text{affine}}, u_{\text{deformable}}), \qquad \hat M = M \circ (\varphi_{\text{affine}} \circ \varphi_{\text{deformable}}),$$

warping the *original* image once. The affine field is also returned in
`output.deep`, so the trainer supervises the affine stage on its own: it must
align the pair as well as an affine map can, a true pre-alignment.

**Both stages start trained.** A few fine-tuning steps are not expected to
teach an affine network to read a pose from two images (how far does one
started at the identity get? exercise 5 measures it). So the affine stage starts from an `AffineNet`
the project trained alone on the training subjects, misaligned by the same
generator with other seeds (`regedu train --misalign --model affine`, MSE; the
command is printed below), and the deformable stage from the pre-trained
U-Net. Before fine-tuning, the pipeline is exactly those two networks one after
the other (checked below on a training pair).
"""),
code(r"""
print(checkpoints.checkpoint_note(affine_checkpoint, states[affine_checkpoint]))
affine_net = checkpoints.load_model(states[affine_checkpoint])
inner = nets.create("affine_unet", spatial_dims=3)
inner.affine.load_state_dict(affine_net.state_dict())
inner.deformable.load_state_dict(unet.state_dict())
probe = {k: train_pairs[0][k][None] for k in ("moving", "fixed")}
with torch.no_grad():
    first = affine_net(probe["moving"], probe["fixed"])
    stages = inner(probe["moving"], probe["fixed"]).stages
    gap = max(float((stages[0] - first.disp).abs().max()),
              float((stages[1] - unet(first.warped, probe["fixed"]).disp).abs().max()))
print(f"before fine-tuning, pipeline vs the two trained networks in a row: stage fields differ by at most {gap:.1e} voxels")
pipeline, pipeline_history = fit(inner, steps, "affine + deformable")
pair = test_pairs[0]
with torch.no_grad():
    matrix = pipeline.affine.matrix(pair["moving"][None], pair["fixed"][None])[0]
    out = pipeline(pair["moving"][None], pair["fixed"][None])
np.set_printoptions(precision=3, suppress=True)
print("predicted [A | t] of the first test pair (4 mm voxels):\n", matrix.numpy())
print("stages:", [tuple(s.shape) for s in out.stages], " deep:", len(out.deep))
"""),
md(r"""
**Does the affine stage find the pose?** Every test pair was misaligned by a
known matrix, so the answer is known: the map that undoes it,
$x \mapsto L^{-1}(x - c - T) + c$ for the applied $x \mapsto L(x - c) + c + T$
about the image centre $c$. On every test pair (pre-aligned by ANTs before
the misalignment was added, so that inverse is the whole affine answer up to
the pre-alignment's own error) we measure the mean distance, in mm over the brain,
between each affine stage's map and that answer: for the identity (no stage),
for the trained affine network as shipped, for the pipeline's affine stage
after fine-tuning, and for an affine found by optimisation
on the pair itself (`regedu.classic.affine_register`, notebook 03; coarse to
fine down to 4 mm), the pre-alignment the VV-Net paper gets from ANTs.
"""),
code(r"""
from regedu.classic import affine_register, displacement_to_affine

centre = np.array([(n - 1) / 2 for n in shape])
brain = np.argwhere(test_pairs[0]["fixed_seg"][0].numpy() > 0)[::5].astype(float)   # fixed = the atlas, every pair


def undo(m):
    # The map that undoes the applied misalignment x -> L (x - c) + c + T.
    inverse = np.linalg.inv(m[:, :3])
    return lambda x: (x - centre) @ inverse.T + centre - inverse @ m[:, 3]


def error_mm(mapping, m):
    return float(np.linalg.norm(mapping(brain) - undo(m)(brain), axis=1).mean()) * atlas.spacing_mm


errors = {"identity": [], "trained affine network": [], "learned affine stage": [], "optimised affine": []}
dets = {k: [] for k in list(errors)[1:]}
learned_networks = {"trained affine network": affine_net, "learned affine stage": pipeline.affine}
start = time.perf_counter()
for p, m in zip(test_pairs, applied):
    optimised = displacement_to_affine(affine_register(p["moving"][None], p["fixed"][None],
                                                       levels=(4, 2, 1), iterations=(60, 30, 10)))
    errors["identity"].append(error_mm(lambda x: x, m))
    errors["optimised affine"].append(error_mm(lambda x: x @ optimised[:3, :3].T + optimised[:3, 3], m))
    dets["optimised affine"].append(float(np.linalg.det(optimised[:3, :3])))
seconds["optimised affine, per pair"] = (time.perf_counter() - start) / len(test_pairs)
for name, net in learned_networks.items():
    for p, m in zip(test_pairs, applied):
        with torch.no_grad():
            a = net.matrix(p["moving"][None], p["fixed"][None])[0].double().numpy()
        errors[name].append(error_mm(lambda x: (x - centre) @ a[:, :3].T + centre + a[:, 3], m))
        dets[name].append(float(np.linalg.det(a[:, :3])))
pose_error = {k: float(np.mean(v)) for k, v in errors.items()}
for k, v in pose_error.items():
    print(f"{k:<22} {v:5.2f} mm from the known answer" + (f", det A {np.round(dets[k], 3).tolist()}" if k in dets else ""))
recovered = {k: 1 - pose_error[k] / pose_error["identity"] for k in dets}
print(f"-> on test pairs it never trained on, the trained affine network removes "
      f"{recovered['trained affine network']:.0%} of the misalignment in one forward pass, "
      f"{recovered['learned affine stage']:.0%} as the pipeline's stage after {steps} fine-tuning steps; "
      f"the optimised affine {recovered['optimised affine']:.0%} ({seconds['optimised affine, per pair']:.1f} s a pair)")
"""),
md(r"""
## 3. Recursive cascades

A cascade applies a registration network $k$ times. Stage $j$ registers the
*current* warped image to the fixed image and predicts $u_j$; the total field is
composed, $u \leftarrow \mathrm{compose}(u, u_j)$, and the original image is
warped by it once. Why compose instead of warping the warped image again? Each
warp interpolates the image: warping three times, stage by stage, keeps less
of the image's sharpness than warping once by the composed field (measured
below, and checked at the end). Composing interpolates
the *fields* instead, which are smooth, and the image only once.

With **shared weights** (`shared=True`) the cascade is one network applied
recursively. RCN trains it with a fixed number of recursions and applies more at
test time. Here every cascade starts from the same pre-trained U-Net (the
checkpoint) and is fine-tuned with its own number of recursions, 1, 2 or 3
(the whole unrolled cascade is trained end to end: the loss is on the final
warped image); n recursions cost n times a step, so the 2- and 3-stage
cascades get half the single stage's steps.
"""),
code(r"""
def cascade(n):
    stage_kwargs = {k: v for k, v in unet.config.items() if k not in ("name", "spatial_dims", "in_channels")}
    model = nets.create("cascade", spatial_dims=3, n_stages=n, shared=True, stage="unet", stage_kwargs=stage_kwargs)
    model.stages[0].load_state_dict(unet.state_dict())
    return model


cascades = {1: fit(cascade(1), steps, "cascade, 1 stage")[0]}
for n in (2, 3):  # n recursions cost n times a step: fewer steps, the same start
    cascades[n] = fit(cascade(n), max(1, steps // 2), f"cascade, {n} stages")[0]

with torch.no_grad():
    out3 = cascades[3](pair["moving"][None], pair["fixed"][None])
stage_motion = [float(u.norm(dim=1).mean()) for u in out3.stages]
print("per-stage fields of the 3-stage cascade, mean |u_j| (voxels):", [round(m, 3) for m in stage_motion])

# The blur of warping a warped image: the same three stage fields, applied one warp at a time.
with torch.no_grad():
    again = pair["moving"][None]
    for u in out3.stages:
        again = warp(again, u)
sharpness = {name: float(sum(g.square().mean() for g in torch.gradient(image[0, 0])))
             for name, image in (("moving", pair["moving"][None]), ("warped once by the composed field", out3.warped),
                                 ("warped three times, stage by stage", again))}
print("image sharpness, mean squared intensity gradient:", {k: round(v, 5) for k, v in sharpness.items()})
print(f"warping three times keeps {sharpness['warped three times, stage by stage'] / sharpness['warped once by the composed field']:.0%} "
      f"of the sharpness of warping once by the composed field")
"""),
md(r"""
The later stages move less: each one only corrects what the previous stages
left. Now the test-time trick: apply the 3-stage cascade with 4 and 5 recursions.
`evaluate` accepts any callable `(moving, fixed) -> output`.
"""),
code(r"""
def recursions(cascade, n):
    def method(moving, fixed):
        with torch.no_grad():
            return cascade(moving, fixed, n_stages=n)
    return method


methods = {f"cascade, {n} stage{'s' if n > 1 else ''}": cascades[n] for n in (1, 2, 3)}
methods.update({f"cascade 3, {n} recursions at test": recursions(cascades[3], n) for n in (4, 5)})
"""),
md(r"""
## 4. A pyramid network

`nets.PyramidNet` (registry `"pyramid"`) follows Dual-PRNet's idea: one encoder
(shared weights) turns the moving and the fixed image *separately* into feature
pyramids. At the coarsest level a head predicts a field from both; at each finer
level the field is upsampled (its values doubled with the grid), the moving
*features* are warped by it, and a head predicts a residual field that is
composed with it. Large motions are found where they are small in voxels, at
coarse resolution; details are added on the way up.
"""),
code(r"""
def training_loss(model, n=3):
    # The loss on the first n training pairs, the same pairs every time (the logged training
    # loss changes with the pair drawn at each step, too noisy over a few steps).
    with torch.no_grad():
        return float(np.mean([float(loss_terms(model(p["moving"][None], p["fixed"][None]), p["moving"][None],
                                                     p["fixed"][None], losses=losses, moving_seg=p["moving_seg"][None],
                                                     fixed_seg=p["fixed_seg"][None], labels=labels)["loss"])
                              for p in (train_pairs[i] for i in range(n))]))


print(checkpoints.checkpoint_note(pyramid_checkpoint, states[pyramid_checkpoint]))
pyramid = checkpoints.load_model(states[pyramid_checkpoint])
pyramid_before = training_loss(pyramid)
pyramid, pyramid_history = fit(pyramid, steps, "pyramid")
pyramid_after = training_loss(pyramid)
print(f"pyramid: loss on 3 training pairs {pyramid_before:.4f} -> {pyramid_after:.4f}")
with torch.no_grad():
    outp = pyramid(pair["moving"][None], pair["fixed"][None])
print("field after each level, coarse to fine, mean |u| (voxels):",
      [round(float(u.norm(dim=1).mean()), 3) for u in outp.stages])
"""),
md(r"""
## 5. One table

Same test pairs, same metrics, every variant, in-distribution and held-out
apart. "identity" is the Dice of the misaligned pairs before registration.
Seconds are per pair on this machine (training times are printed
above).
"""),
code(r"""
methods = {"identity": evaluate.identity, "pre-trained U-Net (no fine-tuning)": unet.eval(),
           "affine + deformable": pipeline, **methods, "pyramid": pyramid}
results = evaluate.compare(methods, test_pairs, labels=structures, progress=False)
table_all = evaluate.summary(results, metrics=("dice", "percent_folding", "seconds"), by="dataset")
table_all
"""),
code(r"""
mean_dice = {ev.name: ev.mean_dice() for ev in results}
folds = {ev.name: float(ev.table()["percent_folding"].mean()) for ev in results}
fig = viz.plot_dice({k: ev.dice.to_numpy(float) for k, ev in zip(methods, results)
                     if k in ("identity", "affine + deformable", "cascade, 1 stage", "cascade, 3 stages", "pyramid")},
                    labels=labels)
fig
"""),
code(r"""
with torch.no_grad():
    views = {"fixed": pair["fixed"][0], "moving": pair["moving"][0],
             "1 stage": cascades[1](pair["moving"][None], pair["fixed"][None]).warped[0, 0],
             "3 stages": out3.warped[0, 0], "pyramid": outp.warped[0, 0]}
fig = viz.plot_slices(views)   # the middle slices of the 4 mm grid
fig
"""),
md(r"""
How to read the table (each statement is printed from the numbers below,
so it says what this run measured):

* how much of the work the pre-trained U-Net already does, and which variants
  built on it keep or improve its Dice;
* the affine-then-deformable pipeline is built to take out the pose change
  that the U-Net was never trained on; how much of it its trained affine
  stage removed, against an optimised affine, was measured in section 2 and
  is printed again below;
* whether more cascade stages help, whether the returns diminish, and whether
  the extra test-time recursions add or cost Dice (printed below): each stage
  is trained to correct the residual of the previous one, and applied beyond
  the depth it was trained at it may over-correct. The price is time: $k$
  stages cost $k$ forward passes;
* the pyramid network is meant to reach large displacements through its
  coarse levels (the |u| of each level is printed above) at the cost of one
  network; its checkpoint had the U-Net's data, steps and loss (compare the
  two commands printed above), but it has more parameters (both counts are
  printed with the fine-tuning runs).

A few test pairs and short fine-tuning runs make this a demonstration, not a
ranking; the `gpu` profile trains long enough for the ordering to mean something.
"""),
code(r"""
reference = mean_dice["pre-trained U-Net (no fine-tuning)"]
best = max((k for k in mean_dice if k != "identity"), key=mean_dice.get)
share = (reference - mean_dice["identity"]) / (mean_dice[best] - mean_dice["identity"])
print(f"the pre-trained U-Net gains {reference - mean_dice['identity']:+.3f} Dice over identity, "
      f"{share:.0%} of the best variant's gain ({best}, {mean_dice[best] - mean_dice['identity']:+.3f})")
print("against the pre-trained U-Net:")
for name, value in mean_dice.items():
    if name not in ("identity", "pre-trained U-Net (no fine-tuning)"):
        verdict = "keeps or improves" if value >= reference - 0.005 else "LOSES"
        print(f"  {name:<34} {value - reference:+.3f} Dice  ({verdict})")
gain = {n: mean_dice[f"cascade, {n} stage{'s' if n > 1 else ''}"] for n in (1, 2, 3)}
gain.update({n: mean_dice[f"cascade 3, {n} recursions at test"] for n in (4, 5)})
print(f"what the affine stage adds: affine + deformable {mean_dice['affine + deformable'] - mean_dice['cascade, 1 stage']:+.3f} Dice "
      f"over the same U-Net fine-tuned for the same steps without it (cascade, 1 stage)")
print(f"pose change removed (section 2): trained affine network {recovered['trained affine network']:.0%}, "
      f"after fine-tuning {recovered['learned affine stage']:.0%}, optimised affine {recovered['optimised affine']:.0%}")
steps_up = [gain[n + 1] - gain[n] for n in (1, 2, 3, 4)]
NOISE = 0.005   # a change this small is not read as a trend (the pairs' Dice spread is in the table above)
trend = (f"both within {NOISE} Dice: no measurable change" if max(map(abs, steps_up[:2])) < NOISE else
         "diminishing returns" if steps_up[1] < steps_up[0] else "NOT diminishing")
print(f"cascade stages 1 -> 2 -> 3: {steps_up[0]:+.3f}, {steps_up[1]:+.3f} Dice ({trend}); "
      f"test-time recursions 3 -> 4 -> 5: {steps_up[2]:+.3f}, {steps_up[3]:+.3f} Dice")
seconds_pair = {ev.name: float(ev.table()["seconds"].mean()) for ev in results}
print(f"seconds per pair: 1 stage {seconds_pair['cascade, 1 stage']:.2f}, 3 stages {seconds_pair['cascade, 3 stages']:.2f} "
      f"({seconds_pair['cascade, 3 stages'] / seconds_pair['cascade, 1 stage']:.1f} times)")
"""),
md(r"""
## Exercises

1. Train the 3-stage cascade from scratch (no warm start from the pre-trained
   U-Net). Better or worse than fine-tuning, for the same number of steps?
2. Make a cascade with `shared=False` (three separate networks). Can it run 5
   recursions at test time? Read the error message.
3. Set `supervise_affine=False` in the pipeline: print the affine matrix again.
   Is it still a pre-alignment?
4. Add a 6th recursion. How do Dice and folding change with each extra recursion?
5. Build the pipeline without loading the trained affine network (its affine
   stage then starts at the identity), fine-tune it as in section 2 and
   measure how much of the misalignment its affine stage removes. Then train
   `nets.create("affine", spatial_dims=3)` alone with `train.fit` on
   `train_pairs` (MSE, lr 1e-3) for 200, 500 and 1000 steps: how many does it
   need before it helps on the test pairs?

## Checks
"""),
code(r"""
print({k: round(v, 4) for k, v in mean_dice.items()})
trained_here = [k for k in methods if k != "identity"]
assert all(mean_dice[k] > mean_dice["identity"] + 0.02 for k in trained_here), f"every variant should beat identity by more than 0.02 Dice: {mean_dice}"
assert mean_dice["cascade, 3 stages"] >= mean_dice["cascade, 1 stage"] - 0.005, f"3 cascade stages should be at least as good as 1: {mean_dice}"
assert mean_dice["cascade, 2 stages"] >= mean_dice["cascade, 1 stage"] - 0.005, f"2 cascade stages should be at least as good as 1: {mean_dice}"
assert pyramid_after < pyramid_before, f"fine-tuning should lower the pyramid's loss on its training pairs: {pyramid_before:.4f} -> {pyramid_after:.4f}"
assert stage_motion[0] > stage_motion[1] > stage_motion[2], f"the later cascade stages should move less: {stage_motion}"
assert len(out3.stages) == 3, f"a 3-stage cascade returns its 3 stage fields, got {len(out3.stages)}"
# The known misalignment is the answer: the identity (an untrained stage) is 0 % of the way there.
assert pose_error["optimised affine"] < 0.5 * pose_error["identity"], f"an affine stage that works should remove more than half of the known misalignment: {pose_error}"
assert min(recovered["trained affine network"], recovered["learned affine stage"]) > 0.3, f"the trained affine network, alone and as the pipeline's stage, should remove more than 30 % of the misalignment of test pairs it never saw: {recovered}"
assert mean_dice["affine + deformable"] > mean_dice["pre-trained U-Net (no fine-tuning)"] + 0.02, f"the pipeline should beat the pre-trained U-Net by more than 0.02 Dice: {mean_dice}"
# The affine stage's credit: against the same U-Net fine-tuned for the same steps without it.
assert mean_dice["affine + deformable"] > mean_dice["cascade, 1 stage"] + 0.02, f"taking the pose out first should raise the Dice of the U-Net fine-tuned alone by more than 0.02: {mean_dice}"
# The prose of section 2: the affine network learned alone, by MSE, on the training subjects misaligned again.
affine_recipe = recipes[affine_checkpoint.name]
assert (affine_recipe["model"], affine_recipe["data"], affine_recipe["misalign"], affine_recipe["losses"]) == ("affine", "subjects", True, {"mse": 1.0}), affine_recipe
assert all(0.8 < d < 1.25 for v in dets.values() for d in v), f"each affine stage should stay a plausible affine map (the applied scalings are within 4 %): det A = {dets}"
assert sharpness["warped once by the composed field"] > sharpness["warped three times, stage by stage"], f"warping once by the composed field should keep the image sharper than warping three times: {sharpness}"
assert all(f < 1.0 for f in folds.values()), f"folding should stay below 1% of the voxels: {folds}"
assert gap < 1e-3, f"before fine-tuning the pipeline should be the two trained networks in a row (fields differ by {gap:.1e} voxels)"
budgets = {name: {k: v for k, v in r.items() if k not in ("model", "parameters", "validation_dice")} for name, r in recipes.items()}
assert budgets[checkpoint.name] == budgets[pyramid_checkpoint.name], f"the prose says the pyramid had the U-Net's data, steps and loss: {budgets}"
assert recipes[pyramid_checkpoint.name]["parameters"] > recipes[checkpoint.name]["parameters"], f"the prose says the pyramid has more parameters: {recipes}"
print("all checks passed")
print(f"peak memory of this kernel: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
"""),
]

if __name__ == "__main__":
    print(write("07_cascades_and_pyramids.ipynb", cells))
