"""The one place that turns ``zo.estimator`` into a step object (and its query engine)."""

from __future__ import annotations

from ..config import estimator_name
from ..errors import ConfigError
from .cge import CGEStep
from .graybox import GrayBoxStep
from .lizo import LIZOStep
from .rge import RGEStep
from .spsa import SPSAStep


def make_engine(model, objective, cfg):
    """The CGE query engine: per-layer feature reuse, or full forwards with the reason why.

    ``zo.precision`` reaches the per-layer engine only; full forwards (no feature cache to
    take differences from) run in the model's dtype.
    """
    from ..zo.engine import NondeterministicModelError, QueryEngine
    from ..zo.stacked import FullForwardEngine

    if not cfg.zo.feature_reuse:
        return FullForwardEngine(model, objective, cfg.zo.query_batch), "zo.feature_reuse = false"
    try:
        return QueryEngine(model, objective=objective, query_batch=cfg.zo.query_batch,
                           precision=cfg.zo.precision), None
    except NondeterministicModelError:
        raise
    except ConfigError as exc:  # the model cannot be traced: every query is a full forward
        return FullForwardEngine(model, objective, cfg.zo.query_batch), str(exc)


def build_step(cfg, comm, model, optimizer, objective, *, stop=None, progress=None):
    """The step of ``zo.estimator`` (cge | rge | lizo | spsa), or gray-box CGE at the model's
    outputs with ``zo.boundary = "outputs"``. ``optimizer``: the one
    :func:`zohpc.trainer.build_optimizer` made for that estimator (LIZO and SPSA are their own
    optimizers); ``progress(step)``: a callback factory for long steps (CGE), or None."""
    if cfg.zo.boundary == "outputs":  # gray-box: CGE at the outputs, backprop through the model
        return GrayBoxStep(comm, model, optimizer, objective, mu=cfg.zo.mu, difference=cfg.zo.difference,
                           query_batch=cfg.zo.query_batch, stop=stop)
    name = estimator_name(cfg)
    if name == "lizo":
        return LIZOStep(comm, model, optimizer, objective, stop=stop)
    if name == "spsa":
        return SPSAStep(comm, model, optimizer, objective, stop=stop, check_every=cfg.zo.spsa_check_every)
    if name == "rge":
        from ..zo.stacked import StackedForward

        evaluator = StackedForward(model, objective, cfg.zo.query_batch)
        return RGEStep(comm, model, evaluator, optimizer, mu=cfg.zo.mu, queries=cfg.zo.rge_queries,
                       seed=cfg.train.seed, stop=stop)
    engine, reason = make_engine(model, objective, cfg)
    step = CGEStep(comm, model, engine, optimizer, mu=cfg.zo.mu, difference=cfg.zo.difference,
                   features=cfg.zo.features, stop=stop, progress=progress)
    step.reuse_off_reason = reason
    return step
