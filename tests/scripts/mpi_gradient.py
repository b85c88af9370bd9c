"""Run under mpiexec by tests/test_steps.py: one distributed CGE gradient through the
training step object, saved as .npy."""

import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mpi_util import gradient_problem  # noqa: E402
from zohpc.comm import run_main  # noqa: E402
from zohpc.steps import CGEStep  # noqa: E402
from zohpc.zo.costs import calibrated_costs  # noqa: E402


def main(comm):
    model_name, features, out = sys.argv[1], sys.argv[2], sys.argv[3]
    device = sys.argv[4] if len(sys.argv) > 4 else "cpu"  # several ranks may share one GPU
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # as setup_runtime
    model, x, y, coords, engine = gradient_problem(model_name, device)
    # lr 0: the step's update path leaves the estimate in .grad and the parameters as they were
    step = CGEStep(comm, model, engine, torch.optim.SGD(model.parameters(), lr=0.0), mu=5e-3)
    costs = torch.tensor(calibrated_costs(engine, coords, x, y), dtype=torch.float64)
    comm.allreduce_sum_(costs)
    step.set_coords(coords, (costs / comm.size).tolist())
    step.features = features
    step(x.clone(), y.clone(), 0)
    if comm.is_driver:  # the scattered estimate (zero at inactive coordinates), as the optimizer saw it
        np.save(out, torch.cat([p.grad.reshape(-1) for p in model.parameters()]).cpu().numpy())
    return 0


run_main(main, "mpi_gradient")
