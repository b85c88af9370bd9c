"""A user's script around ``zohpc.run`` (run by tests/test_tasks.py under mpiexec):

    mpiexec -n 2 python tests/scripts/api_script.py train|resume|bad OUT EPOCHS

Builds the example regression task by hand (no plug-in, no config file), trains it with
``zohpc.run`` and writes the summary returned on each rank to ``OUT.summary-R.json``.
``bad``: targets one short of the inputs (a user error: exit 2 from the script).
"""

import json
import sys

import torch
from torch import nn

import zohpc
from zohpc.tasks.examples import make_data, metrics, numpy_mse

mode, out, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
x, y = make_data(256, 8, 0.05, 0, "train")
if mode == "bad":
    y = y[:-1]
task = zohpc.Task(model=model, train=(x, y), test=make_data(128, 8, 0.05, 0, "test"), loss=numpy_mse,
                  metrics=metrics, name="api-regression")
summary = zohpc.run(task, overrides=["prune.method=none", "optim.lr=0.1", f"train.epochs={epochs}"], out=out,
                    resume="auto" if mode == "resume" else None)
from zohpc.comm import world  # noqa: E402

with open(f"{out}.summary-{world().rank}.json", "w") as fh:
    json.dump({k: summary[k] for k in ("steps", "epochs", "final", "best")}, fh)
