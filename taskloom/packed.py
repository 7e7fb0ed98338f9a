"""K towers of identical structure run as one network on channel-stacked features (REFERENCE §11).

Tower k's features are channels ``k*C .. (k+1)*C - 1`` of one tensor ``(N, K*C, H, W)`` (or
features ``k*F ..`` of ``(N, K*F)``). Then

* K ``Conv2d(C_in, C_out, groups=g)`` are one ``conv2d`` with the K weights concatenated and
  ``groups=K*g`` (block-diagonal); above an input shared by every tower, ``groups=g`` and K*C_out
  outputs;
* K ``BatchNorm`` layers are one ``batch_norm`` over K*C channels: the statistics are per channel,
  so train and eval outputs and the running-statistics updates are the K towers' own;
* K ``Linear`` layers on ``(N, K*F_in)`` are one batched product ``(N, K, F_in) x (K, F_out, F_in)``;
  ``Flatten`` keeps each tower's C*H*W block contiguous, so it needs nothing;
* elementwise and per-channel modules (activations, pooling, dropout) apply as they are.

The towers keep their own parameters and buffers (``state_dict`` is unchanged): the weights are
concatenated, differentiably, on every call, as :class:`~taskloom.models.TaskParallel`'s vmap mode
stacks them. The gain is one kernel launch per layer instead of K (what limits these small
towers on a GPU: benchmarks/README.md, "GPU record"); towers with other modules (residual blocks)
run as a loop.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

# Modules that act on each channel (or element) alone: the same module serves all K towers.
PER_CHANNEL = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Hardswish,
               nn.Identity, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
               nn.Dropout, nn.Dropout2d)
WEIGHTED = (nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d, nn.Linear)


def _leaves(tower: nn.Module) -> list[nn.Module] | None:
    """The tower's layers in order, or None when it is not a chain of supported layers."""
    # (exact types: a subclass may compute something else in its forward)
    if type(tower) is nn.Sequential:
        out: list[nn.Module] = []
        for child in tower:
            inner = _leaves(child)
            if inner is None:
                return None
            out += inner
        return out
    if type(tower) is nn.Flatten:
        return [tower] if tower.start_dim == 1 and tower.end_dim == -1 else None
    if type(tower) is nn.Conv2d:
        return [tower] if tower.padding_mode == "zeros" and isinstance(tower.padding, tuple) else None
    if type(tower) in PER_CHANNEL or type(tower) in WEIGHTED:
        return [tower]
    return None


def packable(towers: list[nn.Module]) -> bool:
    """Whether ``towers`` can run packed: at least two, each a chain of supported layers
    (``nn.Sequential`` of convolutions, BatchNorm, linear layers, ``Flatten`` and per-channel
    modules) with the same layer types, hyperparameters and parameter shapes."""
    if len(towers) < 2:
        return False
    chains = [_leaves(t) for t in towers]
    if any(c is None for c in chains) or len({len(c) for c in chains}) != 1:
        return False
    for layers in zip(*chains):
        first = layers[0]
        if any(type(m) is not type(first) or repr(m) != repr(first) for m in layers[1:]):
            return False
        shapes = [(n, p.shape) for n, p in first.named_parameters()]
        if any([(n, p.shape) for n, p in m.named_parameters()] != shapes for m in layers[1:]):
            return False
        buffers = [n for n, _ in first.named_buffers()]
        if any([n for n, _ in m.named_buffers()] != buffers for m in layers[1:]):
            return False
    return True


def packed_forward(towers: list[nn.Module], xs: list[Tensor]) -> list[Tensor]:
    """``[towers[k](xs[k]) for k]`` computed as one network (the towers must be :func:`packable`).
    When every ``xs[k]`` is the same tensor (the first stage above a shared trunk), it is read
    once and not copied K times."""
    k = len(towers)
    shared = all(x is xs[0] for x in xs)
    x = xs[0] if shared else torch.cat(xs, dim=1)
    for layers in zip(*[_leaves(t) for t in towers]):
        first = layers[0]
        if isinstance(first, nn.Conv2d):
            if shared and first.groups > 1:  # grouped: the output channels would interleave the towers
                x, shared = torch.cat([x] * k, dim=1), False
            weight = torch.cat([m.weight for m in layers])
            bias = torch.cat([m.bias for m in layers]) if first.bias is not None else None
            groups = first.groups if shared else first.groups * k
            x = F.conv2d(x, weight, bias, first.stride, first.padding, first.dilation, groups)
            shared = False
        elif isinstance(first, nn.Linear):
            if x.dim() != 2:  # (a Linear over the last dimension of a feature map: not packed here)
                raise ValueError(f"packed towers: {first} gets a {x.dim()}-D input; packed execution takes "
                                 "linear layers on flat features only (use model.batched_towers: off)")
            weight = torch.stack([m.weight for m in layers])  # (K, F_out, F_in)
            y = (torch.einsum("nf,kof->nko", x, weight) if shared
                 else torch.einsum("nkf,kof->nko", x.reshape(x.shape[0], k, -1), weight))
            if first.bias is not None:
                y = y + torch.stack([m.bias for m in layers])
            x = y.reshape(y.shape[0], -1)
            shared = False
        elif isinstance(first, nn.Flatten):
            x = x.flatten(1)  # a shared input stays shared; tower blocks stay contiguous
        else:
            if shared:  # BatchNorm or an in-place activation on the trunk's tensor: one copy per tower
                x = torch.cat([x] * k, dim=1)
                shared = False
            x = _batch_norm(layers, x) if isinstance(first, (nn.BatchNorm1d, nn.BatchNorm2d)) else first(x)
    return [x] * k if shared else list(x.chunk(k, dim=1))


def _batch_norm(layers: tuple[nn.Module, ...], x: Tensor) -> Tensor:
    """K BatchNorm layers as one over K*C channels, updating each layer's running statistics as
    its own forward would (``nn.modules.batchnorm._BatchNorm.forward``)."""
    first = layers[0]
    track = first.track_running_stats and first.running_mean is not None
    factor = 0.0 if first.momentum is None else first.momentum
    if first.training and first.track_running_stats and first.num_batches_tracked is not None:
        for m in layers:
            m.num_batches_tracked.add_(1)
        if first.momentum is None:  # cumulative moving average
            factor = 1.0 / float(first.num_batches_tracked)
    use_batch_stats = first.training or not track
    mean = torch.cat([m.running_mean for m in layers]) if track else None
    var = torch.cat([m.running_var for m in layers]) if track else None
    weight = torch.cat([m.weight for m in layers]) if first.affine else None
    bias = torch.cat([m.bias for m in layers]) if first.affine else None
    # F.batch_norm updates ``mean`` / ``var`` in place in training: copy them back to the layers
    out = F.batch_norm(x, mean, var, weight, bias, use_batch_stats, factor, first.eps)
    if track and first.training:
        with torch.no_grad():
            for m, mu, v in zip(layers, mean.chunk(len(layers)), var.chunk(len(layers))):
                m.running_mean.copy_(mu)
                m.running_var.copy_(v)
    return out
