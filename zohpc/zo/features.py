"""Feature marshalling for MPI: a prepared engine's cache as a list of contiguous tensors.

The driver's :meth:`FeatureCache.feature_tensors` go over MPI as buffers; a receiver
allocates them from :meth:`FeatureCache.feature_shapes` and installs them with
:meth:`FeatureCache.load_features` instead of running its own forward pass.
"""

from __future__ import annotations

import torch
from torch.fx.node import map_arg


class FeatureCache:
    """Mixin of QueryEngine: its cached activations to and from MPI buffers."""

    def set_feature_nodes(self, env):
        self._feat_nodes = [n for n in self.nodes if n.op in ("placeholder", "call_module", "call_function",
                                                              "call_method") and isinstance(env[n], torch.Tensor)]

    def feature_tensors(self) -> list:
        """Cached activations: every tensor-valued node (the input batch first), graph order.

        All are contiguous (ready for buffer-based MPI). The receiver passes them, with the
        minibatch targets and the base loss (shared by the caller), to :meth:`load_features`.
        """
        self.need_prepared()
        return [self.env[n].contiguous() for n in self._feat_nodes]

    @torch.no_grad()
    def feature_shapes(self, x_shape, x_dtype=None) -> list:
        """(shape, dtype) of each feature_tensors() entry for an input batch of shape ``x_shape``.

        ``x_dtype``: the input's dtype (integer token ids); default the model's. Found with one
        forward pass on zeros (start-up cost), so receivers can allocate buffers.
        """
        dtype = x_dtype if x_dtype is not None and not x_dtype.is_floating_point else self.dtype
        env = self.forward_cache(torch.zeros(tuple(x_shape), device=self.device, dtype=dtype))
        if self._feat_nodes is None:
            self.set_feature_nodes(env)
        return [(tuple(env[n].shape), env[n].dtype) for n in self._feat_nodes]

    @torch.no_grad()
    def load_features(self, tensors, y, base) -> None:
        """Install broadcast features (another rank's feature_tensors()) instead of prepare.

        ``y``: the minibatch targets, ``base``: the base loss (the sender's prepare value).
        """
        tensors = list(tensors)
        if self._feat_nodes is None:
            self.feature_shapes(tuple(tensors[0].shape), tensors[0].dtype)
        if len(tensors) != len(self._feat_nodes):
            raise ValueError(f"expected {len(self._feat_nodes)} feature tensors, got {len(tensors)}")
        env = {}
        for n, t in zip(self._feat_nodes, tensors):
            env[n] = self.fmt(t.to(self.device))
        for n in self.nodes:  # non-tensor values (shapes, tuples, parameters) are recomputed
            if n not in env and n.op not in ("output",):
                env[n] = self.call(n, map_arg(n.args, env.__getitem__), map_arg(n.kwargs, env.__getitem__))
        self.install(env, self.targets(y), base)


__all__ = ["FeatureCache"]
