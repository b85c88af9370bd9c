"""``python -m zohpc.reproduce NAME [--out DIR] [--json] [--quick]`` (see the package docstring)."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

from ..comm import run_main
from ..errors import UserError
from . import STUDIES


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m zohpc.reproduce",
                                description="Reproduce a study of the seed papers in miniature.")
    p.add_argument("name", choices=STUDIES, help="the study")
    p.add_argument("--out", default=None, metavar="DIR", help="where the table, JSON and PNG go "
                   "(default: runs/reproduce/NAME)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object on stdout")
    p.add_argument("--quick", action="store_true", help="a small version (about a minute; for tests)")
    return p


def run(comm, args) -> int:
    out = os.path.expandvars(os.path.expanduser(args.out or os.path.join("runs", "reproduce", args.name)))
    study = importlib.import_module(f"zohpc.reproduce.{args.name}")
    if comm.is_driver:
        try:
            os.makedirs(out, exist_ok=True)
        except OSError as exc:
            raise UserError(f"--out {out}: cannot create the directory ({exc.strerror})") from None
    comm.barrier()
    result = study.run(comm, out, args.quick)
    if comm.is_driver:
        result = {"study": args.name, "quick": bool(args.quick), **result}
        text = study.table(result)
        with open(os.path.join(out, f"{args.name}.json"), "w") as fh:
            json.dump(result, fh, indent=1)
        with open(os.path.join(out, f"{args.name}.txt"), "w") as fh:
            fh.write(text + "\n")
        png = os.path.join(out, f"{args.name}.png")
        study.plot(result, png)
        print(text, file=sys.stderr if args.json else sys.stdout, flush=True)
        print(f"zohpc.reproduce: wrote {out}/{args.name}.{{json,txt,png}}", file=sys.stderr, flush=True)
        if args.json:
            print(json.dumps(result), flush=True)
    comm.barrier()
    return 0


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    run_main(lambda comm: run(comm, args), "zohpc.reproduce")


if __name__ == "__main__":
    main()
