"""Run under ``mpiexec -n K`` by tests/test_tasks.py: several ``python -m zohpc.train``
command lines in ONE MPI job (one start-up instead of one per case), each through the CLI's
own entry point ``zohpc.train.main``. For every case, every rank records its exit code and
what it wrote to stderr in ``OUT/rank-R.json`` (so the test sees each rank's exit code,
which mpiexec's own exit status folds into one).

    mpiexec -n 2 python tests/scripts/cli_cases.py OUT CASES.json   # CASES: {name: [argv...]}
"""

import io
import json
import os
import sys


def main():
    out, cases_file = sys.argv[1], sys.argv[2]
    with open(cases_file) as fh:
        cases = json.load(fh)
    from zohpc.comm import world
    from zohpc.train import main as train_main

    comm = world()
    results = {}
    for name, argv in cases.items():
        comm.barrier()
        saved, sys.stderr = sys.stderr, io.StringIO()
        try:
            train_main(argv)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        finally:
            text, sys.stderr = sys.stderr.getvalue(), saved
        results[name] = {"code": code, "stderr": text}
    with open(os.path.join(out, f"rank-{comm.rank}.json"), "w") as fh:
        json.dump(results, fh)


main()
