"""Time one training step and one inference of the VoxelMorph U-Net: regedu against voxelmorph 0.3.4.

What is timed, per implementation, on the same inputs and the same weights:

* ``train step``: forward, loss (local NCC, window 9, plus 0.01 x diffusion),
  backward, Adam step. regedu: ``regedu.train.train_step`` with
  ``losses={"ncc": 1.0, "diffusion": 0.01}``; vxm-0.3.4: ``VxmPairwise`` with
  ``return_warped_source=True``, ``-neurite.nn.functional.ncc(...).mean()``
  plus ``0.01 * neurite.nn.functional.spatial_gradient(disp, "l2")``, written
  as voxelmorph's training script does; torch: the same network and loss in
  plain torch (``nn.Conv``, ``grid_sample`` and neurite's NCC formula written
  inline, from ``bench_core``).
* ``inference``: ``model.eval()`` and ``torch.no_grad()``, the field and the
  warped moving image of one batch.

The architecture is the same for all three: VoxelMorph's U-Net with encoder
(16, 32, 32, 32), a 3x3 convolution at the coarsest level, three decoder
levels of 32 channels, one full-resolution 32-channel convolution after the
last skip, a 1x1 convolution to ``ndim`` channels and a 3x3 ``ndim -> ndim``
flow layer, LeakyReLU(0.2) and nearest upsampling, no integration. That is
what voxelmorph 0.3.4 builds with ``VxmPairwise(nb_features=[[16, 32, 32, 32],
[32, 32, 32, 32]], integration_steps=0)`` (102,040 parameters in 2D, 305,609
in 3D) once told to use LeakyReLU(0.2) and nearest upsampling (its defaults
are ReLU and linear upsampling), and regedu with ``nets.create("unet",
decoder=(32, 32, 32, 32, 32), out_channels=ndim)``. regedu's default
``decoder=(32, 32, 32, 32, 32, 16, 16)`` is the paper's VoxelMorph-2: two more
full-resolution convolutions (32 -> 16 -> 16) and a 16 -> ndim flow layer
without the 1x1 convolution (109,170 parameters in 2D, 327,331 in 3D).
neurite's ``BasicUNet`` cannot add convolutions after the last skip, so
voxelmorph 0.3.4 cannot build that network; ``--paper`` adds it as an extra,
regedu-only row ("regedu vm2"), which is not value-checked.

The weights are copied across (the layers correspond one to one and in the
same order), and the flow layer is scaled up so that the fields move the
images by a few voxels. Before timing, every implementation's field, warped
image, loss and gradients after one step are checked against regedu's; with
``--curve STEPS``, each implementation also trains STEPS steps from the same
weights on a smooth pair (noise smoothed, and itself shifted by 2 voxels) and
its loss curve is compared with regedu's (within 1e-5 at every step).

Method: one warm-up call per implementation, then ``--runs`` timed calls
(four times as many in 2D), implementations interleaved call by call so that
a busy machine slows them alike; medians of wall and CPU time are reported.
On a shared machine use ``--threads 1``: with more threads than free cores,
OpenMP's threads spin at every barrier and a step takes ten times longer. "time / regedu's" is an
implementation's median over regedu's: above 1, regedu is faster. Peak memory
is the rise of the process's peak resident set over one call (``bench_core``'s
``peak_memory_mib``). The machine, torch's threads and the load average are
printed at the start and the end.

    .venv/bin/python benchmarks/bench_step.py --quick            # 2D 256x256 (batch 8), 3D 80x96x112, 3 runs
    .venv/bin/python benchmarks/bench_step.py --full --paper     # also inference at 160x192x224
    .venv/bin/python benchmarks/bench_step.py --quick --curve 20 # and 20-step learning curves
    .venv/bin/python benchmarks/bench_step.py --device cuda --amp --full --vvnet   # a GPU: every size
        # also times a training step, VV-Net's row gives its peak memory at 160x192x224
    .venv/bin/python benchmarks/bench_step.py --sizes 256x256 --runs 9 --threads 1 --markdown step.md
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_core, run from a checkout

from bench_core import (_max_abs, _sync, environment, peak_memory_mib, report, torch_ncc,  # noqa: E402
                        torch_warp)

from regedu import nets  # noqa: E402  (bench_core put the checkout on the path)
from regedu.train import train_step  # noqa: E402

#: size name -> (spatial shape, batch size, what is timed at that size)
SIZES = {"256x256": ((256, 256), 8, ("train step", "inference")),
         "80x96x112": ((80, 96, 112), 1, ("train step", "inference")),
         "160x192x224": ((160, 192, 224), 1, ("inference",))}
ENCODER = (16, 32, 32, 32)
DECODER = (32, 32, 32, 32, 32)        # what voxelmorph 0.3.4 can build (see the docstring)
PAPER_DECODER = (32, 32, 32, 32, 32, 16, 16)
NCC_WINDOW, DIFFUSION_WEIGHT, LR = 9, 0.01, 1e-4
REFERENCE = "regedu"
EXTRAS = ("regedu vm2", "regedu vvnet")   # regedu-only rows: other networks, not value-checked


# ---------------------------------------------------------------- models

def regedu_model(nd, decoder=DECODER):
    return nets.create("unet", spatial_dims=nd, encoder=ENCODER, decoder=decoder,
                       out_channels=nd if decoder == DECODER else None)


def vxm_model(nd):
    import voxelmorph as vxm
    return vxm.nn.models.VxmPairwise(
        nd, 1, 1, nb_features=[list(ENCODER), list(DECODER[:len(ENCODER)])], integration_steps=0,
        # neurite's string activations are in place; 'leaky_relu' has slope 0.01, so pass the module
        activations=nn.LeakyReLU(0.2, inplace=True), unet_kwargs={"upsample_mode": "nearest"})


class TorchUNet(nn.Module):
    """The same network in plain torch: one list of convolutions, forward written out."""

    def __init__(self, nd):
        super().__init__()
        Conv = (nn.Conv2d, nn.Conv3d)[nd - 2]
        down, chans = [], 2
        for nf in ENCODER:
            down.append(Conv(chans, nf, 3, padding=1))
            chans = nf
        up = []
        for level, nf in enumerate(DECODER[:len(ENCODER)]):
            up.append(Conv(chans, nf, 3, padding=1))
            chans = nf + ENCODER[-1 - level]
        self.down, self.up = nn.ModuleList(down), nn.ModuleList(up)
        self.extra = Conv(chans, DECODER[-1], 3, padding=1)
        self.out = Conv(DECODER[-1], nd, 1)
        self.flow = Conv(nd, nd, 3, padding=1)
        self.pool = (F.max_pool2d, F.max_pool3d)[nd - 2]

    def forward(self, moving, fixed):
        x, skips = torch.cat([moving, fixed], dim=1), []
        for conv in self.down:
            x = F.leaky_relu(conv(x), 0.2)
            skips.append(x)
            x = self.pool(x, 2)
        for conv in self.up:
            x = torch.cat([F.interpolate(F.leaky_relu(conv(x), 0.2), scale_factor=2), skips.pop()], 1)
        disp = self.flow(self.out(F.leaky_relu(self.extra(x), 0.2)))
        return disp, torch_warp(moving, disp)


def copy_weights(src: nn.Module, dst: nn.Module) -> None:
    """Copy parameters in order; voxelmorph lists its flow layer first, the others last."""
    def ordered(model):
        items = list(model.state_dict().items())
        return [kv for kv in items if not kv[0].startswith("flow_layer")] + \
               [kv for kv in items if kv[0].startswith("flow_layer")]
    s, d = ordered(src), ordered(dst)
    if [v.shape for _, v in s] != [v.shape for _, v in d]:
        raise RuntimeError(f"layouts differ: {[tuple(v.shape) for _, v in s]} vs "
                           f"{[tuple(v.shape) for _, v in d]}")
    with torch.no_grad():
        for (_, a), (_, b) in zip(s, d):
            b.copy_(a)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- one step / one inference

def make_step(name, model, moving, fixed, amp=False):
    """(train-step callable, inference callable), each returning (disp, warped, loss or None).

    ``amp`` (CUDA): every implementation runs its network under float16
    autocast and scales its loss with a ``GradScaler``, the loss itself in
    float32, as regedu's ``train_step`` does with ``scaler=``.
    """
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)

    def autocast():
        return torch.autocast(moving.device.type, dtype=torch.float16, enabled=amp)

    def update(loss):
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        return None, None, loss.detach()

    if name.startswith("regedu"):
        losses = {"ncc": 1.0, "diffusion": DIFFUSION_WEIGHT}

        def step():
            values = train_step(model, {"moving": moving, "fixed": fixed}, opt, losses=losses,
                                scaler=scaler if amp else None)
            return None, None, values["loss"]

        def infer():
            with autocast():
                out = model(moving, fixed)
            return out.disp, out.warped, None
        return step, infer
    def in_float32(call):
        # the network under autocast, the loss on its outputs in float32
        def forward():
            with autocast():
                disp, warped = call()
            return disp.float(), warped.float()
        return forward

    if name == "vxm-0.3.4":
        import neurite.nn.functional as nef
        forward = in_float32(lambda: model(moving, fixed, return_warped_source=True))

        def step():
            disp, warped = forward()
            return update(-nef.ncc(fixed, warped, window_size=NCC_WINDOW).mean()
                          + DIFFUSION_WEIGHT * nef.spatial_gradient(disp, penalty="l2"))
        return step, lambda: (*forward(), None)
    if name == "torch":
        forward = in_float32(lambda: model(moving, fixed))

        def step():
            disp, warped = forward()
            diffusion = sum(d.square().mean() for d in (torch.diff(disp, dim=k)
                                                        for k in range(2, disp.dim()))) / (disp.dim() - 2)
            return update(torch_ncc(fixed, warped, win=NCC_WINDOW) + DIFFUSION_WEIGHT * diffusion)
        return step, lambda: (*forward(), None)
    raise ValueError(name)


def in_mode(model, train):
    def wrap(fn):
        def run():
            model.train(train)
            if train:
                return fn()
            with torch.no_grad():
                return fn()
        return run
    return wrap


# ---------------------------------------------------------------- checks

@contextlib.contextmanager
def weights_restored(model):
    """Train ``model`` inside the block; afterwards its weights are as before and its gradients cleared."""
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        yield
    finally:
        model.load_state_dict(saved)
        model.zero_grad(set_to_none=True)


def value_check(models, moving, fixed):
    """Fields, warped images, loss and gradients of one step from the same weights vs regedu's."""
    lines, ok, ref = [], True, {}
    for name, model in models.items():
        step, infer = make_step(name, model, moving, fixed)
        disp, warped, _ = in_mode(model, False)(infer)()
        with weights_restored(model):   # the timed runs start from the checked weights
            _, _, loss = in_mode(model, True)(step)()
            grads = [p.grad.clone() for p in (list(model.parameters()) if name != "vxm-0.3.4" else
                                              [p for k, p in model.named_parameters() if not k.startswith("flow_layer")]
                                              + [p for k, p in model.named_parameters() if k.startswith("flow_layer")])]
        got = {"disp": disp, "warped": warped, "loss": loss, "grads": grads}
        if name == REFERENCE:
            ref = got
            lines.append(f"regedu: max |disp| {float(disp.abs().max()):.2f} voxels, loss {float(loss):.6f}")
            continue
        d_disp = _max_abs(disp, ref["disp"]) / float(ref["disp"].abs().max())
        d_warp = _max_abs(warped, ref["warped"])
        d_loss = abs(float(loss) - float(ref["loss"]))
        d_grad = max(_max_abs(g, r) / max(float(r.abs().max()), 1e-30) for g, r in zip(grads, ref["grads"]))
        passed = d_disp <= 1e-4 and d_warp <= 1e-4 and d_loss <= 1e-5 and d_grad <= 1e-3
        ok &= passed
        lines.append(("OK   " if passed else "FAIL ") + f"{name} vs regedu: disp {d_disp:.1e} (relative), "
                     f"warped {d_warp:.1e}, loss {d_loss:.1e}, gradients {d_grad:.1e} (relative, worst layer)")
    return lines, ok


def smooth_pair(batch, shape, seed=2):
    """A pair a network can learn to register: smoothed noise and itself shifted by 2 voxels."""
    g = torch.Generator().manual_seed(seed)
    pool = (F.avg_pool2d, F.avg_pool3d)[len(shape) - 2]
    moving = pool(torch.rand(batch, 1, *shape, generator=g), 7, stride=1, padding=3)
    moving = (moving - moving.amin()) / (moving.amax() - moving.amin())
    return moving, torch.roll(moving, shifts=(2,) * len(shape), dims=tuple(range(2, 2 + len(shape))))


def learning_curves(models, moving, fixed, steps):
    """``steps`` training steps of each implementation from the same weights, data and seed.

    Passes when every loss is within 1e-5 of regedu's at the same step and
    regedu's loss fell. The weights are restored afterwards.
    """
    curves = {}
    for name, model in models.items():
        step, _ = make_step(name, model, moving, fixed)
        with weights_restored(model):
            run = in_mode(model, True)(step)
            curves[name] = [float(run()[2]) for _ in range(steps)]
    ref = curves[REFERENCE]
    ok = ref[-1] < ref[0]
    lines = [f"regedu: loss {ref[0]:.6f} -> {ref[-1]:.6f} over {steps} steps"
             + ("" if ok else " (FAIL: did not fall)")]
    for name, curve in curves.items():
        if name == REFERENCE:
            continue
        worst = max(abs(a - b) for a, b in zip(curve, ref))
        passed = worst <= 1e-5   # a flow layer 1 % larger: 2.2e-5 at 32x48 in 5 steps
        ok &= passed
        lines.append(("OK   " if passed else "FAIL ") + f"{name} vs regedu: largest loss difference over "
                     f"{steps} steps {worst:.1e} ({curve[0]:.6f} -> {curve[-1]:.6f})")
    return lines, ok


# ---------------------------------------------------------------- measurement

def measure(cases, runs, device):
    """Interleaved timings: {name: {"wall": [...], "cpu": [...], "peak_mib": float}}."""
    results = {name: {"wall": [], "cpu": []} for name in cases}
    for run in cases.values():    # warm-up
        run()
    _sync(device)
    for _ in range(runs):
        for name, run in cases.items():
            t, c = time.perf_counter(), time.process_time()
            run()
            _sync(device)
            results[name]["wall"].append(time.perf_counter() - t)
            results[name]["cpu"].append(time.process_time() - c)
    for name, run in cases.items():
        results[name]["peak_mib"] = peak_memory_mib(run, device)
    return results


def build(nd, impls, paper, vvnet=False):
    torch.manual_seed(0)
    ref = regedu_model(nd)
    with torch.no_grad():   # fields of a few voxels, so that the warp and its gradient do real work
        ref.flow.weight.normal_(0.0, 0.05)
        ref.flow.bias.uniform_(-1.0, 1.0)
    models = {"regedu": ref}
    if "vxm-0.3.4" in impls:
        models["vxm-0.3.4"] = vxm_model(nd)
    if "torch" in impls:
        models["torch"] = TorchUNet(nd)
    for name, m in models.items():
        if m is not ref:
            copy_weights(ref, m)
    if paper:
        torch.manual_seed(0)
        models["regedu vm2"] = regedu_model(nd, PAPER_DECODER)
    if vvnet:
        torch.manual_seed(0)
        models["regedu vvnet"] = nets.create("vvnet", spatial_dims=nd)
    return models


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", choices=list(SIZES), default=["256x256", "80x96x112"])
    p.add_argument("--full", action="store_true", help="also inference at 160x192x224")
    p.add_argument("--runs", type=int, default=5, help="timed calls per implementation (4x in 2D)")
    p.add_argument("--quick", action="store_true", help="3 runs")
    p.add_argument("--impls", nargs="+", default=["vxm-0.3.4", "torch"], choices=["vxm-0.3.4", "torch"],
                   help="implementations besides regedu")
    p.add_argument("--paper", action="store_true",
                   help="add regedu's default (paper) decoder, 32,32,32,32,32,16,16, as 'regedu vm2'")
    p.add_argument("--curve", type=int, default=0, metavar="STEPS",
                   help="also train each implementation STEPS steps from the same weights on a smooth "
                        "shifted pair and compare the loss curves (default: 0, off)")
    p.add_argument("--vvnet", action="store_true",
                   help="add regedu's VV-Net (the paper's, 3D only) as 'regedu vvnet', regedu only")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="where to run; on cuda every size also times a training step")
    p.add_argument("--amp", action="store_true",
                   help="mixed precision (cuda only): float16 autocast and a GradScaler for every "
                        "implementation; the value checks still run in float32")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--markdown", type=Path, default=None, help="also write the table to this file")
    args = p.parse_args(argv)
    if args.full and "160x192x224" not in args.sizes:
        args.sizes.append("160x192x224")
    if args.quick:
        args.runs = min(args.runs, 3)
    if args.runs < 1:
        p.error("--runs must be at least 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: this torch sees no CUDA device (torch.cuda.is_available() is False)")
    if args.amp and args.device != "cuda":
        p.error("--amp: mixed precision is timed on CUDA only (float16 autocast); add --device cuda")
    device = torch.device(args.device)
    if device.type == "cuda":
        # float32 means float32: TF32 convolutions round to 10 bits and would fail the value
        # checks; --amp is the fast path.
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    if args.threads:
        torch.set_num_threads(args.threads)

    header = environment()
    if device.type == "cuda":
        header += (f"\nGPU: {torch.cuda.get_device_name()}; " + ("mixed precision (float16 autocast, "
                   "GradScaler)" if args.amp else "float32"))
    print(header, flush=True)
    started = time.perf_counter()
    rows, checks, all_ok = [], [], True
    for size in args.sizes:
        shape, batch, modes = SIZES[size]
        if device.type == "cuda":
            modes = ("train step", "inference")
        nd = len(shape)
        g = torch.Generator().manual_seed(1)
        moving, fixed = (torch.rand(batch, 1, *shape, generator=g).to(device) for _ in range(2))
        models = {k: m.to(device) for k, m in build(nd, args.impls, args.paper, args.vvnet and nd == 3).items()}
        checked = {k: m for k, m in models.items() if k not in EXTRAS}
        print(f"{size} batch {batch}: parameters " + ", ".join(f"{k} {n_params(m):,}" for k, m in models.items()),
              flush=True)
        if "train step" in modes:
            lines, ok = value_check(checked, moving, fixed)
            all_ok &= ok
            checks += [f"{size}: {line}" for line in lines]
            print("\n".join(f"    {line}" for line in lines), flush=True)
            if args.curve:
                lines, ok = learning_curves(checked, *(t.to(device) for t in smooth_pair(batch, shape)),
                                            args.curve)
                all_ok &= ok
                checks += [f"{size}: {line}" for line in lines]
                print("\n".join(f"    {line}" for line in lines), flush=True)
        runs = args.runs * (4 if math.prod(shape) * batch < 10**6 else 1)
        for mode in modes:
            cases = {}
            for name, model in models.items():
                step, infer = make_step(name, model, moving, fixed, amp=args.amp)
                cases[name] = in_mode(model, mode == "train step")(step if mode == "train step" else infer)
            res = measure(cases, runs, device)
            ref = statistics.median(res[REFERENCE]["wall"])
            ref_cpu = statistics.median(res[REFERENCE]["cpu"])
            for name, r in res.items():
                med, cpu = statistics.median(r["wall"]), statistics.median(r["cpu"])
                rows.append((mode, f"{size} x{batch}", name, n_params(models[name]), med, min(r["wall"]),
                             max(r["wall"]), med / ref, cpu, cpu / ref_cpu, r["peak_mib"]))
                print(f"{mode:10} {size:11} {name:10} median {med:8.4f} s  ({med / ref:5.2f}x regedu's time), "
                      f"CPU {cpu:8.4f} s ({cpu / ref_cpu:5.2f}x)  peak +{r['peak_mib']:.0f} MiB", flush=True)
        del models

    table = ["| mode | size x batch | implementation | parameters | median s | min s | max s | "
             "time / regedu's | CPU s | CPU / regedu's | peak MiB |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for mode, size, name, npar, med, lo, hi, ratio, cpu, cpu_ratio, peak in rows:
        table.append(f"| {mode} | {size} | {name} | {npar:,} | {med:.3f} | {lo:.3f} | {hi:.3f} | "
                     f"{ratio:.2f} | {cpu:.3f} | {cpu_ratio:.2f} | {peak:.0f} |")
    footer = (f"\nmedian of {args.runs} runs ({4 * args.runs} for 2D) after 1 warm-up, implementations "
              f"interleaved; 'time / regedu's' > 1 means regedu is faster; peak = rise of the peak RSS over "
              f"one call; total {time.perf_counter() - started:.0f} s; load average at the end "
              f"{os.getloadavg() if hasattr(os, 'getloadavg') else 'n/a'}")
    return report(header, table, footer, checks, all_ok, args.markdown)


if __name__ == "__main__":
    sys.exit(main())
