"""Gray-box mode under mpiexec (run by tests/test_graybox.py):

    mpiexec -n K python tests/scripts/graybox_script.py train|frozen OUT

``train``: a tiny solver-in-the-loop task (the numpy solver as the black box) trained for a
few gray-box steps; the driver writes the trained parameters' bytes (hex) and the summary to
OUT. ``frozen``: the corrector's forward goes through numpy (not differentiable): exit 2.
"""

import json
import sys

import torch
from torch import nn

import zohpc
from zohpc.tasks import burgers

OPTS = {**burgers.DEFAULTS, "grid": 16, "fine_factor": 4, "train_trajectories": 8, "test_trajectories": 2,
        "steps": 8, "unroll": 2, "width": 4, "kernel": 3}


class ThroughNumpy(nn.Module):
    """A forward that leaves autograd (numpy inside): trainable only with parameter queries."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return torch.from_numpy(self.inner(x).detach().numpy().copy())


mode, out = sys.argv[1], sys.argv[2]
task = burgers.make_task(OPTS, 0)
if mode == "frozen":
    task.model = ThroughNumpy(task.model)
summary = zohpc.run(task, overrides=["zo.boundary=outputs", "zo.difference=central", "zo.query_batch=8",
                                     "prune.method=none", "optim.name=adam", "optim.lr=1e-2", "data.batch_size=16",
                                     "train.epochs=1", "train.max_steps=3", "checkpoint.every_epochs=0"], save=False)
from zohpc.comm import world  # noqa: E402

if world().is_driver:
    flat = torch.cat([p.detach().reshape(-1) for p in task.model.parameters()])
    with open(out, "w") as fh:
        json.dump({"params": flat.numpy().tobytes().hex(), "queries": summary["queries"],
                   "steps": summary["steps"]}, fh)
