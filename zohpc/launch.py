"""The launch guard: refuse a job whose launcher and MPI world disagree, before any file is touched.

``srun`` without an MPI plugin that matches mpi4py's MPI (Slurm's default ``MpiDefault=none``
with the PyPI ``mpich``) starts N independent single-rank MPI worlds. Each would train the whole
problem alone and all of them would write the same run directory, and the job would still end
"COMPLETED". An ``mpirun`` of another MPI than the one mpi4py was built against does the same.
The launcher leaves its task count in the environment, so the mismatch is visible at start-up.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from .errors import UserError

FIX = ("launch with `srun --mpi=pmi2 ...` (the PyPI mpich; a site MPI: see `srun --mpi=list`) "
       "or with `mpirun -n N ...` inside the allocation")

# launchers that state the size of the world they started: (variable, launcher)
WORLD_SIZE_VARS = (("OMPI_COMM_WORLD_SIZE", "Open MPI's mpirun"), ("PMI_SIZE", "the PMI launcher"))


def _int(environ: Mapping[str, str], name: str) -> int | None:
    try:
        return int(environ[name])
    except (KeyError, ValueError):
        return None


def slurm_step_tasks(environ: Mapping[str, str]) -> int | None:
    """Tasks in the Slurm step this process belongs to, or None outside a step."""
    tasks = _int(environ, "SLURM_STEP_NUM_TASKS")
    if tasks is None and "SLURM_STEP_ID" in environ:
        tasks = _int(environ, "SLURM_NTASKS")
    return tasks


def check_launch(world_size: int, environ: Mapping[str, str] = os.environ) -> None:
    """Raise UserError (one line) when the launcher started more processes than the MPI world holds."""
    tasks = slurm_step_tasks(environ)
    if world_size == 1 and tasks is not None and tasks > 1:
        raise UserError(f"this Slurm step has {tasks} tasks but each task is a separate 1-rank MPI world "
                        f"(srun without the MPI plugin of mpi4py's MPI); {FIX}")
    for name, launcher in WORLD_SIZE_VARS:
        size = _int(environ, name)
        if size is not None and size != world_size:
            raise UserError(f"{launcher} started {size} ranks ({name}={size}) but this MPI world has "
                            f"{world_size} (mpi4py uses another MPI than the launcher); {FIX}")
