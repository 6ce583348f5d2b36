"""The Med-Adapter math (Med-Tuning, MIDL 2024, and its released code), in an exact fast form.

The paper's reference code folds the tokens into a channels-first volume ``(B, r, D, h, w)`` and runs
3D convolutions and a 3D FFT on it. Here the adapter works on the slice batch ``(B*D, r, h, w)``, kept
in channels-last memory: the down-projected tokens ``(B*D, h*w, r)`` already are that layout, so the
fold and unfold are views, not copies.

- the in-plane ``1 x k x k`` depthwise Conv3d is a ``k x k`` depthwise Conv2d over the slices,
- the ``k x 1 x 1`` depthwise Conv3d across slices is a ``k x 1`` depthwise Conv2d on the view
  ``(B, r, D, h*w)`` of the same memory (zero padded along D within each volume, as the Conv3d),
- BatchNorm3d over ``(B, r, D, h, w)`` has the same per-channel statistics as over the slice batch,
- the 3D spectral filter, whose weights vary along the slice frequency only, is a circular filter along
  D plus the inverse transform of its bias at the in-plane (0, 0) token (the in-plane transforms cancel);
  it runs as a 1D FFT along D, or, for short volumes, as one ``2D x D`` real matrix product (the real
  and imaginary parts of the circulant matrix), which is exact up to float rounding and cheaper there,
- the ``1 x 1 x 1`` convolutions (channel mixing, Inter-FI fusion) are matrix products on the tokens.

Parameters keep the reference shapes (Conv3d weights), so parameter counts match the paper exactly and
``tests/test_med_adapter_math.py`` compares this form with a direct transcription of the 3D formula
(:func:`~medtuning_peft.tuners.med_adapter.reference.reference_forward`), which every adapter can also be
switched to (``MedAdapter.use_reference_form``) for side-by-side timing.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Any, ClassVar

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


def autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` (False where it is not available, e.g. "meta")."""
    # Under torch.compile the availability check is skipped: Dynamo of some torch versions (2.11, for one) cannot
    # trace it and would break the graph at every adapter, and a compiled graph never runs on "meta".
    if not torch.compiler.is_compiling() and not torch.amp.is_autocast_available(device_type):
        return False
    return torch.is_autocast_enabled(device_type)


def _autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast disabled on ``device_type``; a no-op where it is not on."""
    if autocast_enabled(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def _volume_rows(v: torch.Tensor, num_slices: int) -> torch.Tensor:
    """(B*D, r, h, w) -> (B, D, h*w*r): one row per slice, in channels-last order (a view if v is)."""
    n, r, h, w = v.shape
    # (B*D, r, h, w) -> (B*D, h, w, r) -> (B, D, h*w*r)
    return v.permute(0, 2, 3, 1).reshape(n // num_slices, num_slices, h * w * r)


def _slices_from_rows(rows: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Inverse of :func:`_volume_rows`: (B, D, h*w*r) -> (B*D, r, h, w) in channels-last memory."""
    n, r, h, w = shape
    # (B, D, h*w*r) -> (B*D, h, w, r) -> (B*D, r, h, w)
    return rows.reshape(n, h, w, r).permute(0, 3, 1, 2)


class DepthwiseBranch(nn.Module):
    """One convolution branch: in-plane k x k depthwise, then k x 1 x 1 depthwise across slices, BN, ReLU.

    The two depthwise convolutions run in one of two forms of the same function:

    - ``"convolution"``: ``F.conv2d`` (cuDNN / oneDNN depthwise kernels): the fewest operations eagerly.
    - ``"shifts"``: sums of zero-padded, shifted copies scaled per channel (k^2 + k terms): element-wise work
      that ``torch.compile`` fuses into a few kernels with the BatchNorm and ReLU around it, where a compiled
      convolution stays an external call (several kernel launches each on cuDNN, forward and backward).

    Args:
        channels: bottleneck width r.
        kernel_size: odd k.

    Attributes:
        form: ``"convolution"``, ``"shifts"``, or None (default): ``"convolution"`` eagerly and
            :attr:`compiled_form` of the device type under ``torch.compile``.
    """

    forms: ClassVar[tuple[str, ...]] = ("convolution", "shifts")
    compiled_form: ClassVar[dict[str, str]] = {"cpu": "convolution", "cuda": "shifts"}
    """The form under ``torch.compile`` when :attr:`form` is None, per device type (others: convolution). On CPU,
    compiled oneDNN convolutions ran one adapter faster than compiled shifted sums at 4 of the paper's 5 block
    shapes (``benchmarks/cost.md``, "Compiled adapters"); on CUDA, where the step is bound by many small kernels,
    the shifted sums leave 36-38 generated kernels and library calls per adapter against 53 with the convolutions,
    12 of which are multi-launch cuDNN calls (eagerly: about 155 CUDA kernels)."""

    def __init__(self, channels: int, kernel_size: int) -> None:
        super().__init__()
        k = kernel_size
        self.kernel_size = k
        self.inplane = nn.Conv3d(channels, channels, (1, k, k), padding=(0, k // 2, k // 2), groups=channels)
        self.across = nn.Conv3d(channels, channels, (k, 1, 1), padding=(k // 2, 0, 0), groups=channels)
        self.norm = nn.BatchNorm3d(channels)
        self.form: str | None = None

    def forward(self, v: torch.Tensor, num_slices: int) -> torch.Tensor:
        """(B*D, r, h, w) -> (B*D, r, h, w); channels-last in gives channels-last out, without copies."""
        form = self.form
        if form is None:
            compiling = torch.compiler.is_compiling()
            form = self.compiled_form.get(v.device.type, "convolution") if compiling else "convolution"
        if form not in self.forms:
            raise ValueError(
                f"DepthwiseBranch form {form!r}: use one of {self.forms} (or None for the default)."
            )
        y = self._shifted_sums(v, num_slices) if form == "shifts" else self._convolutions(v, num_slices)
        # (B*D, r, h, w) -> (B*D, r, 1, h, w): BatchNorm3d statistics per channel over B, D, h, w.
        y = self.norm(y.unsqueeze(2)).squeeze(2)
        return F.relu(y)

    def _convolutions(self, v: torch.Tensor, num_slices: int) -> torch.Tensor:
        k, (_, r, h, w) = self.kernel_size, v.shape
        # (r, 1, 1, k, k) -> (r, 1, k, k): the in-plane kernel as a 2D depthwise conv over the slices.
        y = F.conv2d(v, self.inplane.weight.squeeze(2), self.inplane.bias, padding=k // 2, groups=r)
        rows = _volume_rows(y, num_slices)  # (B, D, h*w*r)
        # (B, D, h*w*r) -> (B, D, h*w, r) -> (B, r, D, h*w): channels-last view of the same memory.
        vol = rows.view(rows.shape[0], num_slices, h * w, r).permute(0, 3, 1, 2)
        # (r, 1, k, 1, 1) -> (r, 1, k, 1): zero padding along D within each volume, as the Conv3d.
        out = F.conv2d(vol, self.across.weight.squeeze(-1), self.across.bias, padding=(k // 2, 0), groups=r)
        # (B, r, D, h*w) -> (B, D, h*w, r) -> (B, D, h*w*r)
        return _slices_from_rows(out.permute(0, 2, 3, 1).reshape(rows.shape), y.shape)

    def _shifted_sums(self, v: torch.Tensor, num_slices: int) -> torch.Tensor:
        # Written out by hand: a depthwise convolution as shifted multiply-adds is what lets the compiler fuse it
        # (no library offers that form); eagerly it is k^2 + k operations, so the default there is the conv.
        k, (_, r, h, w) = self.kernel_size, v.shape
        pad = k // 2
        inplane = self.inplane.weight.view(r, k * k)  # (r, 1, 1, k, k) -> (r, k*k)
        padded = F.pad(v, (pad, pad, pad, pad))  # (B*D, r, h + 2p, w + 2p), zeros outside each slice
        y = self.inplane.bias.view(1, r, 1, 1)
        for i in range(k):
            for j in range(k):
                y = y + padded[:, :, i : i + h, j : j + w] * inplane[:, i * k + j].view(1, r, 1, 1)
        # (B*D, r, h, w) -> (B, D, h*w*r) -> (B, D, h*w, r), padded along D within each volume.
        rows = _volume_rows(y, num_slices)
        vol = rows.reshape(rows.shape[0], num_slices, h * w, r)
        padded = F.pad(vol, (0, 0, 0, 0, pad, pad))  # (B, D + 2p, h*w, r)
        across = self.across.weight.view(r, k)  # (r, 1, k, 1, 1) -> (r, k)
        out = self.across.bias.view(1, 1, 1, r)
        for i in range(k):
            out = out + padded[:, i : i + num_slices] * across[:, i]
        return _slices_from_rows(out.reshape(rows.shape), y.shape)


class _CirculantMagnitude(torch.autograd.Function):
    """``|C v + bias|`` along D for a complex circulant C given as stacked real/imaginary parts.

    Forward: ``z = mat @ rows`` with ``mat = [Re C; Im C]`` (2D, D) and ``rows`` (B, D, L); ``bias``
    (2D,) is added to the first ``width`` columns (the in-plane (0, 0) token); the result is
    ``hypot(Re z, Im z)``. The gradient of the magnitude is ``Re z / |z|``, ``Im z / |z|`` and 0 where
    ``|z| = 0``, as for ``torch.abs`` of a complex tensor.
    """

    @staticmethod
    def forward(
        ctx: Any, rows: torch.Tensor, mat: torch.Tensor, bias: torch.Tensor, width: int
    ) -> torch.Tensor:
        b, d, length = rows.shape
        # (2D, D) @ (B, D, L) -> (B, 2D, L) as a batched product with the matrix broadcast (stride 0):
        # torch.matmul would copy ``rows`` into (B*L, D) and the result back.
        z = torch.bmm(mat.expand(b, 2 * d, d), rows)
        z[:, :, :width].add_(bias.view(1, 2 * d, 1))
        parts = z.view(b, 2, d, length)  # (B, 2D, L) -> (B, 2, D, L): real, imaginary
        magnitude = torch.hypot(parts[:, 0], parts[:, 1])  # (B, D, L)
        ctx.save_for_backward(rows, mat, z, magnitude)
        ctx.width = width
        return magnitude

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        rows, mat, z, magnitude = ctx.saved_tensors
        b, d, length = rows.shape
        scale = torch.where(magnitude > 0, grad / magnitude, 0.0)  # (B, D, L)
        # (B, 2D, L) -> (B, 2, D, L), times (B, 1, D, L) -> (B, 2D, L): d|z| / d(Re z, Im z)
        grad_z = (z.view(b, 2, d, length) * scale.unsqueeze(1)).view(b, 2 * d, length)
        grad_rows = grad_mat = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_rows = torch.bmm(mat.t().expand(b, d, 2 * d), grad_z)  # (D, 2D) @ (B, 2D, L) -> (B, D, L)
        if ctx.needs_input_grad[1]:
            grad_mat = torch.bmm(grad_z, rows.transpose(1, 2)).sum(0)  # (B, 2D, D) -> (2D, D)
        if ctx.needs_input_grad[2]:
            grad_bias = grad_z[:, :, : ctx.width].sum((0, 2))  # (2D,)
        return grad_rows, grad_mat, grad_bias, None


def _build_inverse_dft_basis(
    num_slices: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Constant matrices mapping a filter to the circulant of its inverse DFT, and to its inverse DFT.

    ``circulant @ w`` is ``[Re C; Im C]`` flattened, with ``C[d, e] = ifft(w)[(d - e) mod D]``;
    ``inverse @ b`` is ``[Re ifft(b); Im ifft(b)]``. Built in float64 from exact integer phases.

    Returns:
        (2D^2, D) and (2D, D) tensors of ``dtype`` on ``device``.
    """
    d = num_slices
    steps = torch.arange(d, dtype=torch.int64)
    lag = (steps.view(d, 1) - steps.view(1, d)) % d  # (D, D): d - e
    phase = (lag.view(d, d, 1) * steps.view(1, 1, d)) % d  # (D, D, D): (d - e) * k mod D
    angle = phase.to(torch.float64) * (2 * math.pi / d)
    circulant = torch.stack([angle.cos(), angle.sin()]) / d  # (2, D, D, D): real, imaginary
    # e = 0 gives the inverse transform itself: (2, D, D, D) -> (2, D, D) -> (2D, D)
    inverse = circulant[:, :, 0, :].reshape(2 * d, d)
    # (2, D, D, D) -> (2D^2, D)
    return circulant.reshape(2 * d * d, d).to(device=device, dtype=dtype), inverse.to(
        device=device, dtype=dtype
    )


@functools.lru_cache(maxsize=32)
def _inverse_dft_basis(
    num_slices: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cached :func:`_build_inverse_dft_basis` for eager mode (torch.compile traces the builder instead).

    The cache serves every later call in the process, so its tensors are built as normal tensors whatever the
    first caller's mode: inference tensors (built under ``torch.inference_mode()``) could not be saved for a
    later training backward.
    """
    with torch.inference_mode(False):
        return _build_inverse_dft_basis(num_slices, dtype, device)


class SpectralFilter(nn.Module):
    """The spectral branch: ``| ifft_D(fft_D(V) * w) + ifft_D(b)[d] * delta(h=0, w=0) |``.

    Exactly the reference's ``| IFFT3(FFT3(V) * w[kD] + b[kD]) |`` (w and b vary along the slice
    frequency only). ``ifft_D(fft_D(V) * w)`` is the circular convolution of V along D with
    ``c = ifft(w)``: for D up to :attr:`matmul_max_slices` of the device it runs as one real matrix
    product with the stacked real and imaginary parts of that circulant (fewer, larger operations),
    otherwise as a 1D FFT. Both run in float32 (or float64 for float64 inputs) with autocast off: torch.fft
    rejects bf16/fp16 on CPU and cuFFT half precision needs power-of-2 sizes.

    Args:
        num_slices: number of frequency bins T of w and b (initialized to ones, as in the reference).
    """

    matmul_max_slices: ClassVar[dict[str, int]] = {"cpu": 64, "cuda": 128}
    """Largest D that uses the matrix product, per device type (others: the FFT)."""

    def __init__(self, num_slices: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_slices))
        self.bias = nn.Parameter(torch.ones(num_slices))
        self.use_matmul: bool | None = None  # None: by device and D (matmul_max_slices)

    def uses_matmul(self, num_slices: int, device: torch.device) -> bool:
        """Whether a forward with D = ``num_slices`` on ``device`` takes the matrix-product form."""
        if self.use_matmul is not None:
            return self.use_matmul
        return num_slices <= self.matmul_max_slices.get(device.type, 0)

    def forward(self, v: torch.Tensor, num_slices: int) -> torch.Tensor:
        """(B*D, r, h, w) -> (B*D, r, h, w); channels-last memory in and out avoids copies."""
        dtype = torch.promote_types(v.dtype, torch.float32)
        r = v.shape[1]
        with _autocast_off(v.device.type):
            weight = resample_periodic(self.weight, num_slices).to(dtype)
            bias = resample_periodic(self.bias, num_slices).to(dtype)
            rows = _volume_rows(v, num_slices).to(dtype)  # (B, D, h*w*r); the (0, 0) token is [:r]
            if self.uses_matmul(num_slices, v.device):
                basis = _build_inverse_dft_basis if torch.compiler.is_compiling() else _inverse_dft_basis
                circulant, inverse = basis(num_slices, dtype, v.device)
                mat = (circulant @ weight).view(2 * num_slices, num_slices)  # [Re C; Im C]
                out = _CirculantMagnitude.apply(rows, mat, inverse @ bias, r)  # bias: [Re; Im] ifft(b)
            else:
                spec = torch.fft.fft(rows, dim=1) * weight.view(1, num_slices, 1)
                filtered = torch.fft.ifft(spec, dim=1)  # complex (B, D, h*w*r)
                filtered[:, :, :r].add_(torch.fft.ifft(bias).view(1, num_slices, 1))
                out = filtered.abs()
            return _slices_from_rows(out, v.shape).to(v.dtype)


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

    Attributes:
        use_reference_form: run :func:`~medtuning_peft.tuners.med_adapter.reference.reference_forward`
            (the direct 3D transcription, same parameters) instead of the fast form; for comparisons only
            (see :func:`~medtuning_peft.tuners.med_adapter.reference.reference_form`).

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
        self.use_reference_form = False
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
            inter-stage adapter (else None). A is in channels-last memory.
        """
        if self.use_reference_form:
            return self._reference_forward(x, grid, num_slices, prev)
        h, w = grid
        n = x.shape[0]
        r = self.bottleneck
        # The projections are the adapter's only products over the block width C: they follow the caller's
        # autocast. The bottleneck between them (depthwise and spectral filters, 1x1x1 mixing) is memory-bound
        # work on r channels: it runs in the parameters' dtype with autocast off, so its 14-16 parameters and
        # their gradients are not cast every step (two casts of z instead).
        z = self.act(self.down(x))  # (B*D, h*w, r)
        with _autocast_off(x.device.type):
            z = z.to(self.mix.weight.dtype).view(n, h, w, r)  # (B*D, h*w, r) -> (B*D, h, w, r)
            v = z.permute(0, 3, 1, 2)  # (B*D, h, w, r) -> (B*D, r, h, w), channels-last memory: no copy
            feats = [branch(v, num_slices) for branch in self.branches]
            if self.spectral is not None:
                feats.append(self.spectral(v, num_slices))
            total = feats[0]
            for feat in feats[1:]:
                total = total + feat  # (B*D, r, h, w)
            # (B*D, r, h, w) -> (B*D, h, w, r): a view of channels-last memory; the 1x1x1 conv as a matmul.
            y = F.linear(total.permute(0, 2, 3, 1), self.mix.weight.view(r, r), self.mix.bias)
            a = None
            if self.fuse is not None:
                y = a = self._fuse(y, prev, num_slices)  # (B*D, h, w, r)
            tokens = (z + y).view(n, h * w, r)  # U = V + Y; (B*D, h, w, r) -> (B*D, h*w, r)
        out = x + self.act(self.up(tokens))
        # (B*D, h, w, r) -> (B*D, r, h, w), channels-last memory
        return out, (a.permute(0, 3, 1, 2) if a is not None else None)

    def _fuse(self, y: torch.Tensor, prev: torch.Tensor | None, num_slices: int) -> torch.Tensor:
        """Inter-FI: ``A = Conv_{1x1x1, 2r->r}(cat[Y, P(A_prev)])`` on (B*D, h, w, r) tokens."""
        n, h, w, r = y.shape
        weight = self.fuse.weight.view(r, 2 * r)  # (r, 2r, 1, 1, 1) -> (r, 2r)
        proj = self.project_prev
        if prev is None:
            # The reference convolves zeros: P is its bias everywhere, so its share of the fusion is a
            # constant, folded into the fusion bias (the same function). P runs on one zero pixel, which gives
            # its bias exactly and puts its weight in the graph with the reference's zero gradient: every
            # trainable parameter is used (DistributedDataParallel needs no `find_unused_parameters`).
            zero = proj.weight.new_zeros(1, proj.in_channels, 1, 1, 1)
            p = proj(zero).view(r)  # == proj.bias
            return F.linear(y, weight[:, :r], self.fuse.bias + weight[:, r:] @ p)
        if not self.prev_spatial:
            # (r, r_prev, 1, 1, 1) -> (r, r_prev); (B*D, r_prev, h, w) -> (B*D, h, w, r_prev)
            p = F.linear(prev.permute(0, 2, 3, 1), proj.weight.view(r, -1), proj.bias)
        else:
            ph, pw = prev.shape[-2:]
            if (ph, pw) == (h, w):
                stride = 1
            elif (-(-ph // 2), -(-pw // 2)) == (h, w):
                stride = 2
            else:
                raise ValueError(
                    f"Inter-stage features on a {ph}x{pw} token grid cannot be fused into a {h}x{w} grid: "
                    "consecutive inter-stage blocks must share the grid or halve it. Check `inter_stage_modules`."
                )
            # (r, r_prev, 1, 3, 3) -> (r, r_prev, 3, 3); stride 2 gives ceil(h'/2) x ceil(w'/2).
            p = F.conv2d(prev, proj.weight.squeeze(2), proj.bias, stride=stride, padding=1)
            p = p.permute(0, 2, 3, 1)  # (B*D, r, h, w) -> (B*D, h, w, r)
        return F.linear(torch.cat([y, p.to(y.dtype)], dim=-1), weight, self.fuse.bias)  # (B*D, h, w, r)

    def _reference_forward(
        self, x: torch.Tensor, grid: tuple[int, int], num_slices: int, prev: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        from .reference import reference_forward  # the reference imports this module

        if self.spectral is not None and num_slices != self.spectral.weight.shape[0]:
            raise ValueError(
                f"The reference form only runs at the configured slice count ({self.spectral.weight.shape[0]}), "
                f"got num_slices={num_slices}; switch it off with `set_reference_form(model, False)`."
            )
        if prev is not None:
            # (B*D, r_prev, h', w') -> (B, D, r_prev, h', w') -> (B, r_prev, D, h', w')
            prev = prev.reshape(-1, num_slices, *prev.shape[1:]).transpose(1, 2)
        out, a = reference_forward(self, x, grid, num_slices, prev)
        if a is not None:
            b, r, d, h, w = a.shape
            # (B, r, D, h, w) -> (B, D, r, h, w) -> (B*D, r, h, w)
            a = a.transpose(1, 2).reshape(b * d, r, h, w)
        return out, a
