"""``python -m zohpc.export CHECKPOINT OUT.h5``: the merged weights of a LoRA run.

The checkpoint holds the adapters (and the fingerprint of the frozen base); the base is
re-made from the task of the checkpoint's stored config (its factory, or its Hugging Face
directory), the adapters are loaded, and every adapted Linear is merged to
``W + (alpha / r) B A`` (:func:`zohpc.lora.merge_adapters`). ``OUT.h5`` (HDF5, written
atomically, ``format = "zohpc-weights"``) holds ``weights/<name>`` for every parameter and
buffer of the merged model, under the base model's own names (``...q_proj.weight``).
:func:`merged_model` does the same from Python. A run without adapters exports its weights as they are.
"""

from __future__ import annotations

import argparse

import torch

from .errors import CheckpointError

FORMAT_NAME = "zohpc-weights"
FORMAT_VERSION = 1


def merged_model(checkpoint_path: str) -> torch.nn.Module:
    """The task's model with the checkpoint's trained parameters, adapters merged."""
    from .checkpoint import load_checkpoint
    from .config import from_toml_text
    from .lora import apply_lora, frozen_fingerprint, merge_adapters
    from .tasks.loading import build_task

    state = load_checkpoint(checkpoint_path)
    cfg = from_toml_text(state.config_toml, f"{checkpoint_path}: stored config", check_paths=False)
    model = build_task(cfg).model
    if cfg.lora.target:
        apply_lora(model, cfg.lora, cfg.train.seed)
    if frozen_fingerprint(model) != str(state.extra.get("frozen_sha256", "")):
        raise CheckpointError(f"{checkpoint_path}: the base model re-made from the stored config differs from "
                              f"the one trained (frozen parameters changed)")
    named = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.params.items():
            if name not in named:
                raise CheckpointError(f"{checkpoint_path}: parameter {name} is not in the model")
            named[name].copy_(value)
        buffers = dict(model.named_buffers())
        for name, value in state.buffers.items():
            if name in buffers:
                buffers[name].copy_(value)
    return merge_adapters(model)


def write_weights(path: str, model: torch.nn.Module) -> int:
    """Every parameter and persistent buffer of ``model`` as ``weights/<name>``; returns the count."""
    from .h5util import atomic_h5, write_array

    state = model.state_dict()
    with atomic_h5(path, FORMAT_NAME, FORMAT_VERSION) as fh:
        group = fh.create_group("weights")
        for name, t in state.items():
            write_array(group, name.replace("/", "_"), t.detach().cpu().contiguous().numpy())
    return len(state)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m zohpc.export",
                                description="Write the merged weights (base + LoRA adapters) of a checkpoint.")
    p.add_argument("checkpoint", help="a checkpoint file of a run (checkpoints/*.h5)")
    p.add_argument("out", help="the HDF5 file to write")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists (refused otherwise)")
    args = p.parse_args(argv)
    from .comm import run_main
    from .fsio import check_new_file

    def export():  # on the driver; a refusal reaches every rank (Comm.agree): exit 2, one line
        check_new_file(args.out, "OUT", args.force, keep=(args.checkpoint,))
        n = write_weights(args.out, merged_model(args.checkpoint))
        print(f"zohpc.export: wrote {n} tensors to {args.out}")

    def entry(comm):
        comm.agree(lambda: export() if comm.is_driver else None)
        return 0

    run_main(entry, "zohpc.export")


if __name__ == "__main__":
    main()
