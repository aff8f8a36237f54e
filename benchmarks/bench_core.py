"""Time regedu's core operations against voxelmorph 0.3.4 and plain torch.

Operations (each implementation gets the same inputs, in its native layout):

* ``warp``: warp an image by a smooth displacement, forward and
  forward+backward (gradient w.r.t. the displacement).
  regedu ``spatial.warp``; vxm-0.3.4 ``voxelmorph.nn.functional.spatial_transform``;
  torch: ``grid_sample`` written inline.
* ``ncc``: local NCC, window 9, forward+backward (gradient w.r.t. the warped
  image). regedu ``losses.ncc_local``; vxm-0.3.4: voxelmorph 0.3.4 delegates
  NCC to ``neurite.nn.functional.ncc`` (separable avg-pool box filter);
  vxm-0.2 NCC (9^3 conv): the classic formula of voxelmorph <= 0.2
  (``torch/losses.py``), one dense ones-kernel convolution per moment, written
  below; torch: the neurite formula with autograd through a separable grouped
  convolution.
* ``jac``: Jacobian determinant of a displacement. regedu
  ``metrics.jacobian_determinant``; vxm-0.3.4 ``voxelmorph.py.utils.jacobian_determinant``
  (numpy, channels-last input); torch: ``torch.gradient`` + ``torch.linalg.det``.

Sizes: 2D 256x256, 3D 80x96x112 and 160x192x224. Every measurement is the
median of ``--runs`` calls (four times as many in 2D) after one warm-up call; implementations are
interleaved run by run, so a busy machine slows them alike. Peak memory is the
rise of the process's peak resident set size over one call (Linux: reset with
``/proc/self/clear_refs``, read ``VmHWM``), which sees torch's and numpy's CPU
allocations (tracemalloc would not).

    .venv/bin/python benchmarks/bench_core.py                 # everything (~5-10 min on 2 idle cores)
    .venv/bin/python benchmarks/bench_core.py --quick         # 2D and 80x96x112 only, 3 runs
    .venv/bin/python benchmarks/bench_core.py --ops ncc --sizes 160x192x224 --runs 7
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from regedu import losses, metrics, spatial  # noqa: E402

SIZES = {"256x256": (256, 256), "80x96x112": (80, 96, 112), "160x192x224": (160, 192, 224)}
OPS = ("warp", "ncc", "jac")
TOLERANCE = {"warp": 1e-5, "ncc": 1e-4, "jac": 1e-4}
REFERENCE = "regedu"


# ---------------------------------------------------------------- references

def torch_warp(image, disp):
    """Plain torch: identity + displacement, normalised to [-1, 1], xyz order."""
    spatial_shape = image.shape[2:]
    grid = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=disp.dtype, device=disp.device)
                                        for n in spatial_shape], indexing="ij"))[None] + disp
    scale = torch.tensor([2.0 / (n - 1) for n in spatial_shape], dtype=disp.dtype, device=disp.device)
    grid = grid * scale.view(1, -1, *([1] * len(spatial_shape))) - 1
    return F.grid_sample(image, grid.movedim(1, -1).flip(-1), align_corners=True)


def vxm02_ncc(I, J, win=9, eps=1e-5):
    """voxelmorph <= 0.2 (torch/losses.py NCC): a dense win^ndim ones kernel per moment."""
    ndims = I.dim() - 2
    sum_filt = torch.ones(1, 1, *([win] * ndims), dtype=I.dtype, device=I.device)
    conv_fn = getattr(F, f"conv{ndims}d")
    pad = win // 2
    I2, J2, IJ = I * I, J * J, I * J
    I_sum, J_sum, I2_sum, J2_sum, IJ_sum = [conv_fn(t, sum_filt, stride=1, padding=pad)
                                            for t in (I, J, I2, J2, IJ)]
    win_size = win ** ndims
    u_I, u_J = I_sum / win_size, J_sum / win_size
    cross = IJ_sum - u_J * I_sum - u_I * J_sum + u_I * u_J * win_size
    I_var = I2_sum - 2 * u_I * I_sum + u_I * u_I * win_size
    J_var = J2_sum - 2 * u_J * J_sum + u_J * u_J * win_size
    cc = cross * cross / (I_var * J_var + eps)
    return -torch.mean(cc)


def torch_ncc(I, J, win=9, eps=1e-5):
    """Plain torch: neurite's formula, separable box filter as grouped convolutions."""
    nd = I.dim() - 2
    conv = (F.conv2d, F.conv3d)[nd - 2]
    x = torch.cat([I, J, I * I, J * J, I * J], dim=1)
    for axis in range(nd):
        size, pad = [1] * nd, [0] * nd
        size[axis], pad[axis] = win, win // 2
        x = conv(x, x.new_ones(5, 1, *size), padding=pad, groups=5)
    S_I, S_J, S_II, S_JJ, S_IJ = x.unbind(1)
    n = win ** nd
    cross = S_IJ - S_I * S_J / n
    var_I, var_J = S_II - S_I * S_I / n, S_JJ - S_J * S_J / n
    return -(cross * cross / (var_I * var_J + eps)).mean()


def torch_jacobian(disp):
    """Plain torch: torch.gradient of phi = id + u, then torch.linalg.det."""
    nd = disp.shape[1]
    grads = torch.gradient(disp, dim=tuple(range(2, 2 + nd)))
    J = torch.stack(grads, dim=2) + torch.eye(nd, dtype=disp.dtype).view(1, nd, nd, *([1] * nd))
    return torch.linalg.det(J.movedim((1, 2), (-2, -1)))


# ---------------------------------------------------------------- cases

def smooth_displacement(shape, amplitude=3.0, seed=0):
    # Low-resolution noise, upsampled: a smooth, realistic field (random
    # per-voxel noise would make memory access unrealistically scattered).
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, len(shape), *[max(2, n // 16) for n in shape], generator=g)
    mode = "bilinear" if len(shape) == 2 else "trilinear"
    u = F.interpolate(coarse, size=shape, mode=mode, align_corners=True)
    return (u / u.abs().max() * amplitude).contiguous()


def make_cases(op, shape, device):
    """{implementation: (name of what is timed, callable returning (value, gradient or None))}."""
    g = torch.Generator().manual_seed(1)
    if op == "warp":
        image = torch.rand(1, 1, *shape, generator=g).to(device)
        disp = smooth_displacement(shape).to(device)
        import voxelmorph.nn.functional as vxf
        impls = {"regedu": spatial.warp, "vxm-0.3.4": vxf.spatial_transform, "torch": torch_warp}

        def forward(fn):
            return lambda: (fn(image, disp), None)

        def forward_backward(fn):
            def run():
                u = disp.detach().requires_grad_(True)
                out = fn(image, u)
                out.sum().backward()
                return out.detach(), u.grad
            return run
        return {"forward": {k: forward(f) for k, f in impls.items()},
                "fwd+bwd": {k: forward_backward(f) for k, f in impls.items()}}
    if op == "ncc":
        fixed = torch.rand(1, 1, *shape, generator=g).to(device)
        warped = (0.5 * fixed + 0.5 * torch.rand(1, 1, *shape, generator=g)).to(device)
        import neurite.nn.functional as nef
        impls = {"regedu": lambda I, J: losses.ncc_local(I, J, window=9),
                 "vxm-0.3.4": lambda I, J: -nef.ncc(I, J, window_size=9).mean(),
                 "vxm-0.2 NCC (9^3 conv)": vxm02_ncc,
                 "torch": torch_ncc}

        def forward_backward(fn):
            def run():
                J = warped.detach().requires_grad_(True)
                loss = fn(fixed, J)
                loss.backward()
                return loss.detach(), J.grad
            return run
        return {"fwd+bwd": {k: forward_backward(f) for k, f in impls.items()}}
    if op == "jac":
        disp = smooth_displacement(shape, amplitude=5.0).to(device)
        import voxelmorph.py.utils as vxu
        disp_np = np.ascontiguousarray(disp[0].movedim(0, -1).cpu().numpy())  # (*spatial, ndim), untimed
        impls = {"regedu": lambda: (metrics.jacobian_determinant(disp)[0], None),
                 "vxm-0.3.4": lambda: (torch.from_numpy(vxu.jacobian_determinant(disp_np)), None),
                 "torch": lambda: (torch_jacobian(disp)[0], None)}
        return {"forward": impls}
    raise ValueError(f"unknown op {op!r}")


# ---------------------------------------------------------------- measurement

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _rss_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(field)


def _release_free_memory():
    # glibc keeps small freed blocks mapped; give them back so that the next
    # call's allocations show in the resident set instead of reusing them.
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_memory_mib(run, device):
    """Rise of the peak resident set (CPU) or of torch's peak allocation (CUDA) over one call."""
    gc.collect()
    _release_free_memory()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        base = _rss_kib("VmRSS")
    except OSError:
        return float("nan")
    run()
    return (_rss_kib("VmHWM") - base) / 1024


def measure(cases, runs, device):
    """Interleaved timings: wall and CPU seconds per implementation, then memory."""
    results = {name: {"wall": [], "cpu": []} for name in cases}
    outputs = {}
    for name, run in cases.items():  # warm-up, also keeps the outputs for the value check
        outputs[name] = run()
        _sync(device)
    for _ in range(runs):
        for name, run in cases.items():
            gc.collect()
            w, c = time.perf_counter(), time.process_time()
            run()
            _sync(device)
            results[name]["wall"].append(time.perf_counter() - w)
            results[name]["cpu"].append(time.process_time() - c)
    for name, run in cases.items():
        results[name]["peak_mib"] = peak_memory_mib(run, device)
    return results, outputs


def _max_abs(a, b):
    return float((a.detach().double().cpu() - b.detach().double().cpu()).abs().max())


def value_check(op, outputs):
    """Compare every implementation to regedu; return printable lines and whether all pass."""
    ref_value, ref_grad = outputs[REFERENCE]
    lines, ok = [], True
    tol = TOLERANCE[op]
    for name, (value, grad) in outputs.items():
        if name == REFERENCE:
            continue
        dv = _max_abs(value, ref_value)
        # The Jacobian's scale is ~1; relative and absolute agree there.
        passed = dv <= tol
        text = f"max |{name} - regedu| value {dv:.2e} (tol {tol:g})"
        if grad is not None and ref_grad is not None:
            scale = float(ref_grad.abs().max())
            dg = _max_abs(grad, ref_grad) / max(scale, 1e-30)
            text += f", gradient {dg:.2e} relative to max |grad|"
            passed = passed and dg <= 1e-3
        ok &= passed
        lines.append(("OK   " if passed else "FAIL ") + text)
    return lines, ok


def environment():
    try:
        affinity = sorted(os.sched_getaffinity(0))
    except AttributeError:
        affinity = "n/a"
    import neurite
    import voxelmorph
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("n/a",)
    return (f"torch {torch.__version__}, voxelmorph {voxelmorph.__version__}, neurite "
            f"{neurite.__version__}, numpy {np.__version__}, Python {platform.python_version()}\n"
            f"CPU: {cpu}; os.sched_getaffinity: {affinity} ({len(affinity)} cores); "
            f"torch.get_num_threads(): {torch.get_num_threads()}; load average {load}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    p.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    p.add_argument("--runs", type=int, default=5, help="timed calls per implementation (median reported)")
    p.add_argument("--quick", action="store_true", help="2D and 80x96x112 only, 3 runs")
    p.add_argument("--skip", nargs="*", default=[],
                   help="implementations to leave out, e.g. 'vxm-0.2 NCC (9^3 conv)' (the slowest)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--markdown", type=Path, default=None, help="also write the table to this file")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.runs = [s for s in args.sizes if s != "160x192x224"], min(args.runs, 3)
    if args.runs < 1:
        p.error("--runs must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)

    header = environment()
    print(header, flush=True)
    started = time.perf_counter()
    rows, checks, all_ok = [], [], True
    for size in args.sizes:
        shape = SIZES[size]
        for op in args.ops:
            for mode, cases in make_cases(op, shape, device).items():
                cases = {k: v for k, v in cases.items() if k not in args.skip}
                # Small inputs take milliseconds: more runs make their median steadier.
                runs = args.runs * (4 if math.prod(shape) < 10**6 else 1)
                res, outputs = measure(cases, runs, device)
                lines, ok = value_check(op, outputs)
                all_ok &= ok
                checks += [f"{op} {mode} {size}: {line}" for line in lines]
                ref = statistics.median(res[REFERENCE]["wall"])
                for name, r in res.items():
                    med = statistics.median(r["wall"])
                    rows.append((op, mode, size, name, med, min(r["wall"]), max(r["wall"]),
                                 statistics.median(r["cpu"]), med / ref, r["peak_mib"]))
                    print(f"{op:4} {mode:7} {size:11} {name:24} median {med:8.4f} s  "
                          f"({med / ref:5.2f}x regedu's time)  peak +{r['peak_mib']:.0f} MiB", flush=True)
                print("\n".join(f"    {line}" for line in lines), flush=True)

    table = ["| op | mode | size | implementation | median s | min s | max s | CPU s | time / regedu's | peak MiB |",
             "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for op, mode, size, name, med, lo, hi, cpu, ratio, peak in rows:
        table.append(f"| {op} | {mode} | {size} | {name} | {med:.4f} | {lo:.4f} | {hi:.4f} | "
                     f"{cpu:.3f} | {ratio:.2f} | {peak:.0f} |")
    summary = [f"{op} {mode} {size}: {name} takes {ratio:.2f}x regedu's time"
               for op, mode, size, name, med, lo, hi, cpu, ratio, peak in rows if name != REFERENCE]
    footer = (f"\nmedian of {args.runs} runs ({4 * args.runs} for 2D) after 1 warm-up, implementations interleaved; "
              f"'time / regedu's' > 1 means regedu is faster; peak = rise of the peak RSS over "
              f"one call (VmHWM after /proc/self/clear_refs); total {time.perf_counter() - started:.0f} s; "
              f"load average at the end {os.getloadavg() if hasattr(os, 'getloadavg') else 'n/a'}")
    return report(header, table, footer, checks, all_ok, args.markdown, speedups=summary)


def report(header, table, footer, checks, all_ok, markdown=None, *, speedups=()) -> int:
    """Print a benchmark's table, footer and value checks, write them to ``markdown`` if given.

    Returns the exit status: 0 when every value check agreed, else 1.
    """
    print("\n" + "\n".join(table) + footer)
    if speedups:
        print("\nSpeed-ups:\n" + "\n".join(speedups))
    print("\nValue checks:\n" + "\n".join(checks))
    print("all values agree" if all_ok else "SOME VALUES DISAGREE")
    if markdown:
        markdown.write_text("\n".join([header, "", *table, footer, "", "Value checks:", *checks]) + "\n")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
