"""SPARKE diversity guidance: `features`, `guidance_grad` and the `FeatureBank` ring buffer.

Math (SPEC section 2). A bank holds features f_1..f_n with prompt embeddings c_1..c_n. For a new
sample with latent z, feature phi = phi(z) and prompt embedding y::

    S(z)     = sum_j w_j k_s(phi, f_j)^2 = sum_j exp(log w_j - ||phi - f_j||^2 / s^2)
    log w_j  = -||y - c_j||^2 / s_c^2            (w_j = k_{s_c}(y, c_j)^2; 0 when unconditional)
    pi_j     = softmax_j(log w_j - ||phi - f_j||^2 / s^2)
    -d log S / d phi = (2 / s^2) (phi - sum_j pi_j f_j)

and, through the normalised feature map phi = z / ||z|| (u = phi)::

    -d log S / dz = (I - u u^T) (-d log S / d phi) / ||z||

Adding the sample to the bank changes the denominator of CondRKE by 2 S(z) + 1 and leaves the
numerator alone, so -grad log S points to more conditional diversity. The sum over the bank is
attention (logits 2 phi.f_j/s^2 - ||f_j||^2/s^2 + log w_j, values f_j), computed in one pass with
an online (running max) softmax: exact and finite for any bandwidth, O(n D) time, O(b D) extra
memory, no autograd (works under ``torch.no_grad()``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch

from ._input import (
    as_tensor,
    check_backend,
    check_finite,
    check_same_device,
    check_sigma,
    is_torch,
)
from .ops import guidance as guidance_ops

__all__ = ["FeatureBank", "GuidanceResult", "features", "guidance_grad"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class GuidanceResult(NamedTuple):
    """What `guidance_grad` returns.

    Attributes:
        grad: -d log S / dz, with z's shape and dtype (torch tensor, or numpy array for numpy z).
        log_s: (b,) log S(z_a) for each sample, for logging (-inf when nothing is in the bank).
    """

    grad: Any
    log_s: Any


# --------------------------------------------------------------------------------- features


def features(z: Any, normalize: bool = True) -> Any:
    """phi(z): flatten each sample to a row and, by default, divide each row by its L2 norm.

    Args:
        z: (b, ...) latents (torch tensor, numpy array, or anything with ``__dlpack__``).
        normalize: divide each row by its Euclidean norm (the SPARKE feature map).

    Returns:
        (b, D) features, D = prod of z's trailing dims; a torch tensor (differentiable, float32 or
        float64) for torch input, else a numpy array.

    Raises:
        ValueError: z has no batch dimension, no features, NaN/Inf, or (with ``normalize``) a
            sample whose latent is all zeros (its direction is undefined).
        TypeError: complex, string or object data.

    >>> import torch
    >>> features(torch.tensor([[[3.0, 0.0], [0.0, 4.0]]]))
    tensor([[0.6000, 0.0000, 0.0000, 0.8000]])
    >>> features(torch.ones(2, 3), normalize=False).shape
    torch.Size([2, 3])
    """
    like_torch = is_torch(z)
    zt = as_tensor(z, "z")
    f = _flatten(zt, "z")
    check_finite(f, "z")
    if normalize:
        nrm = f.norm(dim=1, keepdim=True)
        if not bool((nrm > 0).all()):
            raise ValueError(
                "z has a sample whose latent is all zeros: its normalised feature is undefined; "
                "use normalize=False or drop that sample"
            )
        f = f / nrm
    return f if like_torch else f.detach().cpu().numpy()


def _flatten(z: torch.Tensor, name: str) -> torch.Tensor:
    if z.dim() < 2:
        raise ValueError(
            f"{name} must have a batch dimension (b, ...); got shape {tuple(z.shape)}: "
            f"for a single sample use {name}[None]"
        )
    if z.shape[0] == 0:
        raise ValueError(f"{name} is empty (b = 0): need at least one sample")
    f = z.reshape(z.shape[0], -1)
    if f.shape[1] == 0:
        raise ValueError(f"{name} has no features; got shape {tuple(z.shape)}")
    return f


# ------------------------------------------------------------------------------ FeatureBank


class FeatureBank:
    """A device-resident ring buffer of features (and optional prompt embeddings) for guidance.

    Holds at most ``capacity`` rows f_j (already mapped by `features`), with their squared norms
    ||f_j||^2 cached at insertion (float64), and, if given, prompt embeddings c_j with their
    squared norms. Past capacity the oldest entries are overwritten. Storage is allocated at the
    first `add`, when the width D is known. Features may be stored in float16/bfloat16 to halve
    the memory traffic of `guidance_grad` (whose math is then float32).

    Args:
        capacity: maximum number of entries (a positive int).
        device: where the storage lives; None takes the device of the first `add`.
        dtype: storage dtype of the features: float32 (default), float16, bfloat16 or float64.
            Prompt embeddings are stored in float32 (float64 if ``dtype`` is float64).

    Raises:
        ValueError: capacity not a positive integer.
        TypeError: dtype not a floating dtype.

    Attributes:
        capacity: the maximum number of entries.
        dim: the feature width D (None until the first `add`).
        features: (n, D) the stored features, oldest first (a copy when the buffer has wrapped).
        cond: (n, m) the stored prompt embeddings, oldest first, or None.

    >>> import torch
    >>> bank = FeatureBank(3)
    >>> bank.add(torch.eye(4)[:2])
    >>> bank.add(torch.eye(4)[2:])           # 4 rows into capacity 3: the oldest goes
    >>> len(bank), bank.features[:, :2].tolist()
    (3, [[0.0, 1.0], [0.0, 0.0], [0.0, 0.0]])
    """

    def __init__(
        self, capacity: int, *, device: Any = None, dtype: torch.dtype = torch.float32
    ) -> None:
        if (
            isinstance(capacity, bool)
            or not isinstance(capacity, int | np.integer)
            or int(capacity) < 1
        ):
            raise ValueError(f"capacity must be a positive integer, got {capacity!r}")
        if dtype not in _FLOATS:
            raise TypeError(
                f"dtype must be one of float16, bfloat16, float32, float64; got {dtype!r}"
            )
        self.capacity = int(capacity)
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else None
        self._feats: torch.Tensor | None = None  # (capacity, D) storage
        self._sq: torch.Tensor | None = None  # (capacity,) float64 ||f_j||^2
        self._cond: torch.Tensor | None = None  # (capacity, m) storage, or None
        self._cond_sq: torch.Tensor | None = None
        self._has_cond: bool | None = None  # fixed by the first add
        self._size = 0
        self._next = 0  # slot of the next write; the oldest entry when full

    # -- properties
    @property
    def dim(self) -> int | None:
        """Feature width D, or None before the first `add`."""
        return None if self._feats is None else int(self._feats.shape[1])

    @property
    def cond_dim(self) -> int | None:
        """Prompt-embedding width m, or None (no prompts, or nothing added yet)."""
        return None if self._cond is None else int(self._cond.shape[1])

    def __len__(self) -> int:
        return self._size

    def __repr__(self) -> str:
        return (
            f"FeatureBank(len={self._size}, capacity={self.capacity}, dim={self.dim}, "
            f"cond_dim={self.cond_dim}, dtype={self.dtype}, device={self.device})"
        )

    def _order(self, t: torch.Tensor) -> torch.Tensor:
        """Rows of storage ``t`` oldest first (a view unless the buffer has wrapped)."""
        if self._size < self.capacity or self._next == 0:
            return t[: self._size]
        return torch.cat([t[self._next :], t[: self._next]])

    @property
    def features(self) -> torch.Tensor:
        """(n, D) stored features, oldest first (an empty (0, 0) tensor before the first add)."""
        if self._feats is None:
            return torch.zeros((0, 0), dtype=self.dtype, device=self.device)
        return self._order(self._feats)

    @property
    def cond(self) -> torch.Tensor | None:
        """(n, m) stored prompt embeddings, oldest first, or None."""
        return None if self._cond is None else self._order(self._cond)

    def _slots(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(features, squared norms, cond, cond squared norms) of the filled slots, unordered.

        Views of the storage (no copy): the guidance sum does not depend on the order.
        """
        n = self._size
        cond = None if self._cond is None else self._cond[:n]
        cond_sq = None if self._cond_sq is None else self._cond_sq[:n]
        return self._feats[:n], self._sq[:n], cond, cond_sq

    # -- mutation
    def clear(self) -> None:
        """Forget every entry (keeps the width, the prompt setting and the storage)."""
        self._size = 0
        self._next = 0

    def add(self, f: Any, cond: Any = None) -> None:
        """Append b rows of features (and their prompt embeddings); past capacity the oldest go.

        The same as `append` here; a bank shared across processes
        (`rkekernels.distributed.SharedFeatureBank`) overrides ``add`` with a collective one.

        Args:
            f: (b, D) features, already mapped by `features`.
            cond: (b, m) prompt embeddings. Either every `add` passes them or none does.

        Raises:
            ValueError: as `append`.
        """
        self.append(f, cond)

    def append(self, f: Any, cond: Any = None) -> None:
        """Append b rows to this bank only (never collective); past capacity the oldest go.

        Args:
            f: (b, D) features, already mapped by `features`; b may exceed the capacity (then
                only the newest ``capacity`` rows are kept). Copied to the bank's device/dtype.
            cond: (b, m) prompt embeddings. Either every `add` passes them or none does.

        Raises:
            ValueError: f not 2-D or empty, NaN/Inf, a width other than the bank's, cond given
                in some calls and not in others, cond with another width or row count.
        """
        ft = (as_tensor(f, "f") if not _is_float_tensor(f) else f).detach()
        if ft.dim() != 2:
            raise ValueError(
                f"f must be 2-D (b, D) features; got shape {tuple(ft.shape)}: map latents with "
                "rkekernels.features(z) first (or reshape with f.reshape(len(f), -1))"
            )
        if ft.shape[0] == 0 or ft.shape[1] == 0:
            raise ValueError(f"f is empty; got shape {tuple(ft.shape)}")
        check_finite(ft, "f")
        has_cond = cond is not None
        if self._has_cond is not None and has_cond != self._has_cond:
            if has_cond:
                raise ValueError(
                    "cond given, but this FeatureBank was filled without prompt embeddings; "
                    "pass cond in every add() or in none"
                )
            raise ValueError(
                "cond missing: this FeatureBank holds prompt embeddings; "
                "pass cond in every add() or in none"
            )
        ct = None
        if has_cond:
            ct = (as_tensor(cond, "cond") if not _is_float_tensor(cond) else cond).detach()
            if ct.dim() != 2 or ct.shape[0] != ft.shape[0] or ct.shape[1] == 0:
                raise ValueError(
                    f"cond must be 2-D (b, m) with b = {ft.shape[0]} rows like f; "
                    f"got shape {tuple(ct.shape)}"
                )
            check_finite(ct, "cond")
        if self._feats is not None and ft.shape[1] != self.dim:
            raise ValueError(
                f"f has width {ft.shape[1]} but this FeatureBank holds features of width "
                f"{self.dim}; map every latent with the same features() settings"
            )
        if ct is not None and self._cond is not None and ct.shape[1] != self.cond_dim:
            raise ValueError(
                f"cond has width {ct.shape[1]} but this FeatureBank holds prompt embeddings of "
                f"width {self.cond_dim}"
            )
        if self._feats is None:
            self._allocate(ft.shape[1], None if ct is None else ct.shape[1], ft.device)
        self._has_cond = has_cond
        b = ft.shape[0]
        if b > self.capacity:  # keep the newest rows only
            ft = ft[b - self.capacity :]
            ct = ct[b - self.capacity :] if ct is not None else None
            b = self.capacity
        fs = ft.to(device=self.device, dtype=self.dtype)
        if self.dtype in (torch.float16, torch.bfloat16) and not bool(torch.isfinite(fs).all()):
            raise ValueError(
                f"f has values beyond the range of this FeatureBank's dtype {self.dtype} (max "
                f"{torch.finfo(self.dtype).max:.4g}): they would be stored as inf; use "
                "features(z) (unit rows) or a FeatureBank with dtype=torch.float32"
            )
        sq = fs.to(self._sq.dtype).pow(2).sum(1)
        if ct is not None:
            cs = ct.to(device=self.device, dtype=self._cond.dtype)
            csq = cs.to(self._cond_sq.dtype).pow(2).sum(1)
        # at most two contiguous writes: [next, end) then [0, rest)
        first = min(b, self.capacity - self._next)
        spans = [(self._next, 0, first), (0, first, b - first)]
        for slot, src, cnt in spans:
            if cnt <= 0:
                continue
            self._feats[slot : slot + cnt] = fs[src : src + cnt]
            self._sq[slot : slot + cnt] = sq[src : src + cnt]
            if ct is not None:
                self._cond[slot : slot + cnt] = cs[src : src + cnt]
                self._cond_sq[slot : slot + cnt] = csq[src : src + cnt]
        self._next = (self._next + b) % self.capacity
        self._size = min(self.capacity, self._size + b)

    def _allocate(self, dim: int, cond_dim: int | None, device: torch.device) -> None:
        if self.device is None:
            self.device = device
        wide = torch.float32 if self.device.type == "mps" else torch.float64
        self._feats = torch.zeros((self.capacity, dim), dtype=self.dtype, device=self.device)
        self._sq = torch.zeros((self.capacity,), dtype=wide, device=self.device)
        if cond_dim is not None:
            cdt = torch.float64 if self.dtype == torch.float64 else torch.float32
            self._cond = torch.zeros((self.capacity, cond_dim), dtype=cdt, device=self.device)
            self._cond_sq = torch.zeros((self.capacity,), dtype=wide, device=self.device)

    # -- state
    def state_dict(self) -> dict[str, Any]:
        """A plain dict (tensors oldest first) for `torch.save`; restores with `load_state_dict`."""
        return {
            "capacity": self.capacity,
            "dtype": str(self.dtype).replace("torch.", ""),
            "features": None if self._feats is None else self.features.clone(),
            "cond": None if self._cond is None else self.cond.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace the contents by those of `state_dict` (capacity and dtype stay this bank's).

        Entries beyond this bank's capacity keep the newest ones.

        Raises:
            ValueError: ``state`` is not a FeatureBank state dict.
        """
        if not isinstance(state, dict) or "features" not in state or "cond" not in state:
            raise ValueError("state must be a dict from FeatureBank.state_dict()")
        self._feats = self._sq = self._cond = self._cond_sq = None
        self._has_cond = None
        self._size = self._next = 0
        feats = state["features"]
        if feats is None or len(feats) == 0:
            if feats is not None and feats.dim() == 2 and feats.shape[1] > 0:
                cond = state["cond"]
                self._allocate(
                    feats.shape[1], None if cond is None else cond.shape[1], feats.device
                )
                self._has_cond = cond is not None
            return
        self.append(feats, state["cond"])


def _is_float_tensor(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.dtype in _FLOATS and x.layout == torch.strided


# ---------------------------------------------------------------------------- guidance_grad


def guidance_grad(
    z: Any,
    bank: Any,
    *,
    cond: Any = None,
    bank_cond: Any = None,
    sigma: float,
    sigma_cond: float | None = None,
    normalize: bool = True,
    include_batch: bool = True,
    backend: str = "auto",
    algorithm: str = "rke",
    kernel: str = "gaussian",
    check_finite: bool | None = None,
) -> GuidanceResult:
    """The SPARKE guidance direction -d log S / dz for b samples against a bank, in one pass.

    For each sample a (phi_a = features(z_a), y_a its prompt embedding)::

        log w_aj = -||y_a - c_j||^2 / s_c^2                         (0 without prompts)
        log S_a  = logsumexp_j( log w_aj - ||phi_a - f_j||^2 / s^2 ),  pi_a = softmax_j(...)
        grad_a   = J_a^T (2 / s^2) (phi_a - sum_j pi_aj f_j)

    with J_a the Jacobian of the feature map (identity, or (I - u u^T)/||z_a|| when normalised).
    With ``include_batch`` the other b - 1 current samples (and their prompts) count as bank
    entries, as constants. Streams the bank once, O(n D) time and O(b D) extra memory; no
    autograd is used, so it works inside ``torch.no_grad()``.

    Args:
        z: (b, ...) latents, float32 or float64 (others are converted to float32).
        bank: a `FeatureBank`, or an (n, D) tensor of features (any floating dtype; n may be 0).
        cond: (b, m) prompt embeddings of the current samples, or None (unconditional).
        bank_cond: (n, m) prompt embeddings of a tensor bank (a FeatureBank keeps its own).
        sigma: feature bandwidth s > 0 (the kernel is exp(-||a-b||^2 / (2 s^2))).
        sigma_cond: prompt bandwidth s_c > 0; required with ``cond``.
        normalize: use phi(z) = flatten(z) / ||flatten(z)|| (default) or the plain flatten.
        include_batch: let the other current samples count as bank entries.
        backend: "auto", "torch" or "triton". For CPU tensors the torch backend runs a fused
            kernel (`rkekernels.ops.guidance_cpu`: one read of each bank row for both its logits
            and its values; numba, a dependency: where it cannot load, a one-time warning says
            so), else two GEMMs per cached chunk of the bank; both give the same result to
            rounding.
        algorithm: "rke" (the order-2 objective above) or "vendi": the first-order gain in the
            order-1 (Vendi) entropy of bank + sample, log S = psi^T (log rho + H I) psi over the
            bank's feature covariance, decomposed once per bank change
            (`rkekernels.ops.guidance_kernels`). Conditioning is decided by sigma_cond alike.
        kernel: "gaussian" (default), "cosine" or "linear" (the kernel on features; the prompt
            kernel stays Gaussian). "vendi" with "gaussian" uses 1,024 random Fourier features.
        check_finite: True: NaN/Inf in any input raises a ValueError naming it, at the cost of
            one host sync per call (the only one on CUDA; no host-to-device copies). False: no
            sync at all, so the call can be captured in a CUDA graph; a non-finite input (or a
            result the fast paths cannot represent) then gives NaN in ``grad`` and ``log_s``
            instead of an error, and the torch path keeps a running max (no retry). None (the
            default): False while a CUDA graph is being captured on the current stream, else
            True.

    Returns:
        GuidanceResult(grad, log_s): grad with z's shape and dtype; log_s (b,). Torch tensors
        for torch z, numpy arrays otherwise. A sample with nothing to compare against (empty
        bank, b = 1) gets a zero gradient and log_s = -inf.

    Raises:
        ValueError: NaN/Inf in any input, sigma or sigma_cond not finite or <= 0, cond without
            sigma_cond, cond given but the bank has none (or the reverse), widths or row counts
            that do not match, tensors on different devices, an unknown backend.
        TypeError: complex, string or object data.

    Math is float32 (float64 when z or the bank is float64); bank entries in float16/bfloat16
    are upcast chunk by chunk. The squared distances use ||phi||^2 + ||f||^2 - 2 phi.f, whose
    absolute error is about eps (||phi||^2 + ||f||^2), i.e. eps (||phi||^2 + ||f||^2) / s^2 in
    the logits. The softmax is exact and finite for any bandwidth: the chunked-GEMM torch path
    shifts the logits by their upper bound ||phi||^2/s^2 (+ ||y||^2/s_c^2), so each term is
    exp(-||phi - f_j||^2/s^2 - ||y - c_j||^2/s_c^2); only when every term underflows (all
    entries more than ~6.8 bandwidths away) does it take a second pass with a running max.
    The fused CPU kernel keeps a running max per block of rows, the Triton kernel one in
    registers (one pass always).

    >>> import torch
    >>> z = torch.tensor([[1.0, 0.0]])
    >>> bank = torch.tensor([[0.0, 1.0], [0.0, -1.0]])
    >>> res = guidance_grad(z, bank, sigma=1.0, normalize=False)
    >>> res.grad                     # 2 (phi - mean of the two equally weighted entries)
    tensor([[2., 0.]])
    >>> res.log_s                    # log(2 exp(-2))
    tensor([-1.3069])
    """
    like_torch = is_torch(z)
    out_dtype = z.dtype if like_torch and z.is_floating_point() else None
    _check_flag(normalize, "normalize")
    _check_flag(include_batch, "include_batch")
    zt = as_tensor(z, "z")
    zf = _flatten(zt, "z").detach()
    b = zf.shape[0]
    inv_s2 = _inv_sq(check_sigma(sigma, "sigma"))

    fb, bank_sq, bc, cond_sq, bank_name = _bank_inputs(bank, bank_cond, zf, zt.shape)
    y = _prompt_inputs(cond, sigma_cond, b, fb, bc, bank_name)
    inv_c2 = 0.0
    if sigma_cond is not None:
        inv_c2 = _inv_sq(check_sigma(sigma_cond, "sigma_cond"))
    if y is None:
        bc = cond_sq = None
    check_same_device(z=zt, bank=fb, cond=y, bank_cond=bc)
    resolved = check_backend(backend, zt.device)
    if check_finite is None:
        check_finite = not (zt.device.type == "cuda" and torch.cuda.is_current_stream_capturing())
    problem = guidance_ops.Problem(
        z=zf, normalize=normalize, y=y, bank=fb, bank_sq=bank_sq, bank_cond=bc,
        bank_cond_sq=cond_sq, sigma=sigma, sigma_cond=sigma_cond, inv_s2=inv_s2, inv_c2=inv_c2,
        include_batch=include_batch, out_dtype=out_dtype if out_dtype is not None else zt.dtype,
    )  # fmt: skip
    g, log_s = guidance_ops.guide(
        problem, resolved, auto=backend == "auto", sync=bool(check_finite),
        algorithm=algorithm, kernel=kernel,
    )  # fmt: skip
    return _output(g.reshape(zt.shape), log_s, zt, out_dtype, like_torch)


def _check_flag(value: Any, name: str) -> None:
    if not isinstance(value, bool | np.bool_):
        raise TypeError(f"{name} must be True or False, got {value!r}")


def _inv_sq(s: float) -> float:
    """1/s^2 without ZeroDivisionError: inf where it is beyond float64 (s below ~1e-154)."""
    r = 1.0 / s
    return r * r


def _bank_inputs(bank: Any, bank_cond: Any, zf: torch.Tensor, z_shape: tuple) -> tuple:
    """(features, cached norms, prompt embeddings, their norms, name) of a FeatureBank or a
    tensor bank, checked against the flattened latents ``zf`` (b, D)."""
    dim = zf.shape[1]
    bank_sq = cond_sq = None
    if isinstance(bank, FeatureBank):
        if bank_cond is not None:
            raise ValueError(
                "bank_cond must be None when bank is a FeatureBank (it stores its own prompt "
                "embeddings: bank.add(f, cond))"
            )
        if len(bank) == 0:
            fb = zf.new_zeros((0, dim))
            bc = None
        else:
            fb, bank_sq, bc, cond_sq = bank._slots()
        bank_name = "bank"
    else:
        fb = bank if _is_float_tensor(bank) else as_tensor(bank, "bank")
        fb = fb.detach()
        if fb.dim() != 2:
            raise ValueError(
                f"bank must be a FeatureBank or a 2-D (n, D) tensor of features; got shape "
                f"{tuple(fb.shape)}: reshape it with bank.reshape(len(bank), -1)"
            )
        if fb.shape[0] == 0 and fb.shape[1] == 0:
            fb = zf.new_zeros((0, dim))
        bc = None
        if bank_cond is not None:
            bc = bank_cond if _is_float_tensor(bank_cond) else as_tensor(bank_cond, "bank_cond")
            bc = bc.detach()
            if bc.dim() != 2 or bc.shape[0] != fb.shape[0]:
                raise ValueError(
                    f"bank_cond must be 2-D (n, m) with n = {fb.shape[0]} rows like bank; "
                    f"got shape {tuple(bc.shape)}"
                )
        bank_name = "bank_cond"
    if fb.shape[1] != dim:
        raise ValueError(
            f"bank holds features of width {fb.shape[1]} but features(z) has width {dim} "
            f"(z shape {tuple(z_shape)}); both must come from the same feature map"
        )
    return fb, bank_sq, bc, cond_sq, bank_name


def _prompt_inputs(
    cond: Any, sigma_cond: Any, b: int, fb: torch.Tensor, bc: torch.Tensor | None, bank_name: str
) -> torch.Tensor | None:
    """The (b, m) prompt embeddings ``cond`` checked against the bank's (or None)."""
    bank_has_cond = bc is not None
    y = None
    if cond is not None:
        if sigma_cond is None:
            raise ValueError(
                "sigma_cond is required when cond is given (guidance has no data-dependent "
                "default bandwidth for prompt embeddings)"
            )
        y = cond if _is_float_tensor(cond) else as_tensor(cond, "cond")
        y = y.detach()
        if y.dim() != 2 or y.shape[0] != b or y.shape[1] == 0:
            raise ValueError(
                f"cond must be 2-D (b, m) with b = {b} rows like z; got shape {tuple(y.shape)}"
            )
        if fb.shape[0] > 0 and not bank_has_cond:
            raise ValueError(
                f"cond is given but the bank has no prompt embeddings ({bank_name} is None); "
                "pass both or neither"
            )
        if bank_has_cond and bc.shape[1] != y.shape[1]:
            raise ValueError(
                f"cond has width {y.shape[1]} but the bank's prompt embeddings have width "
                f"{bc.shape[1]}"
            )
    elif bank_has_cond and fb.shape[0] > 0:
        raise ValueError(
            f"the bank has prompt embeddings ({bank_name}) but cond is None; pass the current "
            "samples' prompt embeddings as cond (or build the bank without them)"
        )
    return y


def _output(
    grad: torch.Tensor,
    log_s: torch.Tensor,
    zt: torch.Tensor,
    out_dtype: torch.dtype | None,
    like_torch: bool,
) -> GuidanceResult:
    """The result in z's dtype (torch input) or as numpy arrays."""
    dt = out_dtype if out_dtype is not None else zt.dtype
    if grad.dtype != dt:
        grad, log_s = grad.to(dt), log_s.to(dt)
    if like_torch:
        return GuidanceResult(grad, log_s)
    return GuidanceResult(grad.cpu().numpy(), log_s.cpu().numpy())
