"""Float64 guidance by direct differences: the path for bandwidths or scales at the dtype's edge.

`guidance_grad` takes it when 1/sigma^2 or 1/sigma_cond^2 is beyond what the fast paths resolve
(their logits use the distance form ||a||^2 + ||b||^2 - 2 a.b, whose rounding, times 1/s^2,
decides which entry wins once 1/s^2 ~ 1/eps), or when the fast path overflowed on finite inputs.
Math (SPEC section 2), with the squared distances taken as sums of squared differences in
float64 (an entry equal to phi is at distance 0 exactly, ties stay ties)::

    E_aj    = ||phi_a - f_j||^2 / s^2 + ||y_a - c_j||^2 / s_c^2          (0 * inf := 0)
    log S_a = log sum_j exp(-E_aj),    pi_aj = exp(-(E_aj - min_j E_aj)) / sum_j (...)
    g_phi_a = (2 / s^2) (phi_a - sum_j pi_aj f_j)

Each term is taken relative to its own minimum over the entries, E_aj - const_a =
(Dx_aj - min Dx_a) / s^2 + (Dc_aj - min Dc_a) / s_c^2, so it is 0 exactly at the minimum even
where 1/s^2 is inf: as a bandwidth tends to 0 the weights tend to the entries nearest in that
term (ties share), ranked among themselves by the other term, which is what pi computes. log S_a
is -inf where const_a is beyond float64. Features and prompts are divided by powers of two >=
their largest entries first (exact), the bandwidths with them, so no square overflows.
Cost: O(b n (D + m)) float64
operations (no GEMM), the bank in chunks of rows; O(b n) extra memory for the exponents.
"""

from __future__ import annotations

import math

import torch

from .guidance_common import Problem

__all__ = ["CHUNK_ROWS", "guide"]

#: Bank rows per chunk of the direct differences.
CHUNK_ROWS = 1024


def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """||a_i - b_j||^2 in float64 by differences (no a.b cancellation), (len(a), len(b))."""
    d = torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")
    return d * d


def _pow2(a: torch.Tensor, b: torch.Tensor | None) -> float:
    """The smallest power of two >= every |entry| of a and b (1.0 if all are zero)."""
    top = float(a.detach().abs().max()) if a.numel() else 0.0
    if b is not None and b.numel():
        top = max(top, float(b.detach().abs().max()))
    if top == 0.0 or not math.isfinite(top):
        return 1.0
    return math.ldexp(1.0, min(math.frexp(top)[1], 1023))


def _inv_sq(a: float, s: float) -> float:
    """(a / s)^2 as a float: inf past float64, never ZeroDivisionError."""
    r = a / s
    return r * r


def _times(d2: torch.Tensor, c: float) -> torch.Tensor:
    """d2 * c with 0 * c = 0 also for c = inf."""
    return torch.where(d2 == 0, torch.zeros_like(d2), d2 * c)


def guide(p: Problem) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad (b, D) float64, log S (b,) float64) of a validated `Problem` (its latents ``p.z``).

    The bandwidths enter as (a / sigma)^2 with the data's scale a folded in, so neither a tiny
    sigma (1/sigma^2 = inf) nor a huge one with huge data (1/sigma^2 = 0) loses the answer.
    The gradient holds inf where its true value is beyond float64 (the caller names sigma).
    """
    y, bank, bank_cond, normalize = p.y, p.bank, p.bank_cond, p.normalize
    sigma, sigma_cond, batch = float(p.sigma), p.sigma_cond, p.batch
    z = p.z.double()
    a_z = _pow2(z, None)  # ||z|| of the scaled rows, scaled back: no overflow in the squares
    znorm = torch.linalg.vector_norm(z / a_z, dim=1, keepdim=True) * a_z if normalize else None
    phi = z / znorm if normalize else z
    b = phi.shape[0]
    # features and prompts divided by powers of two (exact) >= their largest entries, the
    # bandwidths with them: the squared differences cannot overflow
    a_f = _pow2(phi, bank)
    phi_s = phi / a_f
    inv_s = _inv_sq(a_f, sigma)
    y64, a_c, inv_c = None, 1.0, 0.0
    if y is not None:
        a_c = _pow2(y, bank_cond)
        y64, inv_c = y.double() / a_c, _inv_sq(a_c, sigma_cond)

    def dists(f: torch.Tensor, c: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        dx = _sq_dists(phi_s, f.double() / a_f)
        dc = _sq_dists(y64, c.double() / a_c) if c is not None else torch.zeros_like(dx)
        return dx, dc

    parts = []
    if batch:
        eye = torch.eye(b, dtype=torch.bool, device=phi.device)
        dx, dc = dists(phi, y)
        parts.append((dx.masked_fill(eye, math.inf), dc.masked_fill(eye, math.inf)))
    n = bank.shape[0]
    for s in range(0, n, CHUNK_ROWS):
        parts.append(
            dists(
                bank[s : s + CHUNK_ROWS], bank_cond[s : s + CHUNK_ROWS] if y is not None else None
            )
        )
    if not parts:
        return torch.zeros_like(phi), torch.full((b,), -math.inf, dtype=torch.float64)
    dx = torch.cat([p[0] for p in parts], dim=1)  # (b, entries), scaled units
    dc = torch.cat([p[1] for p in parts], dim=1)
    # E - const = inv_s (Dx - min Dx) + inv_c (Dc - min Dc): each term 0 exactly at its own
    # minimum, so where one bandwidth is tiny the other still ranks the entries it keeps
    dx_min = dx.min(1, keepdim=True).values
    dc_min = dc.min(1, keepdim=True).values
    e = _times(dx - dx_min, inv_s) + _times(dc - dc_min, inv_c)
    e = torch.where(torch.isfinite(dx), e, torch.full_like(e, math.inf))
    e_min = e.min(1, keepdim=True).values
    has = torch.isfinite(e_min.squeeze(1))
    w = torch.exp(-(e - torch.where(torch.isfinite(e_min), e_min, 0.0)))
    w = torch.where(torch.isfinite(e), w, torch.zeros_like(w))
    total = w.sum(1, keepdim=True)
    const = _times(dx_min, inv_s) + _times(dc_min, inv_c) + e_min
    log_s = -const.squeeze(1) + torch.log(total.squeeze(1))
    log_s = torch.where(has, log_s, torch.full_like(log_s, -math.inf))
    # sum_j pi_j f_j over the same entries, chunk by chunk
    mean = torch.zeros_like(phi)
    col = 0
    if batch:
        mean += w[:, :b] @ phi_s
        col = b
    for s in range(0, n, CHUNK_ROWS):
        f = bank[s : s + CHUNK_ROWS].double() / a_f
        mean += w[:, col : col + f.shape[0]] @ f
        col += f.shape[0]
    mean = mean / torch.where(total > 0, total, torch.ones_like(total))
    diff = torch.where(has.unsqueeze(1), phi_s - mean, torch.zeros_like(phi))
    # (2/s^2)(phi - mean) = 2 (a_f/s)^2 (phi_s - mean_s) / a_f, one factor at a time
    g = _times(_times(diff.abs(), 2.0 * inv_s), 1.0 / a_f) * diff.sign()
    if normalize:  # (I - u u^T) g / ||z||, with 0 * inf := 0 where g is exactly 0
        proj = (phi * torch.where(torch.isfinite(g), g, torch.zeros_like(g))).sum(1, keepdim=True)
        g = torch.where(torch.isfinite(g), (g - phi * proj) / znorm, g)
    return g, log_s
