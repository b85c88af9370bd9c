"""``python -m zohpc.train``: distributed sparse-CGE training (work in progress)."""

from __future__ import annotations

import argparse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m zohpc.train", description=__doc__)
    p.add_argument("--config", metavar="FILE", help="TOML config (defaults: the embedded digits run)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value; repeatable (e.g. --set optim.lr=0.1)")
    p.add_argument("--out", metavar="DIR", help="run directory (overrides run.out)")
    p.add_argument("--resume", metavar="auto|PATH", help="continue from the newest good checkpoint in the run directory, or from PATH")
    return p
