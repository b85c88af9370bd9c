"""``python -m zohpc.bench <name> [options]``: performance measurements printed as JSON.

Each benchmark lives in its own module ``zohpc.bench.<name>`` with ``build_parser()`` and
``run(comm, args)``; this dispatcher parses the options and runs it under ``run_main``.
Figures are ratios measured in one run on one machine, never assertions in tests.
"""

from __future__ import annotations

import importlib
import sys

from ..comm import run_main

BENCHES = {
    "engine": "query engine: naive vs block-level reuse vs per-layer engine",
    "scaling": "distributed sparse-CGE step under mpirun -n K",
    "lizo": "LIZO with/without reuse vs ZO-SGD on test functions",
    "prune": "ZO-GraSP against its FLOP floor (2q plain forwards of the pruning batch over K ranks)",
    "memory": "peak memory: inference vs SPSA step vs Adam step on a GPT-2-small-sized model",
    "spsa": "SPSA over MPI: steps/s on 2 ranks vs 1, and bit-identical parameters",
    "precision": "zo.precision delta modes: CGE error against float64 differences, speed against IEEE",
    "device": "the GPU checks in one command: cuda tests, engine TFLOP/s vs float32 peak, paper step, sharing",
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in BENCHES:
        lines = ["usage: python -m zohpc.bench {%s} [options]" % ",".join(BENCHES), ""]
        lines += [f"  {name:8s} {what}" for name, what in BENCHES.items()]
        print("\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            print(f"zohpc.bench: error: unknown benchmark {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    module = importlib.import_module(f"zohpc.bench.{argv[0]}")
    args = module.build_parser().parse_args(argv[1:])
    run_main(lambda comm: module.run(comm, args), f"zohpc.bench {argv[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
