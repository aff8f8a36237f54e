"""Notebook 16: supervised regression on classical fields (Cao et al.), SVF-Net, joint
segmentation and registration."""
from _nb import PROFILE_CELL, code, md, write

cells = [
md(r"""
# 16 · Learning from fields, and learning two tasks at once

Notebook 05 trained a network on *synthetic* fields (RegNet). Two MICCAI 2017
papers of the review in seed 002 take other routes to a supervised target, and
the survey (seed 001) describes a model that segments and registers at once:

1. **Cao et al. 2017**, similarity-steered CNN regression: register the
   training pairs with a classical method and train a network to *regress* those
   fields; the network also reads similarity maps of the pair at several scales.
   The prize: one forward pass instead of an optimisation per pair.
2. **SVF-Net** (Rohé et al. 2017): regress a *stationary velocity field* and
   integrate it by scaling and squaring; the loss is on the velocity. The prize:
   a diffeomorphism, so (up to the discretisation) little or no folding.
3. **Joint segmentation and registration** (the survey's FCN model, Wu et al.
   2019): a registration branch and a segmentation branch trained together, each
   feeding the other through a consistency term.
4. **Shan et al. 2017** (seed 004), as the paper does it: an L2 photometric loss
   inside a region of interest, edge-aware smoothness, and more *unlabelled*
   training pairs.

Each method is trained here at a small budget on 2D brain slices (fundus images
for Shan et al.) and measured on held-out test pairs against a baseline trained
or run at the same budget.

**Learning goals.** After this notebook you can

1. make regression targets with a classical method and say what a regression
   network gains (time) and loses (accuracy) against its teacher;
2. train a network on known velocities, integrate them, and measure folding
   against direct displacement regression;
3. write a joint objective (registration + segmentation + consistency) and test
   whether each task helps the other;
4. train with a masked photometric loss and edge-aware smoothness, and measure
   what extra unlabelled pairs buy;
5. put a paper's claim beside your own measurement and say whether it is reproduced.
"""),
code(PROFILE_CELL),
code(r"""
import time

import numpy as np
import torch
import matplotlib.pyplot as plt

from regedu import losses, metrics, nets
from regedu.datasets import BrainPairs, FundusPairs, mni_brain, vessel_contrast
from regedu.evaluate import dice_per_pair
from regedu.joint import JointModel, joint_step
from regedu.spatial import jacobian_determinant
from regedu.stats import paired_test
from regedu.supervised import (classical_targets, fit_objective, shan_loss, similarity_maps,
                               similarity_steered_net, velocity_loss, velocity_pairs)
from regedu.train import fit

started = time.perf_counter()
# Every profile works on 4 mm slices (40x48): learning from few pairs is the point here, and the larger
# profiles (cpu, gpu) spend their budget on more pairs and steps, which we expect to teach more than more pixels.
atlas = mni_brain(4)
small = profile.name == "ci"
n_train, n_val, n_test = (32, 4, 16) if small else (96, 8, 32)
steps = 200 if small else 500
batch_size = 4
# Smooth, large deformations (velocity 3 voxels on a 16-voxel control grid): the motion a small
# network can learn from a few dozen pairs (we expect the default, 1.5 voxels on a 4-voxel grid, to need hundreds).
deformation = dict(max_velocity=3.0, control=16)
unet = dict(encoder=(8, 16, 16), decoder=(16, 16, 16, 8))


def stack(pairs):
    items = [pairs[i] for i in range(len(pairs))]
    return {k: torch.stack([it[k] for it in items]) for k in ("moving", "fixed", "moving_seg", "fixed_seg")}


def take(data, index):
    return {k: v[index] for k, v in data.items()}


def pair_dice(disp, data, labels):
    # Mean Dice over `labels` of each pair: the moving labels warped with nearest neighbour.
    return dice_per_pair(data["fixed_seg"], data["moving_seg"], disp, labels)


def folding(disp):
    return metrics.folding_stats(disp)["percent_folding"]


# Sections 1 and 2: subjects registered to the atlas, as Cao et al. register subjects to a template.
to_atlas = stack(BrainPairs(n_train + n_val + n_test, atlas=atlas, mode="atlas", ndim=2, seed=1600, cache=True,
                            **deformation))
train_idx, val_idx = np.arange(n_train), np.arange(n_train, n_train + n_val)
test_idx = np.arange(n_train + n_val, n_train + n_val + n_test)
shape = tuple(to_atlas["moving"].shape[2:])
structures = metrics.labels_present(to_atlas["fixed_seg"], to_atlas["moving_seg"])
print(f"{len(to_atlas['moving'])} subject-to-atlas pairs of {shape} slices ({n_train} train, {n_val} validation, "
      f"{n_test} test), {len(structures)} structures; {steps} training steps per network")
"""),
md(r"""
## 1. Cao et al. 2017: regress the fields of a classical method

What seed 002 says (MICCAI 2017, §3.2.1): brain MR of LONI (40 images) and ADNI
(30); a first part turns the template and the subject into *similarity maps*
"like heat maps", computed with four kernel sizes "to remove the influence of
the kernel size", fed with the images to a regression network that predicts the
displacement of patch centres (interpolated by B-splines between them). On Dice of
grey and white matter it reaches accuracy "basically on a par" (基本旗鼓相当) with
Demons and SyN. (The review files the paper under *unsupervised* learning because
no synthetic field is generated; the paper's targets are the fields of a
classical registration, which is how we do it here.)

Our version: the targets are dense instance optimisation (notebook 03; local NCC
+ diffusion, coarse to fine) of each training pair, `classical_targets`; the
similarity maps are the local squared difference of the pair averaged over
Gaussian windows of 1, 2, 4 and 8 pixels (`similarity_maps`); the network is a
small U-Net on the pair and its four maps, trained with `regedu.train.fit` on the
`"field"` term (mean squared field error), as notebook 05's supervised network.
Baselines on the test pairs: no registration (identity), and the teacher itself,
in accuracy and in time per pair.
"""),
code(r"""
classical = dict(similarity=losses.NCC(window=7), weight=1.0, levels=(2, 1), iterations=(40, 25), lr=0.1)
start = time.perf_counter()
targets, _ = classical_targets(to_atlas["moving"][train_idx], to_atlas["fixed"][train_idx], **classical)
val_targets, _ = classical_targets(to_atlas["moving"][val_idx], to_atlas["fixed"][val_idx], **classical)
target_seconds = time.perf_counter() - start
test_data = take(to_atlas, test_idx)
teacher_disp, _ = classical_targets(test_data["moving"], test_data["fixed"], **classical)
# Its time per pair, what the network replaces: timed on 4 test pairs registered one at a time
# (the batch above shares each Adam step among its pairs).
teacher_seconds = float(np.mean([classical_targets(test_data["moving"][i:i + 1], test_data["fixed"][i:i + 1],
                                                   **classical)[1] for i in range(4)]))
print(f"targets of {n_train + n_val} pairs in {target_seconds:.1f} s")

sigmas = (1.0, 2.0, 4.0, 8.0)
maps = similarity_maps(test_data["moving"][:1], test_data["fixed"][:1], sigmas=sigmas)
fig, axes = plt.subplots(1, 1 + len(sigmas), figsize=(16, 3))
im = axes[0].imshow(test_data["moving"][0, 0], cmap="gray"); fig.colorbar(im, ax=axes[0], label="intensity")
axes[0].set_title("moving (a subject)")
for ax, sigma, m in zip(axes[1:], sigmas, maps[0]):
    im = ax.imshow(m, cmap="magma"); fig.colorbar(im, ax=ax, label="local squared difference")
    ax.set_title(f"similarity map, sigma = {sigma:g} px")
for ax in axes:
    ax.set_xlabel("inferior-superior (pixels)"); ax.set_ylabel("left-right (pixels)")
plt.tight_layout(); plt.show()
"""),
code(r"""
def as_items(data, disp):
    return [{"moving": m, "fixed": f, "disp": d} for m, f, d in zip(data["moving"], data["fixed"], disp)]


train_items = as_items(take(to_atlas, train_idx), targets)
val_items = as_items(take(to_atlas, val_idx), val_targets)
cao_models, cao_histories, cao_seconds = {}, {}, {}
for name, build in [("Cao et al. (pair + similarity maps)", lambda: similarity_steered_net(2, **unet))]:
    torch.manual_seed(0)
    cao_models[name] = build()
    start = time.perf_counter()
    cao_histories[name] = fit(cao_models[name], train_items, val_data=val_items, losses={"field": 1.0}, steps=steps,
                              lr=3e-3, batch_size=batch_size, val_every=steps // 10, seed=0, progress=False)
    cao_seconds[name] = time.perf_counter() - start

fig, ax = plt.subplots(figsize=(7, 3.4))
for k, (name, h) in enumerate(cao_histories.items()):
    ax.plot(h["train"]["step"], h["train"]["loss"], color=f"C{k}", alpha=0.4, label=f"{name}: training")
    ax.plot(h["val"]["step"], h["val"]["loss"], "o-", color=f"C{k}", label=f"{name}: validation")
ax.set_xlabel("step"); ax.set_ylabel("field MSE against the classical field (px²)"); ax.set_yscale("log")
ax.legend(fontsize=8); plt.tight_layout(); plt.show()
"""),
code(r"""
cao_results = {"identity": {"disp": torch.zeros_like(teacher_disp), "seconds": 0.0},
               "classical (the teacher)": {"disp": teacher_disp, "seconds": teacher_seconds}}
for name, model in cao_models.items():
    with torch.no_grad():
        start = time.perf_counter()
        disp = torch.cat([model(test_data["moving"][i:i + 1], test_data["fixed"][i:i + 1]).disp for i in range(n_test)])
    cao_results[name] = {"disp": disp, "seconds": (time.perf_counter() - start) / n_test}
for name, r in cao_results.items():
    r["dice"] = pair_dice(r["disp"], test_data, structures)
    r["error"] = float((r["disp"] - teacher_disp).norm(dim=1).mean())
    print(f"{name:>36}: Dice {r['dice'].mean():.3f} ± {r['dice'].std():.3f}, distance to the teacher's field "
          f"{r['error']:.2f} px, {folding(r['disp']):.2f} % folding, {1000 * r['seconds']:.1f} ms per pair")

cao_name = "Cao et al. (pair + similarity maps)"
cao, teach, ident = cao_results[cao_name], cao_results["classical (the teacher)"], cao_results["identity"]
gap = (teach["dice"].mean() - cao["dice"].mean()) / (teach["dice"].mean() - ident["dice"].mean())
print(f"-> the regression network is {teach['seconds'] / cao['seconds']:.0f}x faster than its teacher and "
      f"{'beats' if cao['dice'].mean() > ident['dice'].mean() else 'does NOT beat'} identity in Dice; it recovers "
      f"{1 - gap:.0%} of the teacher's Dice gain over identity.")
print(f"-> Cao et al. report Dice 'on a par' with the classical methods they learn from; on a par with "
      f"its teacher here (within 10 % of its gain): "
      + ("reproduced." if gap < 0.1 else f"NOT reproduced at this budget ({n_train} training pairs, {steps} steps)."))

i = 0
top = float(max(r["disp"][i].norm(dim=0).max() for r in cao_results.values()))
fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
for ax, name in zip(axes, ["classical (the teacher)", cao_name]):
    im = ax.imshow(cao_results[name]["disp"][i].norm(dim=0), cmap="viridis", vmin=0, vmax=top)
    fig.colorbar(im, ax=ax, label="|u| (pixels)")
    ax.set_title(name, fontsize=10); ax.set_xlabel("inferior-superior (pixels)"); ax.set_ylabel("left-right (pixels)")
plt.tight_layout(); plt.show()
"""),
md(r"""
## 2. SVF-Net: regress a velocity, integrate it

What seed 002 says (§3.1.2): 187 end-diastolic cardiac CT images, inputs
64×64×16; a 3D U-Net takes the two images and outputs a stationary velocity field
(SVF); "the difference between the output and the actual SVF is the network's
loss" (the SVF is the label). Training: 1000k iterations, about 20 h on a TitanX;
making the SVF labels took 6 h per image on one CPU core (a cluster for 150
images). The comparison with the LCC-Demons optimisation is shown as pictures,
not numbers.

Our version: pairs made with a *known* velocity (`velocity_pairs`: a smooth random
$v$, $u = \exp(v)$ by scaling and squaring, fixed $=$ moving warped by $u$), so the
labels cost nothing. SVF-Net predicts $v$ (`integrate_steps=7`) and is trained on
`velocity_loss`, the MSE of the velocity; the baseline is the same U-Net
regressing the displacement $u$ directly (field MSE on $u$), same pairs, same
steps. Both are trained by `fit_objective`, a loop that carries the velocity
(`regedu.train.fit` carries only the terms it knows).
"""),
code(r"""
amplitude = 3.0
svf_train = velocity_pairs(to_atlas["moving"][train_idx], 2 * n_train, amplitude=amplitude, points=5, seed=1)
svf_val = velocity_pairs(to_atlas["moving"][val_idx], n_val, amplitude=amplitude, points=5, seed=2)
svf_test = velocity_pairs(to_atlas["moving"][test_idx], n_test, amplitude=amplitude, points=5, seed=3)


def displacement_loss(output, batch):
    return losses.field_mse(output.disp, batch["disp"])


svf_models, svf_histories = {}, {}
for name, integrate, objective in [("SVF-Net (velocity, integrated)", 7, velocity_loss),
                                   ("displacement regression", 0, displacement_loss)]:
    torch.manual_seed(0)
    svf_models[name] = nets.create("unet", spatial_dims=2, integrate_steps=integrate, **unet)
    svf_histories[name] = fit_objective(svf_models[name], svf_train, objective, steps=steps, lr=3e-3,
                                        batch_size=batch_size, val_data=svf_val, seed=0)

fig, axes = plt.subplots(1, 2, figsize=(12, 3.4))
for ax, (name, h) in zip(axes, svf_histories.items()):
    ax.plot(np.arange(1, steps + 1), h["train"], alpha=0.5, label="training")
    ax.plot(h["val_step"], h["val"], "o-", label="validation")
    ax.set_title(name); ax.set_xlabel("step"); ax.set_yscale("log"); ax.legend()
    ax.set_ylabel("velocity MSE (px²)" if "SVF" in name else "displacement MSE (px²)")
plt.tight_layout(); plt.show()

svf_results = {"identity": torch.zeros_like(svf_test["disp"])}
with torch.no_grad():
    for name, model in svf_models.items():
        svf_results[name] = model(svf_test["moving"], svf_test["fixed"]).disp
svf_error, svf_folding, svf_pair_folding = {}, {}, {}
for name, disp in svf_results.items():
    svf_error[name] = (disp - svf_test["disp"]).norm(dim=1).mean((1, 2)).numpy()
    svf_folding[name] = folding(disp)
    svf_pair_folding[name] = np.array([folding(d[None]) for d in disp])
    print(f"{name:>32}: end-point error {svf_error[name].mean():.2f} px, {svf_folding[name]:.3f} % folding "
          f"({(svf_pair_folding[name] > 0).sum()} of {n_test} test pairs fold)")
svf_name, disp_name = "SVF-Net (velocity, integrated)", "displacement regression"
print(f"-> true fields: {folding(svf_test['disp']):.3f} % folding. SVF-Net folds "
      f"{'less than' if svf_folding[svf_name] < svf_folding[disp_name] else 'NOT less than'} displacement regression "
      f"({svf_folding[svf_name]:.3f} vs {svf_folding[disp_name]:.3f} %), with an end-point error "
      f"{svf_error[svf_name].mean() / svf_error[disp_name].mean():.2f}x that of the displacement regression.")

worst = int(np.argmax(svf_pair_folding[disp_name]))
fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
for ax, name in zip(axes, ["identity", svf_name, disp_name]):
    field = svf_test["disp"] if name == "identity" else svf_results[name]
    det = jacobian_determinant(field[worst:worst + 1])[0]
    im = ax.imshow(det, cmap="RdBu", vmin=-1, vmax=3)
    fig.colorbar(im, ax=ax, label="det J (<= 0: folded)")
    ax.set_title("true field" if name == "identity" else name, fontsize=10)
    ax.set_xlabel("inferior-superior (pixels)"); ax.set_ylabel("left-right (pixels)")
plt.tight_layout(); plt.show()
"""),
md(r"""
## 3. Joint segmentation and registration

What seed 001 says of the FCN model (Wu et al. 2019, chest CT): "the model has two
FCN branches, one segments the chest images, the other registers them"; it
"performs well in registration accuracy and robustness" on public data. The
survey gives no numbers.

Our version (`regedu.joint`): a registration U-Net and a segmentation U-Net
(4 structures: left and right cerebral white matter and cortex), trained together
on subject-to-subject pairs where only the *moving* images of the first
`n_labelled` pairs carry labels:

* registration loss (local NCC + diffusion) on every pair;
* segmentation loss (cross-entropy + soft Dice) on the labelled images;
* consistency: soft Dice of the fixed segmentation and the moving segmentation
  warped by the registration, where a segmentation is the label map on a
  labelled image and the branch's prediction otherwise. So the labels travel
  by registration onto unlabelled fixed images (the route by which registration
  can help segmentation), and the registration is pulled to align the
  structures (the route by which segmentation can help registration).

Baselines at the same budget, same batches (each has 2 labelled and 2 unlabelled
pairs): the registration branch alone (consistency and segmentation weighted 0)
and the segmentation branch alone (registration and consistency weighted 0).
The differences can be small, so in the `cpu` profile each of the three is
trained with three seeds and each test pair's Dice is averaged over them
before the paired comparison (the `ci` profile trains one seed and says so).
"""),
code(r"""
classes = [2, 3, 41, 42]                      # L/R cerebral white matter, L/R cerebral cortex
n_labelled = 8
subject_pairs = stack(BrainPairs(n_train + n_val + n_test, atlas=atlas, mode="subject", ndim=2, seed=1650,
                                 cache=True, **deformation))
joint_train, joint_val, joint_test = (take(subject_pairs, idx) for idx in (train_idx, val_idx, test_idx))
labelled = torch.arange(n_train) < n_labelled
joint_steps = steps * 3 // 4
joint_seeds = (0,) if small else (0, 1, 2)


def segmentation_dice(model, data):
    with torch.no_grad():
        predicted = model.predict_labels(data["fixed"])
    return np.array([metrics.dice(f[0], p[0], classes).mean for f, p in zip(data["fixed_seg"], predicted)])


def registration_dice(model, data):
    with torch.no_grad():
        return pair_dice(model.registration(data["moving"], data["fixed"]).disp, data, classes)


def train_joint(weights, seed=0):
    torch.manual_seed(seed)
    model = JointModel(classes, spatial_dims=2, **unet)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    history = {"step": [], "loss": [], "val_step": [], "val_registration": [], "val_segmentation": []}
    for step in range(1, joint_steps + 1):
        model.train()
        pick = torch.cat([torch.randperm(n_labelled, generator=g)[:batch_size // 2],
                          n_labelled + torch.randperm(n_train - n_labelled, generator=g)[:batch_size // 2]])
        batch = take(joint_train, pick)
        batch["moving_labelled"], batch["fixed_labelled"] = labelled[pick], torch.zeros(len(pick), dtype=torch.bool)
        terms = joint_step(model, batch, optimizer, weights=weights)
        history["step"].append(step); history["loss"].append(float(terms["loss"]))
        if step % (joint_steps // 5) == 0:
            model.eval()
            history["val_step"].append(step)
            history["val_registration"].append(registration_dice(model, joint_val).mean())
            history["val_segmentation"].append(segmentation_dice(model, joint_val).mean())
    return model.eval(), history


runs = {"registration only": {"segmentation": 0.0, "consistency": 0.0},
        "segmentation only": {"registration": 0.0, "consistency": 0.0},
        "joint": {}}
# Every run once per training seed; the figures show seed 0, the table averages the seeds per test pair.
joint_runs = {name: [train_joint(weights, seed) for seed in joint_seeds] for name, weights in runs.items()}
joint_models = {name: seeds[0][0] for name, seeds in joint_runs.items()}
joint_histories = {name: seeds[0][1] for name, seeds in joint_runs.items()}

fig, axes = plt.subplots(1, 3, figsize=(15, 3.4))
for name, h in joint_histories.items():
    axes[0].plot(h["step"], h["loss"], alpha=0.6, label=name)
    if name != "segmentation only":
        axes[1].plot(h["val_step"], h["val_registration"], "o-", label=name)
    if name != "registration only":
        axes[2].plot(h["val_step"], h["val_segmentation"], "o-", label=name)
axes[0].set_ylabel("training loss (its own objective)"); axes[1].set_ylabel("validation Dice of the registration")
axes[2].set_ylabel("validation Dice of the segmentation")
for ax in axes:
    ax.set_xlabel("step"); ax.legend(fontsize=8)
plt.tight_layout(); plt.show()
"""),
code(r"""
joint_dice = {"identity": {"registration": pair_dice(torch.zeros(n_test, 2, *shape), joint_test, classes)}}
for name, seeds in joint_runs.items():
    models = [model for model, _ in seeds]
    joint_dice[name] = {}
    if name != "segmentation only":
        joint_dice[name]["registration"] = np.mean([registration_dice(m, joint_test) for m in models], axis=0)
    if name != "registration only":
        joint_dice[name]["segmentation"] = np.mean([segmentation_dice(m, joint_test) for m in models], axis=0)
print(f"{joint_steps} steps per run; Dice per test pair averaged over {len(joint_seeds)} training seed(s) {list(joint_seeds)}")
for name, d in joint_dice.items():
    print(f"{name:>18}: " + ", ".join(f"{task} Dice {v.mean():.3f} ± {v.std():.3f}" for task, v in d.items()))
reg_gain = joint_dice["joint"]["registration"].mean() - joint_dice["registration only"]["registration"].mean()
# Paired over the test pairs (notebook 13, section 7): is the difference clear, or within what these pairs can tell?
joint_tests = {task: paired_test(joint_dice[alone][task], joint_dice["joint"][task], names=(alone, "joint"),
                                 metric=f"{task} Dice")
               for task, alone in [("registration", "registration only"), ("segmentation", "segmentation only")]}


def effect(result):
    boot = result.bootstrap
    if boot.ci_low > 0:
        return "clearly helps"
    if boot.ci_high < 0:
        return "clearly hurts"
    return "slightly helps (not clearly)" if boot.mean_difference > 0 else "does NOT help (not clearly worse)"


for task, result in joint_tests.items():
    print(f"{task}: {result.summary()}")
other = {"registration": "segmentation", "segmentation": "registration"}
print("-> " + "; ".join(f"training with {other[task]} {effect(result)} {task} ({result.bootstrap.mean_difference:+.3f} Dice)"
                        for task, result in joint_tests.items()))
both_clear = all(effect(r) == "clearly helps" for r in joint_tests.values())
print(f"-> the survey's claim that the two branches help each other is {'reproduced' if both_clear else 'NOT reproduced'} "
      f"here ({n_labelled} labelled images, {joint_steps} steps, {len(joint_seeds)} training seed(s)).")

with torch.no_grad():
    predictions = {name: joint_models[name].predict_labels(joint_test["fixed"][:1])[0, 0]
                   for name in ("segmentation only", "joint")}
codes = {0: 0, 2: 1, 3: 2, 41: 3, 42: 4}
recode = np.vectorize(lambda v: codes.get(int(v), 0))
fig, axes = plt.subplots(1, 4, figsize=(16, 3.4))
im = axes[0].imshow(joint_test["fixed"][0, 0], cmap="gray"); fig.colorbar(im, ax=axes[0], label="intensity")
axes[0].set_title("fixed test image")
for ax, (title, seg) in zip(axes[1:], [("true labels", joint_test["fixed_seg"][0, 0]), *predictions.items()]):
    im = ax.imshow(recode(seg.numpy()), cmap=plt.get_cmap("tab10", 5), vmin=-0.5, vmax=4.5)
    bar = fig.colorbar(im, ax=ax, ticks=range(5))
    bar.ax.set_yticklabels(["other", "L WM", "L cortex", "R WM", "R cortex"])
    ax.set_title(title)
for ax in axes:
    ax.set_xlabel("inferior-superior (pixels)"); ax.set_ylabel("left-right (pixels)")
plt.tight_layout(); plt.show()
"""),
md(r"""
## 4. Shan et al. 2017: L2 in a region of interest, edge-aware smoothness, more unlabelled data

What seed 004 says: an unsupervised end-to-end FCN for 2D CT/MR registration;
the loss is "the L2 difference between the warped moving image and the fixed
image" (photometric loss), an **edge-aware smoothness** loss "to regularise the
field and keep anatomical boundaries", and optionally a region-of-interest
(ROI) segmentation module. "Training with additional data without any label can
further improve the registration performance by approximately 10 %"; their best
brain variant (photometric loss with mask, more unlabelled data) reaches a mean
target distance of 3.31 mm, at about 0.094 s per pair, "100x faster" than ITK or
ANTs.

Our version, on notebook 05's fundus pairs (vessel contrast, 64×64 images,
the U-Net on a 32×32 grid through `nets.Rescaled`): `shan_loss` is the mean
squared difference inside the fixed image's field of view (the ROI: the black
surround of a fundus photograph carries no information) plus edge-aware smoothness
(`losses.edge_aware_smoothness`). The comparison is the paper's: the same network
and steps, trained on a few pairs, or on those pairs plus many more *unlabelled*
ones (no field, no points: the loss never needs them). Test: TRE on the control
points of retina pairs never used in training, averaged over the training seeds
(printed below).
"""),
code(r"""
fundus_size = 64                          # every profile: as for the brains, the budget goes to pairs and steps, not pixels
n_few, n_many = 8, 64


def fundus_data(pairs):
    items = [pairs[i] for i in range(len(pairs))]
    data = {k: torch.stack([torch.as_tensor(it[k]) for it in items]) for k in ("moving", "fixed")}
    data["fixed_mask"] = torch.stack([torch.as_tensor(it["fixed_mask"]) for it in items]).float()
    return data


fundus_train = fundus_data(FundusPairs(n_many, fundus_size, categories=("S", "A"), source="procedural", seed=0,
                                       cache=True, contrast="vessels"))
fundus_val = fundus_data(FundusPairs(4, fundus_size, categories=("S", "A"), source="procedural", seed=700,
                                     cache=True, contrast="vessels"))
fundus_test = FundusPairs(n_test, fundus_size, categories=("S", "A"), source="retina", seed=500, cache=True)
shan_steps, shan_seeds = (150, (0,)) if small else (400, (0, 1, 2))


def fundus_tre(model):
    errors = []
    for p in (fundus_test[i] for i in range(len(fundus_test))):
        if model is None:
            disp = torch.zeros(1, 2, fundus_size, fundus_size)
        else:
            with torch.no_grad():
                disp = model(vessel_contrast(p["moving"][None]), vessel_contrast(p["fixed"][None])).disp
        errors.append(metrics.tre(p["fixed_points"], p["moving_points"], disp).mean().item())
    return np.array(errors)


shan_tre, shan_histories = {"identity": fundus_tre(None)}, {}
for name, n in [(f"{n_few} pairs", n_few), (f"{n_few} pairs + {n_many - n_few} unlabelled", n_many)]:
    per_seed = []
    for seed in shan_seeds:
        torch.manual_seed(seed)
        model = nets.Rescaled(nets.create("unet", spatial_dims=2, **unet), fundus_size // 32)
        history = fit_objective(model, take(fundus_train, np.arange(n)), shan_loss, steps=shan_steps, lr=3e-3,
                                batch_size=4, seed=seed, grad_clip=1.0, val_data=fundus_val)
        per_seed.append(fundus_tre(model))
        shan_histories.setdefault(name, history)
    shan_tre[name] = np.mean(per_seed, axis=0)              # per test pair, averaged over the seeds

few, many = f"{n_few} pairs", f"{n_few} pairs + {n_many - n_few} unlabelled"
print(f"{shan_steps} steps per run; TRE averaged over {len(shan_seeds)} training seed(s) {list(shan_seeds)}")
for name, t in shan_tre.items():
    print(f"{name:>28}: TRE {t.mean():.2f} ± {t.std():.2f} px (pixels of our {fundus_size}-px images)")
shan_gain = 1 - shan_tre[many].mean() / shan_tre[few].mean()
shan_test = paired_test(shan_tre[few], shan_tre[many], names=(few, many), metric="px TRE", higher_is_better=False)
print(shan_test.summary())
shan_clear = shan_test.bootstrap.ci_high < 0
print(f"-> on {n_few} pairs alone the network {'beats' if shan_tre[few].mean() < shan_tre['identity'].mean() else 'does NOT beat'} "
      f"identity; with the unlabelled pairs it {'beats' if shan_tre[many].mean() < shan_tre['identity'].mean() else 'does NOT beat'} it.")
print(f"-> the extra unlabelled pairs {'lower' if shan_gain > 0 else 'do NOT lower'} TRE by {abs(shan_gain):.0%} "
      f"(Shan et al.: about 10 %): "
      + ("the paper's direction, clearly over these test pairs (the size of the gain is this run's, "
         "measured from the network on the labelled pairs alone)." if shan_gain > 0.05 and shan_clear else
         f"in the paper's direction, but not clearly over these {len(fundus_test)} test pairs." if shan_gain > 0 else
         "NOT reproduced here."))

fig, ax = plt.subplots(figsize=(7, 3.4))
for k, (name, h) in enumerate(shan_histories.items()):
    ax.plot(np.arange(1, shan_steps + 1), h["train"], color=f"C{k}", alpha=0.4, label=f"{name}: training")
    ax.plot(h["val_step"], h["val"], "o-", color=f"C{k}", label=f"{name}: validation")
ax.set_xlabel("step"); ax.set_ylabel("L2 in the ROI + edge-aware smoothness"); ax.set_title(f"seed {shan_seeds[0]}")
ax.legend(fontsize=8); plt.tight_layout(); plt.show()
print(f"notebook run time {time.perf_counter() - started:.0f} s")
"""),
md(r"""
## Exercises

1. Give Cao et al.'s network more training pairs (`n_train`) and steps: how much of
   the teacher's Dice does it recover, and where does it stop? Train a plain U-Net
   on the pair alone (`nets.create("unet", spatial_dims=2, **unet)`) at the same
   budget: do the similarity maps help, over several seeds?
2. Replace the teacher by ANTs SyN (`classical_targets(..., method="syn")`, as Cao
   et al.). Which costs more: making the targets or training?
3. Raise `amplitude` in section 2 until the *true* fields would fold without
   integration. What happens to displacement regression's folding?
4. In section 3, set `n_labelled = 2`, then 16. Does the consistency term help
   the segmentation at any `n_labelled`, and when?
5. In section 4, train without the ROI mask (`shan_loss(..., mask_key="none")`
   reads no mask) and with `weight=0` (no smoothness). Which of Shan et al.'s two
   ingredients matters on fundus pairs?

## Checks
"""),
code(r"""
# 1. Cao et al.: the regression network beats identity, is faster than its teacher, and the teacher beats identity
assert cao["dice"].mean() > ident["dice"].mean() + 0.02, \
    f"the regression network should beat identity: Dice {cao['dice'].mean():.3f} vs {ident['dice'].mean():.3f}"
assert teach["dice"].mean() > cao["dice"].mean(), "the network should not beat the classical fields it learned from"
assert cao["seconds"] < teach["seconds"] / 5, \
    f"one forward pass should be far faster than optimising: {cao['seconds']:.4f} vs {teach['seconds']:.4f} s"
assert cao["error"] < ident["error"], "the network's fields should be closer to the teacher's than identity"
# 2. SVF-Net: learns the field, and folds less than displacement regression
assert svf_error[svf_name].mean() < 0.95 * svf_error["identity"].mean(), \
    f"SVF-Net should beat identity in end-point error: {svf_error[svf_name].mean():.2f} vs {svf_error['identity'].mean():.2f} px"
assert svf_error[disp_name].mean() < 0.95 * svf_error["identity"].mean(), "displacement regression should beat identity"
assert svf_folding[svf_name] < svf_folding[disp_name], \
    f"SVF-Net should fold less than displacement regression: {svf_folding[svf_name]:.3f} vs {svf_folding[disp_name]:.3f} %"
assert svf_folding[svf_name] < 0.05, f"an integrated smooth velocity should hardly fold: {svf_folding[svf_name]:.3f} %"
# 3. Joint: both branches learn; with segmentation the mean registration Dice is higher (the paired test,
# printed in section 3, says whether clearly)
assert joint_dice["joint"]["registration"].mean() > joint_dice["identity"]["registration"].mean() + 0.05, \
    "the joint model's registration should beat identity"
assert reg_gain > 0, f"the joint model should register better than the registration branch alone: {reg_gain:+.3f}"
assert joint_dice["joint"]["segmentation"].mean() > joint_dice["identity"]["registration"].mean() + 0.1, \
    "the joint model's segmentation should beat copying the moving image's labels"
# 4. Shan et al.: with the unlabelled pairs the network beats identity, and the unlabelled pairs lower the mean
# TRE by more than 2 % (the paired test, printed in section 4, says whether clearly)
assert shan_tre[many].mean() < 0.9 * shan_tre["identity"].mean(), \
    f"Shan et al.'s training (with the unlabelled pairs) should beat identity in TRE: " \
    f"{ {k: round(v.mean(), 2) for k, v in shan_tre.items()} }"
assert shan_gain > 0.02, f"the extra unlabelled pairs should lower TRE by more than 2 %: {shan_gain:.1%}"
print("all checks passed")
"""),
]

if __name__ == "__main__":
    print(write("16_supervised_and_joint_models.ipynb", cells))
