"""Run under mpiexec by tests/test_distributed.py: one distributed CGE gradient, saved as .npy."""

import sys

import numpy as np
import torch

from zohpc.comm import run_main
from zohpc.distributed import DistributedCGE
from zohpc.masks import layerwise_random_masks, maskable_names
from zohpc.models import build_model
from zohpc.zo import Coordinates, QueryEngine


def main(comm):
    model_name, features, out = sys.argv[1], sys.argv[2], sys.argv[3]
    shape = (1, 8, 8) if model_name == "digits_cnn" else (3, 8, 8)
    torch.manual_seed(0)
    model = build_model(model_name, shape, 10)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(8, *shape, generator=gen)
    y = torch.randint(0, 10, (8,), generator=gen)
    shapes = {n: p.shape for n, p in model.named_parameters() if n in maskable_names(model)}
    sparsity = 0.5 if model_name == "digits_cnn" else 0.995
    masks = layerwise_random_masks(shapes, {n: sparsity for n in maskable_names(model)}, 0, 0)
    coords = Coordinates(model, masks)
    engine = QueryEngine(model, query_batch=5)
    proto = DistributedCGE(comm, model, engine, mu=5e-3, features=features)
    costs = proto.measure_costs(coords, x, y)
    proto.set_coords(coords, costs)
    values, base, _ = proto.gradient(x if comm.is_driver else None, y if comm.is_driver else None, x.shape)
    if comm.is_driver:
        grads = coords.scatter(values)
        np.save(out, torch.cat([g.reshape(-1) for g in grads]).numpy())
    return 0


run_main(main, "mpi_gradient")
