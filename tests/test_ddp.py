"""regedu.train.fit under torchrun: two CPU processes, gloo backend, DistributedDataParallel."""
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

WORKER = textwrap.dedent("""
    import os, sys
    import torch
    from torch.utils.data import Dataset
    from regedu import nets
    from regedu.train import fit

    class Pairs(Dataset):
        # 6 random smooth pairs; each rank trains on its own half (DistributedSampler).
        def __init__(self):
            g = torch.Generator().manual_seed(0)
            self.images = torch.nn.functional.avg_pool2d(torch.rand(7, 1, 24, 20, generator=g), 5, 1, 2)
        def __len__(self):
            return 6
        def __getitem__(self, i):
            return {"moving": self.images[i], "fixed": self.images[i + 1]}

    out = sys.argv[1]
    rank = int(os.environ["RANK"])
    torch.manual_seed(rank)  # different initialisations: DDP must broadcast rank 0's weights
    model = nets.create("unet", spatial_dims=2, encoder=(8, 8), decoder=(8, 8, 8))
    history = fit(model, Pairs(), losses={"mse": 1.0, "diffusion": 0.1}, steps=3, lr=1e-2,
                  checkpoint=os.path.join(out, "model.pt"), progress=False, device="cpu", seed=1)
    torch.save({"params": {k: v.detach().clone() for k, v in model.state_dict().items()},
                "loss": history["train"]["loss"]}, os.path.join(out, f"rank{rank}.pt"))
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fit_under_torchrun_with_two_gloo_processes(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(script), str(tmp_path)]
    env = {**__import__("os").environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "GLOO_SOCKET_IFNAME": "lo"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]

    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    # Both ranks finished, with the same weights (broadcast at the start, averaged
    # gradients after) and the same logged losses (averaged over the ranks).
    for name, value in r0["params"].items():
        assert torch.equal(value, r1["params"][name]), name
    assert len(r0["loss"]) == 3 and r0["loss"] == r1["loss"]
    # Training happened, and rank 0 alone wrote the checkpoint, holding those weights.
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    assert state["step"] == 3 and state["train_config"]["world_size"] == 2
    torch.manual_seed(0)
    fresh = __import__("regedu").nets.create("unet", spatial_dims=2, encoder=(8, 8), decoder=(8, 8, 8))
    assert not torch.equal(fresh.state_dict()["flow.bias"], state["model"]["flow.bias"])
    for name, value in state["model"].items():
        assert torch.equal(value, r0["params"][name]), name
