"""Does on-the-fly pair generation keep up with training?

Measures pairs per second of the offline samplers at the two sizes the course
trains at (2D fundus 256x256, 3D brain 80x96x112), in the main process and
with DataLoader workers, and compares with one training step (forward,
backward, Adam) of VoxelMorph's U-Net (``regedu.nets.create("unet")``) at the
same size, batch 1, MSE + 0.01 * diffusion. Goal: generation under half the
step time.

    python benchmarks/bench_datasets.py                 # both sizes, CPU
    python benchmarks/bench_datasets.py --device cuda --workers 0 4 8
"""
from __future__ import annotations

import argparse
import time

import torch

from regedu import losses, nets
from regedu.datasets import BrainPairs, FundusPairs, mni_brain


def pairs_per_second(dataset, n: int, workers: int) -> float:
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, num_workers=workers,
                                         collate_fn=lambda batch: batch[0],
                                         persistent_workers=False)
    it = iter(loader)
    next(it)  # start-up (workers forking, first pair) is not the steady state
    start = time.perf_counter()
    for _ in range(n):
        next(it)
    return n / (time.perf_counter() - start)


def step_seconds(spatial_dims: int, shape, device: str, repeats: int) -> float:
    model = nets.create("unet", spatial_dims=spatial_dims).to(device)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-4)
    moving = torch.rand(1, 1, *shape, device=device)
    fixed = torch.rand(1, 1, *shape, device=device)

    def step():
        out = model(moving, fixed)
        loss = losses.mse(fixed, out.warped) + 0.01 * losses.diffusion(out.disp)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()

    step()  # warm-up: allocations, cuDNN autotuning
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--pairs", type=int, default=8, help="pairs timed per setting")
    parser.add_argument("--steps", type=int, default=3, help="training steps timed")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of the main process")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    atlas = mni_brain(2)  # built and cached before timing
    cases = [("2D fundus 256x256 (retina, S/P/A)", 2, (256, 256),
              FundusPairs(10_000, 256, source="retina", seed=0)),
             ("2D fundus 256x256 (procedural)", 2, (256, 256),
              FundusPairs(10_000, 256, source="procedural", seed=0)),
             ("3D brain 80x96x112 (atlas-to-subject)", 3, (80, 96, 112),
              BrainPairs(10_000, atlas=atlas, mode="atlas", seed=0))]
    print(f"device for the training step: {args.device}; torch threads: {torch.get_num_threads()}")
    for name, nd, shape, dataset in cases:
        step = step_seconds(nd, shape, args.device, args.steps)
        print(f"\n{name}: U-Net training step {step * 1000:.0f} ms "
              f"({1 / step:.1f} steps/s); goal: generation < {step * 500:.0f} ms/pair")
        for workers in args.workers:
            rate = pairs_per_second(dataset, args.pairs, workers)
            ratio = (1 / rate) / step
            verdict = "ok" if ratio < 0.5 else "too slow"
            print(f"  workers={workers}: {rate:.2f} pairs/s = {1000 / rate:.0f} ms/pair; "
                  f"generation/step = {ratio:.2f} ({verdict})")


if __name__ == "__main__":
    main()
