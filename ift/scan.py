"""Right-to-left discounted cumulative sums, ``y_k = x_k + γ·y_{k+1}``.

This is the scan behind IFT's *Dynamic Relation Propagation* (paper §4.2, eq. 22
with the decay factor of Appendix B.1): each token's weight is the discounted sum
of the losses of the tokens after it.

Why not ``cumsum(x·γ^-k)·γ^k``?  In float32 ``γ^-k`` overflows past k≈1700 at
γ=0.95, so the trick silently returns inf/NaN on long sequences.  We use a
*chunked* scan instead:

1. split the K positions into chunks of C; inside a chunk the scan is a matrix
   product with the C×C upper-triangular matrix ``M[j, i] = γ^(j-i)`` (j ≥ i),
   whose entries are all in [0, 1];
2. the value at each chunk start obeys the same recurrence with decay ``γ^C``
   across chunks; it is solved with a log-step doubling scan over K/C entries;
3. each position adds ``γ^(distance to the next chunk start)`` times that carry.

Every power used is of a number in [0, 1] with a non-negative exponent, so
nothing overflows; the work is O(N·K·C) with C fixed, i.e. linear in K.
"""

from __future__ import annotations

import math

import torch

__all__ = ["discounted_cumsum", "discounted_cumsum_reference", "kernel_available"]

_CHUNK = 64
# The authors' CUDA kernel launches one block per row; past this many rows the
# launch fails and, by its code, silently returns the input unchanged.
_KERNEL_MAX_ROWS = 65_535


def _check_gamma(gamma: float | torch.Tensor, n_rows: int, device: torch.device) -> torch.Tensor:
    """Return gamma as a float64 tensor of shape (N,), validated to lie in [0, 1]."""
    g = torch.as_tensor(gamma, dtype=torch.float64, device=device)
    if g.dim() == 0:
        g = g.expand(n_rows)
    elif g.shape != (n_rows,):
        raise ValueError(f"gamma must be a float or a tensor of shape (N,)=({n_rows},), got shape {tuple(g.shape)}")
    if torch.isnan(g).any() or (g < 0).any() or (g > 1).any():
        raise ValueError(f"gamma must lie in [0, 1]; got min={g.min().item()}, max={g.max().item()}")
    return g


def _powers(g: torch.Tensor, exponents: torch.Tensor) -> torch.Tensor:
    """``g[:, None] ** exponents`` in float64 with ``0**0 == 1``."""
    return torch.pow(g.unsqueeze(-1), exponents.to(g.dtype))


def _doubling_scan(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Reverse discounted scan by log-step doubling (Hillis–Steele), out of place.

    After the step with offset d, ``y_i`` holds ``Σ_{j=i}^{i+2d-1} g^(j-i) x_j``.
    """
    y = x
    length = x.shape[1]
    d = 1
    while d < length:
        gd = torch.pow(g, d).unsqueeze(-1).to(x.dtype)
        y = torch.cat([y[:, :-d] + gd * y[:, d:], y[:, -d:]], dim=1)
        d *= 2
    return y


def discounted_cumsum(
    x: torch.Tensor,
    gamma: float | torch.Tensor,
    *,
    backend: str = "torch",
) -> torch.Tensor:
    """Right discounted cumulative sum along the last dim: ``y_k = x_k + γ·y_{k+1}``.

    Args:
        x: tensor of shape (N, K).  Half-precision inputs are computed in float32
            and cast back.
        gamma: decay in [0, 1], a float or a tensor of shape (N,) (one per row).
        backend: ``"torch"`` (the chunked scan above, differentiable, any device)
            or ``"kernel"`` (the optional ``torch-discounted-cumsum`` package of
            the paper's authors, wrapped so its known failure modes cannot reach
            the caller; see :func:`_kernel_discounted_cumsum`).

    Returns:
        Tensor of the shape and dtype of ``x``.  Differentiable in ``x``.
    """
    if x.dim() != 2:
        raise ValueError(f"discounted_cumsum expects x of shape (N, K), got {tuple(x.shape)}")
    if backend == "kernel":
        return _kernel_discounted_cumsum(x, gamma)
    if backend != "torch":
        raise ValueError(f"unknown backend {backend!r}; expected 'torch' or 'kernel'")

    n_rows, length = x.shape
    g = _check_gamma(gamma, n_rows, x.device)
    if length == 0 or n_rows == 0:
        return x.clone()
    out_dtype = x.dtype
    compute_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    xc = x.to(compute_dtype)

    chunk = min(_CHUNK, length)
    n_chunks = math.ceil(length / chunk)
    padded = n_chunks * chunk
    if padded != length:
        # Zeros appended on the right do not change a right-to-left scan.
        xc = torch.nn.functional.pad(xc, (0, padded - length))
    blocks = xc.view(n_rows, n_chunks, chunk)

    # Local scan: y_local[i] = Σ_{j ≥ i in chunk} γ^(j-i) x[j]  ==  x @ M, M[j, i] = γ^(j-i).
    offsets = torch.arange(chunk, device=x.device)
    dist = offsets.view(-1, 1) - offsets.view(1, -1)  # j - i
    upper = dist >= 0
    scalar_gamma = not isinstance(gamma, torch.Tensor) or gamma.dim() == 0
    if scalar_gamma:
        m = _powers(g[:1], dist.clamp(min=0).flatten()).view(chunk, chunk)
        m = torch.where(upper, m, torch.zeros_like(m)).to(compute_dtype)
        local = blocks @ m
    else:
        m = _powers(g, dist.clamp(min=0).flatten()).view(n_rows, chunk, chunk)
        m = torch.where(upper, m, torch.zeros_like(m)).to(compute_dtype)
        local = torch.bmm(blocks, m)

    if n_chunks == 1:
        return local.reshape(n_rows, padded)[:, :length].to(out_dtype)

    # Carry: s_c = local[c, 0] + γ^C · s_{c+1}, a scan over chunk starts with decay γ^C.
    starts = _doubling_scan(local[:, :, 0], torch.pow(g, chunk))
    carry_next = torch.cat([starts[:, 1:], torch.zeros_like(starts[:, :1])], dim=1)
    # Position i of a chunk is (chunk - i) steps before the next chunk start.
    to_next = _powers(g, (chunk - offsets).to(torch.float64)).to(compute_dtype)  # (N, C)
    y = local + carry_next.unsqueeze(-1) * to_next.unsqueeze(1)
    return y.reshape(n_rows, padded)[:, :length].to(out_dtype)


def discounted_cumsum_reference(x: torch.Tensor, gamma: float | torch.Tensor) -> torch.Tensor:
    """The plain reverse loop, in float64.  For tests and benchmarks, not for training."""
    g = _check_gamma(gamma, x.shape[0], x.device)
    x64 = x.to(torch.float64)
    out = torch.empty_like(x64)
    running = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    for k in range(x.shape[1] - 1, -1, -1):
        running = x64[:, k] + g * running
        out[:, k] = running
    return out


def kernel_available() -> bool:
    """Whether the optional ``torch-discounted-cumsum`` extension imports."""
    try:
        import torch_discounted_cumsum  # noqa: F401
    except Exception:  # an ImportError, or an extension built against another torch
        return False
    return True


def _kernel_discounted_cumsum(x: torch.Tensor, gamma: float | torch.Tensor) -> torch.Tensor:
    """The authors' kernel (``pip install --no-build-isolation torch-discounted-cumsum``), made safe.

    Measured defects this wrapper keeps from users:
    * with a scalar gamma and more than one row its CPU kernel reads ``gamma[i]``
      out of bounds (wrong values, sometimes inf): we always pass a 1-D gamma of
      size N;
    * it handles only float32/float64: other dtypes go through float32;
    * its CUDA kernel returns the input unchanged when a launch fails, e.g. with
      more than 65,535 rows: larger inputs are split into row blocks.
    """
    try:
        from torch_discounted_cumsum import discounted_cumsum_right
    except Exception as exc:
        raise RuntimeError(
            "backend='kernel' needs the optional torch-discounted-cumsum extension: "
            "pip install --no-build-isolation 'intuitive-fine-tuning[kernels]' "
            "(it must be compiled against the installed torch); or use backend='torch'"
        ) from exc
    n_rows = x.shape[0]
    g64 = _check_gamma(gamma, n_rows, x.device)
    compute_dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    xc = x.to(compute_dtype).contiguous()
    gc = g64.to(compute_dtype).contiguous()
    if n_rows == 0 or x.shape[1] == 0:
        return x.clone()
    parts = [
        discounted_cumsum_right(xc[i : i + _KERNEL_MAX_ROWS], gc[i : i + _KERNEL_MAX_ROWS].contiguous())
        for i in range(0, n_rows, _KERNEL_MAX_ROWS)
    ]
    return torch.cat(parts, dim=0).to(x.dtype)
