"""Run under mpiexec by tests/test_distributed.py: one distributed CGE gradient, saved as .npy."""

import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mpi_util import gradient_problem  # noqa: E402
from zohpc.comm import run_main  # noqa: E402
from zohpc.distributed import DistributedCGE  # noqa: E402


def main(comm):
    model_name, features, out = sys.argv[1], sys.argv[2], sys.argv[3]
    model, x, y, coords, engine = gradient_problem(model_name)
    proto = DistributedCGE(comm, model, engine, mu=5e-3, features=features)
    proto.set_coords(coords, proto.measure_costs(coords, x, y))
    values, base, _ = proto.gradient(x if comm.is_driver else None, y if comm.is_driver else None, x.shape)
    if comm.is_driver:
        grads = coords.scatter(values)
        np.save(out, torch.cat([g.reshape(-1) for g in grads]).numpy())
    return 0


run_main(main, "mpi_gradient")
