"""``python -m zohpc.reproduce NAME``: the seed papers' tables in miniature.

Each study is a module ``zohpc.reproduce.<name>`` with:

* ``PAPER``: the published figures it is compared with (a dict);
* ``run(comm, out_dir: str, quick: bool) -> dict``: runs the study (under ``mpirun -n K``
  the ZO training inside it uses all ranks) and returns the JSON result; every rank
  calls it, rank 0's result is the one reported;
* ``table(result) -> str``: the result side by side with ``PAPER``;
* ``plot(result, path) -> None``: a PNG figure.
"""

STUDIES = ("solver_in_the_loop", "certified_defense", "blackbox_attack", "cge_vs_rge", "lizo_reference", "peft_finetune", "nas")
