"""A direct transcription of the paper's 3D Med-Adapter formula, kept as the reference.

It folds the tokens into a channels-first volume (B, r, D, h, w) and applies the Conv3d modules, a 3D
FFT and BatchNorm3d as the paper's released code does. It shares the parameters of a
:class:`~medtuning_peft.tuners.med_adapter.modules.MedAdapter`, so the fast form can be checked
against it (tests) and timed against it (benchmarks). It only runs at D == num_slices, as the
reference code.

:func:`reference_form` switches every adapter of a model to this form (``MedAdapter.use_reference_form``),
so a whole adapted model can be run, trained and timed with the reference math and the same parameters.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .modules import MedAdapter


def set_reference_form(model: nn.Module, enabled: bool = True) -> int:
    """Make every :class:`MedAdapter` in ``model`` run :func:`reference_forward` (or the fast form again).

    Args:
        model: any module holding Med-Adapters (a PeftModel, a segmenter, one adapter).
        enabled: True for the reference form, False for the fast form.

    Returns:
        The number of adapters switched.
    """
    adapters = [m for m in model.modules() if isinstance(m, MedAdapter)]
    for adapter in adapters:
        adapter.use_reference_form = enabled
    return len(adapters)


@contextlib.contextmanager
def reference_form(model: nn.Module) -> Iterator[int]:
    """Run the adapters of ``model`` in the reference form inside the block; yields how many there are.

    Example:
        >>> with reference_form(peft_model):
        ...     out_ref = peft_model(pixel_values=slices, num_slices=D)
    """
    adapters = [m for m in model.modules() if isinstance(m, MedAdapter)]
    previous = [a.use_reference_form for a in adapters]
    try:
        yield set_reference_form(model, True)
    finally:
        for adapter, was in zip(adapters, previous):
            adapter.use_reference_form = was


def reference_forward(
    adapter: MedAdapter,
    x: torch.Tensor,
    grid: tuple[int, int],
    num_slices: int,
    prev: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The reference Med-Adapter on grid tokens.

    Args:
        adapter: the module whose parameters are used.
        x: (B*D, h*w, C) grid tokens, volume-major.
        grid: (h, w).
        num_slices: D; must equal the spectral filter's bin count when the filter is on.
        prev: (B, r_prev, D, h', w') previous inter-stage features in the reference layout, or None.

    Returns:
        (B*D, h*w, C) adapted tokens and this adapter's A as (B, r, D, h, w) (None when not inter-stage).
    """
    h, w = grid
    n, _, _ = x.shape
    b, d, r = n // num_slices, num_slices, adapter.bottleneck
    z = adapter.act(adapter.down(x))  # (B*D, h*w, r)
    v = z.view(b, d, h, w, r).permute(0, 4, 1, 2, 3)  # (B*D, h*w, r) -> (B, r, D, h, w)
    feats = []
    for branch in adapter.branches:
        y = branch.across(branch.inplane(v))  # depthwise 1 x k x k, then k x 1 x 1, 'same' padding
        feats.append(F.relu(branch.norm(y)))
    if adapter.spectral is not None:
        wt = adapter.spectral.weight.view(1, 1, d, 1, 1)
        bs = adapter.spectral.bias.view(1, 1, d, 1, 1)
        spec = torch.fft.fftn(v.to(torch.promote_types(v.dtype, torch.float32)), dim=(2, 3, 4))
        feats.append(torch.fft.ifftn(spec * wt + bs, dim=(2, 3, 4)).abs().to(v.dtype))
    y = adapter.mix(sum(feats))  # (B, r, D, h, w)
    a = None
    if adapter.fuse is not None:
        if prev is None:
            shape = (
                (b, adapter.project_prev.in_channels, d, 2 * h, 2 * w)
                if adapter.prev_spatial
                else (b, r, d, h, w)
            )
            prev = v.new_zeros(shape)
        proj = adapter.project_prev
        if adapter.prev_spatial:
            stride = 1 if prev.shape[-2:] == (h, w) else 2
            p = F.conv3d(prev, proj.weight, proj.bias, stride=(1, stride, stride), padding=(0, 1, 1))
        else:
            p = proj(prev)
        a = adapter.fuse(torch.cat([y, p], dim=1))
        y = a
    u = v + y
    tokens = u.permute(0, 2, 3, 4, 1).reshape(n, h * w, r)  # (B, r, D, h, w) -> (B*D, h*w, r)
    return x + adapter.act(adapter.up(tokens)), a
