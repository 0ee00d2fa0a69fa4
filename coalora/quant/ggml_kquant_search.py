"""The scale searches of llama.cpp's K-quants (Q2_K..Q6_K) and the fp32 arithmetic they share.

``make_qx_quants``, ``make_qkx2_quants`` and ``make_q3_quants`` of llama.cpp's ggml-quants.c, as
``quantize_row_q*_K_ref`` call them without an importance matrix; the per-type quantizers that
use them are :mod:`coalora.quant.ggml_kquants`. Each takes groups stored position-major,
``(group, n)``: the ``n`` groups of ``group`` weights, one position per row.

The C code sums in fp32 in index order and chooses by strict comparisons, and the bytes depend on
both, so both are kept: Python loops run over the positions of a group or over search steps, each
step vectorized over all groups, never over blocks. Divisors are tensors (:func:`constant`)
because torch turns ``number / tensor`` and, on CUDA, ``tensor / number`` into a reciprocal
times a number, which can differ from C's division in the last bit.
"""

from __future__ import annotations

import torch

from coalora.quant.ggml_legacy import constant, signed_absmax

GROUP_MAX_EPS = 1e-15
"""ggml-quants.c's ``GROUP_MAX_EPS``: a group whose largest magnitude is below it is all zero."""


def nearest_int(x: torch.Tensor) -> torch.Tensor:
    """ggml's ``nearest_int``: ``x + 1.5*2^23`` read as int bits (round half to even), int32."""
    return ((x + 12582912.0).view(torch.int32) & 0x7FFFFF) - 0x400000


def sum_in_order(terms: torch.Tensor) -> torch.Tensor:
    """``s = 0; for (i ...) s += t[i]`` over dim 0 in fp32 (``torch.sum`` pairs terms)."""
    total = torch.zeros_like(terms[0])
    for term in terms:
        total += term
    return total


def sqrtf(v: torch.Tensor) -> torch.Tensor:
    """C's correctly rounded ``sqrtf`` of fp32 ``v >= 0``.

    torch's CPU sqrt on large tensors can be one ulp off near ties. The float64 root rounded to
    fp32 is within one ulp; it moves to a neighbour when ``v`` lies beyond the midpoint between
    them, tested exactly in float64 (a 25-bit midpoint squares exactly there).
    """
    root = torch.sqrt(v.double()).float()
    up = torch.nextafter(root, torch.full_like(root, float("inf")))
    down = torch.nextafter(root, torch.zeros_like(root))
    exact = v.double()
    high, low = (root.double() + up.double()) / 2, (root.double() + down.double()) / 2
    return torch.where(exact > high * high, up, torch.where(exact < low * low, down, root))


def positive_max(values: torch.Tensor) -> torch.Tensor:
    """``m = 0; if (v > m) m = v`` over the last dim (kept): the largest positive value, or 0."""
    return torch.where(values > 0, values, torch.zeros_like(values)).amax(-1, keepdim=True)


def make_qkx2_quants(
    x: torch.Tensor, weights: torch.Tensor, nmax: int, rmin: float, nstep: int, use_mad: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``make_qkx2_quants`` (``rdelta = 0.1``): ``x ≈ scale * L - the_min``, ``L`` in ``[0, nmax]``.

    Starts from the range fit ``scale = (max - min) / nmax``, ``min = min(x, 0)``, then tries the
    inverse scales ``(nmax + rmin + 0.1 i) / (max - min)``, ``i = 0..nstep``, each refit by weighted
    least squares; a trial is kept when its weighted error (absolute with ``use_mad``, else
    squared) is strictly smaller. Kept trials move ``min``, so the trials run in order.

    Args:
        x, weights: groups stored position-major, ``(group, n)``, and their error weights.

    Returns:
        ``(scale, the_min, L)``, shapes ``(n,)``, ``(n,)`` and ``(group, n)`` (float codes).
    """

    def codes(inverse_scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        return nearest_int(inverse_scale * (x - offset)).clamp(0, nmax).float()

    def error(scale: torch.Tensor, offset: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        diff = scale * levels + offset - x
        return sum_in_order(weights * (diff.abs() if use_mad else diff * diff))

    low = x.amin(0)
    low = torch.where(low > 0, torch.zeros_like(low), low)
    high = x.amax(0)
    # C starts these two sums from the first term instead of 0: only an all-zero sum's sign differs.
    sum_w, sum_x = sum_in_order(torch.stack([weights, weights * x], dim=1))
    inverse_scale = constant(x, nmax) / (high - low)
    scale = constant(x, 1.0) / inverse_scale
    offset = low
    levels = codes(inverse_scale, offset)
    best = error(scale, offset, levels)
    steps = torch.arange(nstep + 1, dtype=torch.float32, device=x.device)
    for numerator in constant(x, 0.1) * steps + rmin + nmax:
        trial = codes(numerator / (high - offset), offset)
        weighted = weights * trial
        sums = torch.stack([weighted, weighted * trial, weighted * x], dim=1)
        sum_l, sum_l2, sum_xl = sum_in_order(sums)
        det = sum_w * sum_l2 - sum_l * sum_l
        trial_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        trial_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        clipped = trial_min > 0
        trial_scale = torch.where(clipped, sum_xl / sum_l2, trial_scale)
        trial_min = torch.where(clipped, 0.0, trial_min)
        trial_error = error(trial_scale, trial_min, trial)
        keep = (det > 0) & (trial_error < best)
        levels = torch.where(keep, trial, levels)
        best = torch.where(keep, trial_error, best)
        scale = torch.where(keep, trial_scale, scale)
        offset = torch.where(keep, trial_min, offset)
    flat = high == low
    levels = torch.where(flat, 0.0, levels)
    return torch.where(flat, 0.0, scale), torch.where(flat, -low, -offset), levels


def make_qx_quants(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``make_qx_quants`` with ``rmse_type = 1`` and no importance matrix (weights ``x²``).

    Codes ``L`` in ``[0, 2 nmax)`` with ``x ≈ scale * (L - nmax)``, for groups stored
    position-major ``(group, n)``. The inverse scales ``-(nmax + 0.1 i) / max`` (``max`` the
    signed absmax), first ``i = 0`` then ``i = -9..9``, are refit by weighted least squares; a
    trial is kept when ``sumlx² / suml2`` is strictly larger. Groups below ``GROUP_MAX_EPS`` get
    scale 0 and codes 0. Returns ``(scale, L)``, shapes ``(n,)`` and ``(group, n)``.
    """
    peak = signed_absmax(x, dim=0)[0]
    steps = torch.arange(-9, 10, dtype=torch.float32, device=x.device)
    steps = torch.cat([steps[9:10], steps[:9], steps[10:]])
    inverse_scales = -(constant(x, 0.1) * steps + nmax)[:, None] / peak  # (19, n)
    trials = nearest_int(inverse_scales * x[:, None]).clamp(-nmax, nmax - 1).float()
    weights = (x * x)[:, None]
    sums = torch.stack([weights * x[:, None] * trials, weights * trials * trials], dim=1)
    sum_lx, sum_l2 = sum_in_order(sums)
    scale = torch.where(sum_l2[0] != 0, sum_lx[0] / sum_l2[0], 0.0)
    best = scale * sum_lx[0]
    choice = torch.zeros_like(peak, dtype=torch.int64)
    for t in range(1, trials.shape[1]):
        keep = (sum_l2[t] > 0) & (sum_lx[t] * sum_lx[t] > best * sum_l2[t])
        scale = torch.where(keep, sum_lx[t] / sum_l2[t], scale)
        best = torch.where(keep, scale * sum_lx[t], best)
        choice = torch.where(keep, t, choice)
    levels = trials.gather(1, choice.expand(x.shape[0], 1, -1))[:, 0] + nmax
    zero = peak.abs() < constant(x, GROUP_MAX_EPS)
    return torch.where(zero, 0.0, scale), torch.where(zero, 0.0, levels)


def make_q3_quants(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``make_q3_quants`` with ``do_rmse``: codes ``L`` in ``[0, 2 nmax)``, ``x ≈ s (L - nmax)``.

    For groups stored position-major ``(group, n)``. Starts from the codes of the inverse scale
    ``-nmax / max``, then runs five passes of coordinate descent with weights ``x²``: each code in
    turn moves to its least-squares value when that strictly raises ``sumlx² / suml2``. (C stops
    after a pass that changes nothing; the passes after it would change nothing either.) Groups
    below ``GROUP_MAX_EPS`` get scale 0 and codes 0. Returns ``(scale, L)``.
    """
    peak = signed_absmax(x, dim=0)[0]
    levels = nearest_int(constant(x, -nmax) / peak * x).clamp(-nmax, nmax - 1).float()
    weights = x * x
    weighted_x = weights * x
    sum_lx, sum_l2 = sum_in_order(torch.stack([weighted_x * levels, weights * levels * levels], 1))
    for _ in range(5):
        for w, wx, xi, level in zip(weights, weighted_x, x, levels, strict=True):
            rest_lx = sum_lx - wx * level
            rest_l2 = sum_l2 - w * level * level
            new = nearest_int(xi * rest_l2 / rest_lx).clamp(-nmax, nmax - 1).float()
            trial_lx = rest_lx + wx * new
            trial_l2 = rest_l2 + w * new * new
            keep = (
                (rest_lx > 0)
                & (new != level)
                & (trial_l2 > 0)
                & (trial_lx * trial_lx * sum_l2 > sum_lx * sum_lx * trial_l2)
            )
            level.copy_(torch.where(keep, new, level))
            sum_lx = torch.where(keep, trial_lx, sum_lx)
            sum_l2 = torch.where(keep, trial_l2, sum_l2)
    zero = peak.abs() < constant(x, GROUP_MAX_EPS)
    scale = torch.where(sum_l2 > 0, sum_lx / sum_l2, 0.0)
    return torch.where(zero, 0.0, scale), torch.where(zero, 0.0, levels + nmax)
