"""The Med-Adapter math (DESIGN.md section 2), in an exact fast form.

The paper's reference code folds the tokens into a channels-first volume ``(B, r, D, h, w)`` and runs
3D convolutions and a 3D FFT on it. Here the adapter works on the slice batch ``(B*D, r, h, w)``:

- the in-plane ``1 x k x k`` depthwise Conv3d is a ``k x k`` depthwise Conv2d over the slices,
- the ``k x 1 x 1`` depthwise Conv3d across slices is a sum of k shifted, per-channel scaled copies
  along D (zero padded, exactly what the convolution computes),
- BatchNorm3d over ``(B, r, D, h, w)`` has the same per-channel statistics as over
  ``(B*D, r, 1, h, w)``,
- the 3D spectral filter, whose weights vary along the slice frequency only, is a 1D FFT along D
  plus the inverse transform of its bias at the in-plane (0, 0) token (the in-plane transforms cancel).

Parameters keep the reference shapes (Conv3d weights), so parameter counts match the paper exactly and
``tests/test_med_adapter_math.py`` compares this form with a direct transcription of the 3D formula.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def resample_periodic(values: torch.Tensor, size: int) -> torch.Tensor:
    """Linearly resample a filter sampled on a periodic normalized-frequency axis.

    Bin k of ``T = len(values)`` bins sits at normalized frequency k / T (periodic with period 1), so
    bin j of the result is read at position j * T / size, interpolating between the neighbouring bins
    with wrap-around. ``size == T`` returns ``values`` itself, untouched.

    Args:
        values: (T,) filter values.
        size: number of bins wanted (the runtime slice count D).

    Returns:
        (size,) tensor, differentiable with respect to ``values``.
    """
    num_bins = values.shape[0]
    if size == num_bins:
        return values
    pos = torch.arange(size, device=values.device, dtype=torch.float64) * (num_bins / size)
    lo = pos.floor().long() % num_bins
    hi = (lo + 1) % num_bins
    frac = (pos - pos.floor()).to(values.dtype)
    return values[lo] * (1 - frac) + values[hi] * frac


def _slices_view(x: torch.Tensor, num_slices: int) -> torch.Tensor:
    # (B*D, r, h, w) -> (B, D, r, h, w)
    return x.view(x.shape[0] // num_slices, num_slices, *x.shape[1:])


class DepthwiseBranch(nn.Module):
    """One convolution branch: in-plane k x k depthwise, then k x 1 x 1 depthwise across slices, BN, ReLU.

    Args:
        channels: bottleneck width r.
        kernel_size: odd k.
    """

    def __init__(self, channels: int, kernel_size: int) -> None:
        super().__init__()
        k = kernel_size
        self.kernel_size = k
        self.inplane = nn.Conv3d(channels, channels, (1, k, k), padding=(0, k // 2, k // 2), groups=channels)
        self.across = nn.Conv3d(channels, channels, (k, 1, 1), padding=(k // 2, 0, 0), groups=channels)
        self.norm = nn.BatchNorm3d(channels)

    def forward(self, v: torch.Tensor, num_slices: int) -> torch.Tensor:
        """(B*D, r, h, w) -> (B*D, r, h, w)."""
        k, r = self.kernel_size, v.shape[1]
        # (r, 1, 1, k, k) -> (r, 1, k, k): the in-plane kernel as a 2D depthwise conv over the slices.
        y = F.conv2d(v, self.inplane.weight.squeeze(2), self.inplane.bias, padding=k // 2, groups=r)
        y = self._across_slices(y, num_slices)
        # (B*D, r, h, w) -> (B*D, r, 1, h, w): BatchNorm3d statistics per channel over B, D, h, w.
        y = self.norm(y.unsqueeze(2)).squeeze(2)
        return F.relu(y)

    def _across_slices(self, y: torch.Tensor, num_slices: int) -> torch.Tensor:
        k, r = self.kernel_size, y.shape[1]
        vol = _slices_view(y, num_slices)  # (B, D, r, h, w)
        # Zero padding along D, then out[d] = sum_t weight[t] * in[d + t - k//2] + bias: the conv3d exactly.
        padded = F.pad(vol, (0, 0, 0, 0, 0, 0, k // 2, k // 2))  # (B, D + k - 1, r, h, w)
        weight = self.across.weight.view(r, k).t()  # (r, 1, k, 1, 1) -> (k, r)
        out = self.across.bias.view(1, 1, r, 1, 1).to(y.dtype)
        for t in range(k):
            out = out + padded[:, t : t + num_slices] * weight[t].view(1, 1, r, 1, 1).to(y.dtype)
        return out.reshape(y.shape)  # (B, D, r, h, w) -> (B*D, r, h, w)


class SpectralFilter(nn.Module):
    """The spectral branch: ``| ifft_D(fft_D(V) * w) + ifft_D(b)[d] * delta(h=0, w=0) |``.

    Exactly the reference's ``| IFFT3(FFT3(V) * w[kD] + b[kD]) |`` (w and b vary along the slice
    frequency only). Runs in float32 (or float64 for float64 inputs) with autocast off: torch.fft rejects
    bf16/fp16 on CPU and cuFFT half precision needs power-of-2 sizes.

    Args:
        num_slices: number of frequency bins T of w and b (initialized to ones, as in the reference).
    """

    def __init__(self, num_slices: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_slices))
        self.bias = nn.Parameter(torch.ones(num_slices))

    def forward(self, v: torch.Tensor, num_slices: int) -> torch.Tensor:
        """(B*D, r, h, w) -> (B*D, r, h, w)."""
        dtype = torch.promote_types(v.dtype, torch.float32)
        with torch.autocast(device_type=v.device.type, enabled=False):
            weight = resample_periodic(self.weight, num_slices).to(dtype)
            bias = resample_periodic(self.bias, num_slices).to(dtype)
            vol = _slices_view(v.to(dtype), num_slices)  # (B, D, r, h, w)
            spec = torch.fft.fft(vol, dim=1) * weight.view(1, num_slices, 1, 1, 1)
            out = torch.fft.ifft(spec, dim=1)  # complex (B, D, r, h, w)
            out[:, :, :, 0, 0] += torch.fft.ifft(bias.to(out.dtype)).view(1, num_slices, 1)
            return out.abs().reshape(v.shape).to(v.dtype)  # (B, D, r, h, w) -> (B*D, r, h, w)


class MedAdapter(nn.Module):
    """One Med-Adapter, placed after one frozen transformer block.

    Args:
        hidden_size: token width C of the block.
        reduction_ratio: r = C // reduction_ratio.
        kernel_sizes: one :class:`DepthwiseBranch` per odd size.
        use_fft: add a :class:`SpectralFilter`.
        num_slices: frequency bins of the spectral filter.
        prev_channels: width r_prev of the previous stage's features for Inter-FI; None disables Inter-FI
            for this block.
        prev_spatial: True when the previous features live on a finer grid (hierarchical backbones:
            P is a 1 x 3 x 3 conv with stride 2 where the grid shrank); False for plain backbones (P is
            1 x 1 x 1).
        init_identity: zero-init the up-projection so the block's output is unchanged at start.
        act_layer: activation of the projections (GELU in the paper).

    Raises:
        ValueError: when C // reduction_ratio is 0.
    """

    def __init__(
        self,
        hidden_size: int,
        reduction_ratio: int,
        kernel_sizes: tuple[int, ...],
        use_fft: bool,
        num_slices: int,
        prev_channels: int | None = None,
        prev_spatial: bool = True,
        init_identity: bool = False,
        act_layer: type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        r = hidden_size // reduction_ratio
        if r < 1:
            raise ValueError(
                f"MedAdapterConfig.reduction_ratio={reduction_ratio} leaves no bottleneck for a block of width "
                f"{hidden_size}; use reduction_ratio <= {hidden_size}."
            )
        self.hidden_size, self.bottleneck = hidden_size, r
        self.init_identity = init_identity
        self.down = nn.Linear(hidden_size, r)
        self.up = nn.Linear(r, hidden_size)
        self.act = act_layer()
        self.branches = nn.ModuleList(DepthwiseBranch(r, k) for k in kernel_sizes)
        self.spectral = SpectralFilter(num_slices) if use_fft else None
        self.mix = nn.Conv3d(r, r, 1)
        self.prev_spatial = prev_spatial
        if prev_channels is None:
            self.project_prev, self.fuse = None, None
        elif prev_spatial:
            self.project_prev = nn.Conv3d(prev_channels, r, (1, 3, 3), padding=(0, 1, 1))
            self.fuse = nn.Conv3d(2 * r, r, 1)
        else:
            self.project_prev = nn.Conv3d(prev_channels, r, 1)
            self.fuse = nn.Conv3d(2 * r, r, 1)
        self.reset_parameters()

    @property
    def is_inter_stage(self) -> bool:
        return self.fuse is not None

    def reset_parameters(self) -> None:
        """PyTorch default initialization (as the reference), optionally with a zero up-projection."""
        if self.init_identity:
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def forward(
        self,
        x: torch.Tensor,
        grid: tuple[int, int],
        num_slices: int,
        prev: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Adapt the grid tokens of one block's output.

        Args:
            x: (B*D, h*w, C) grid tokens (prefix tokens already removed), volume-major.
            grid: (h, w).
            num_slices: D.
            prev: (B*D, r_prev, h', w') features A of the previous inter-stage adapter, or None for the
                first one (the reference feeds zeros there, so P contributes only its bias).

        Returns:
            The adapted tokens (B*D, h*w, C), and this adapter's A (B*D, r, h, w) when it is an
            inter-stage adapter (else None).
        """
        h, w = grid
        n = x.shape[0]
        r = self.bottleneck
        z = self.act(self.down(x))  # (B*D, h*w, r)
        v = z.transpose(1, 2).reshape(n, r, h, w)  # (B*D, h*w, r) -> (B*D, r, h, w)
        feats = [branch(v, num_slices) for branch in self.branches]
        if self.spectral is not None:
            feats.append(self.spectral(v, num_slices))
        y = F.conv2d(sum(feats), self.mix.weight.view(r, r, 1, 1), self.mix.bias)  # (B*D, r, h, w)
        a = None
        if self.fuse is not None:
            p = self._project_prev(prev, n, h, w, y.dtype)  # (B*D, r, h, w)
            a = F.conv2d(torch.cat([y, p], dim=1), self.fuse.weight.view(r, 2 * r, 1, 1), self.fuse.bias)
            y = a
        u = v + y  # (B*D, r, h, w)
        tokens = u.flatten(2).transpose(1, 2)  # (B*D, r, h, w) -> (B*D, h*w, r)
        return x + self.act(self.up(tokens)), a

    def _project_prev(
        self, prev: torch.Tensor | None, n: int, h: int, w: int, dtype: torch.dtype
    ) -> torch.Tensor:
        proj = self.project_prev
        r = self.bottleneck
        if prev is None:
            # The reference convolves zeros: the result is the bias at every position, exactly.
            return proj.bias.to(dtype).view(1, r, 1, 1).expand(n, r, h, w)
        if not self.prev_spatial:
            return F.conv2d(prev, proj.weight.view(r, -1, 1, 1), proj.bias)
        ph, pw = prev.shape[-2:]
        if (ph, pw) == (h, w):
            stride = 1
        elif (-(-ph // 2), -(-pw // 2)) == (h, w):
            stride = 2
        else:
            raise ValueError(
                f"Inter-stage features on a {ph}x{pw} token grid cannot be fused into a {h}x{w} grid: consecutive "
                "inter-stage blocks must share the grid or halve it. Check `inter_stage_modules`."
            )
        # (r, r_prev, 1, 3, 3) -> (r, r_prev, 3, 3); stride 2 gives ceil(h'/2) x ceil(w'/2).
        return F.conv2d(prev, proj.weight.squeeze(2), proj.bias, stride=stride, padding=1)
