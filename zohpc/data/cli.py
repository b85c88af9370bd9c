"""``python -m zohpc.data convert|info``: write zohpc's HDF5 data file, summarize a dataset."""

from __future__ import annotations

import argparse
import json
import os

import torch

from ..errors import DataError, one_line
from .hdf5 import write_hdf5
from .load import DATASET_NAMES, load_data, load_raw
from .splits import DataSplits


def _summary(splits: DataSplits, source: str) -> dict:
    counts = torch.bincount(splits.train_y, minlength=splits.num_classes).tolist()
    return {
        "name": splits.name,
        "source": source,
        "num_train": splits.num_train,
        "num_test": splits.num_test,
        "input_shape": list(splits.input_shape),
        "num_classes": splits.num_classes,
        "train_class_counts": counts,
        "train_mean": round(float(splits.train_x.mean()), 6),
        "train_std": round(float(splits.train_x.std()), 6),
    }


def _data_config(name: str, directory: str, args) -> object:
    from ..config import DataConfig

    cfg = DataConfig(name=name, dir=directory or "")
    if getattr(args, "limit", None):
        cfg.limit = args.limit
    if getattr(args, "synthetic_shape", None):
        cfg.synthetic_shape = list(args.synthetic_shape)
    if getattr(args, "synthetic_classes", None):
        cfg.synthetic_classes = args.synthetic_classes
    if getattr(args, "synthetic_size", None):
        cfg.synthetic_size = args.synthetic_size
    return cfg


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m zohpc.data",
                                     description="Convert datasets to zohpc's HDF5 format and inspect them.")
    sub = parser.add_subparsers(dest="command", required=True)

    def synthetic_opts(p):
        p.add_argument("--synthetic-shape", type=int, nargs=3, metavar=("C", "H", "W"))
        p.add_argument("--synthetic-classes", type=int)
        p.add_argument("--synthetic-size", type=int)

    conv = sub.add_parser("convert", help="write a dataset as a zohpc-data HDF5 file")
    conv.add_argument("--from", dest="source", required=True, choices=("digits", "cifar10", "mnist", "synthetic", "hdf5"))
    conv.add_argument("--dir", default="", help="source directory (cifar10, mnist) or file (hdf5)")
    conv.add_argument("--out", required=True, help="output .h5 file")
    conv.add_argument("--limit", type=int, default=0, help="keep only the first N training examples")
    synthetic_opts(conv)

    info = sub.add_parser("info", help="print a short summary of a dataset")
    info.add_argument("path", nargs="?", default="", help="zohpc .h5 file (or its directory), or --name/--dir")
    info.add_argument("--name", choices=DATASET_NAMES)
    info.add_argument("--dir", default="")
    info.add_argument("--limit", type=int, default=0)
    info.add_argument("--json", action="store_true", help="print one JSON object")
    synthetic_opts(info)
    return parser


def _convert(args) -> int:
    if args.limit < 0:
        raise DataError(f"--limit must be >= 0, got {args.limit}")
    if args.source in ("cifar10", "mnist", "hdf5") and not args.dir:
        raise DataError(f"--dir is required for --from {args.source}")
    raw = load_raw(_data_config(args.source, args.dir, args))
    if args.limit:
        raw.train_x, raw.train_y = raw.train_x[: args.limit], raw.train_y[: args.limit]
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        raise DataError(f"{args.out}: output directory {out_dir} does not exist")
    try:
        write_hdf5(raw, args.out)
    except OSError as exc:
        raise DataError(f"{args.out}: cannot write ({one_line(exc)})") from None
    print(f"wrote {args.out}: {raw.name}, {raw.train_x.shape[0]} train / {raw.test_x.shape[0]} test, "
          f"shape {tuple(raw.train_x.shape[1:])}, {raw.num_classes} classes")
    return 0


def _info(args) -> int:
    if args.name and args.path:
        raise DataError("give either a PATH (zohpc .h5) or --name, not both")
    if not args.name and not args.path:
        raise DataError("give a PATH (zohpc .h5) or --name NAME")
    name, directory = (args.name, args.dir) if args.name else ("hdf5", args.path)
    splits = load_data(_data_config(name, directory, args))
    summary = _summary(splits, directory or name)
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"{summary['name']} ({summary['source']}): {summary['num_train']} train / {summary['num_test']} test, "
              f"shape {tuple(summary['input_shape'])}, {summary['num_classes']} classes")
        print(f"train class counts: {summary['train_class_counts']}")
        print(f"normalized train mean {summary['train_mean']:.4f}, std {summary['train_std']:.4f}")
    return 0


def main(argv=None) -> None:
    """``python -m zohpc.data convert|info``; user errors exit 2 with one line."""
    args = _build_parser().parse_args(argv)

    def run(comm) -> int:
        def work():
            if not comm.is_driver:  # a serial tool: under mpiexec only rank 0 works
                return 0
            return _convert(args) if args.command == "convert" else _info(args)

        return comm.agree(work)

    from ..comm import run_main

    run_main(run, "zohpc.data")
