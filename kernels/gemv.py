"""y = x @ w.T for one row of x: the batch-1 decode matmul of 16-bit weights.

At one row a matmul only streams the weight matrix from memory. Each program
reads BLOCK_N whole rows of w [N, K] in [BLOCK_N, BLOCK_K] tiles and keeps
float32 products per tile element, summed over K once at the end, so the inner
loop is a load and a multiply-add per weight.

One H200, µs, weights not in L2 (a CUDA graph cycling through copies), bf16,
the Llama-3-8B matrices whole and halved for tp=2, against cuBLAS (F.linear):

    N x K          cuBLAS   this (4 rows a program, 1024-wide tiles, 2 warps)
    3072 x 4096      11.0     8.3
    4096 x 2048       7.1     6.0
    14336 x 4096     30.4    29.0
    4096 x 7168      18.6    15.5
    6144 x 4096      16.4    14.2
    4096 x 4096      12.4    10.0
    28672 x 4096     56.2    55.4
    4096 x 14336     30.3    28.5
    64128 x 4096    125.2   118.5

The best launch of 36 tried (2-16 rows, 256-1024 wide, 2-8 warps) for most of
these; none was best for all. With up to four rows of x in the same programs
it was 1.6-2.7x slower than cuBLAS, so `linear` takes it for one row only.

`gemv_silu_mul` is the SwiGLU layer's [gate | up] projection with its activation:
each program reads gate rows and the matching up rows in one tile and writes
silu(gate) * up, so the activation costs no launch of its own
(`linear_silu_mul`, which the MLP's `ParallelLinear.silu_mul` calls).

On Hopper both launch as programmatic dependents (kernels/pdl.py): a program
loads its first `preload` weight tiles before it waits for the kernel before it,
whose output x is, so a GEMV's start overlaps that kernel's end. Two 1024-wide
tiles made a Llama-3-8B step 1.2% (tp=1) and 1.7% (tp=2) faster than one, on
2 x H200; four 512-wide ones were slower (more registers, fewer programs resident).

`gemv` can also send its output row into the other ranks' all-reduce slots as it
computes it (`send`, kernels/peer_slots.py): a row-parallel layer at batch 1, whose
all-reduce then only waits for the peers' rows.
"""

from __future__ import annotations

import torch

from ._dispatch import HAS_TRITON, cdiv, use_triton
from .activation import silu_and_mul
from .pdl import launch_kwargs
from .peer_slots import SendTarget
from .switches import env_choice

# preload: weight tiles a program loads before it waits for x (a power of 2)
LAUNCH = dict(block_n=4, block_k=1024, num_warps=2, preload=2)
# block_n gate rows and as many up rows a program
SILU_LAUNCH = dict(block_n=2, block_k=1024, num_warps=2, preload=2)


def _enabled_from_env() -> bool:
    """TPSERVE_GEMV=0: every matmul through cuBLAS (for comparison); 1 is the default."""
    return env_choice("TPSERVE_GEMV", ("0", "1"), "1") == "1"


ENABLED = _enabled_from_env()

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .pdl import allow_next, wait_prior
    from .peer_slots import send_row

    @triton.jit
    def _dot_rows(x_ptr, w_ptr, rows, rmask, K, stride_wn, ROWS: tl.constexpr,
                  BLOCK_K: tl.constexpr, PRELOAD: tl.constexpr):
        """float32 dot products of x with w's `rows` [ROWS]. The first PRELOAD weight
        tiles are loaded before x, the only input an earlier kernel writes
        (kernels/pdl.py), so that they stream while that kernel still runs."""
        allow_next()
        ks = tl.arange(0, BLOCK_K)
        w_rows = w_ptr + rows.to(tl.int64)[:, None] * stride_wn
        pk = tl.arange(0, PRELOAD)[:, None] * BLOCK_K + ks[None, :]  # [PRELOAD, BLOCK_K]
        pmask = pk < K
        w_early = tl.load(w_rows[None, :, :] + pk[:, None, :],
                          mask=rmask[None, :, None] & pmask[:, None, :], other=0.0)
        wait_prior()
        x_early = tl.load(x_ptr + pk, mask=pmask, other=0.0)
        acc = tl.sum(w_early.to(tl.float32) * x_early.to(tl.float32)[:, None, :], axis=0)
        for k0 in range(PRELOAD * BLOCK_K, K, BLOCK_K):
            kk = k0 + ks
            kmask = kk < K
            w = tl.load(w_rows + kk[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
            x = tl.load(x_ptr + kk, mask=kmask, other=0.0)
            acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        return tl.sum(acc, axis=1)

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, y_ptr, N, K, stride_wn, buffers, send_offset, rank,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRELOAD: tl.constexpr,
                     WORLD: tl.constexpr):
        """WORLD > 0: y also goes to the peers' slots of a `SendTarget`."""
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = rows < N
        y = _dot_rows(x_ptr, w_ptr, rows, nmask, K, stride_wn, BLOCK_N, BLOCK_K, PRELOAD)
        y = y.to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + rows, y, mask=nmask)
        if WORLD > 0:
            send_row(y, buffers, send_offset, rows, nmask, rank, WORLD)

    @triton.jit
    def _gemv_silu_mul_kernel(x_ptr, w_ptr, y_ptr, N, K, stride_wn,
                              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                              PRELOAD: tl.constexpr):
        """y[n] = silu(x . w[n]) * (x . w[N + n]): BLOCK_N gate rows and their up rows,
        interleaved in one tile."""
        i = tl.arange(0, 2 * BLOCK_N)
        outs = tl.program_id(0) * BLOCK_N + i // 2
        rows = outs + (i % 2) * N
        dots = _dot_rows(x_ptr, w_ptr, rows, outs < N, K, stride_wn, 2 * BLOCK_N, BLOCK_K,
                         PRELOAD)
        # rounded as the matmul's output would be, then as kernels/activation.py
        dtype = y_ptr.dtype.element_ty
        gate, up = tl.split(tl.reshape(dots.to(dtype).to(tl.float32), [BLOCK_N, 2]))
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        tl.store(y_ptr + n, (gate / (1.0 + tl.exp(-gate)) * up).to(dtype), mask=n < N)


def gemv(x: torch.Tensor, w: torch.Tensor, block_n: int = LAUNCH["block_n"],
         block_k: int = LAUNCH["block_k"], num_warps: int = LAUNCH["num_warps"],
         preload: int = LAUNCH["preload"], send: SendTarget | None = None) -> torch.Tensor:
    """x [1, K] @ w [N, K].T -> [1, N] in x's dtype, summed in float32. send: the row
    also goes to the other ranks' slots (kernels/peer_slots.py; 16-bit, CUDA only)."""
    if x.dim() != 2 or w.dim() != 2 or x.shape[0] != 1 or x.shape[1] != w.shape[1]:
        raise ValueError(f"gemv: x {tuple(x.shape)} must be one row as long as the rows of "
                         f"w {tuple(w.shape)}")
    if send is not None and not (x.element_size() == 2 and use_triton(x)):
        raise ValueError("gemv: only 16-bit rows on a GPU can be sent to other ranks")
    if not use_triton(x):
        return (x.float() @ w.float().T).to(x.dtype)
    x = x.contiguous()
    if w.stride(1) != 1:
        w = w.contiguous()
    n, k = w.shape
    y = torch.empty(1, n, dtype=x.dtype, device=x.device)
    buffers, offset, rank, world = send or (0, 0, 0, 0)
    _gemv_kernel[(cdiv(n, block_n),)](x, w, y, n, k, w.stride(0), buffers, offset, rank,
                                      BLOCK_N=block_n, BLOCK_K=block_k, PRELOAD=preload,
                                      WORLD=world, num_warps=num_warps, **launch_kwargs(x))
    return y


def gemv_silu_mul(x: torch.Tensor, w: torch.Tensor, block_n: int = SILU_LAUNCH["block_n"],
                  block_k: int = SILU_LAUNCH["block_k"],
                  num_warps: int = SILU_LAUNCH["num_warps"],
                  preload: int = SILU_LAUNCH["preload"]) -> torch.Tensor:
    """silu(g) * u for [g | u] = x [1, K] @ w [2I, K].T -> [1, I]: a SwiGLU layer's
    [gate | up] projection and its activation in one pass over w."""
    if x.dim() != 2 or w.dim() != 2 or x.shape[0] != 1 or x.shape[1] != w.shape[1] \
            or w.shape[0] % 2:
        raise ValueError(f"gemv_silu_mul: x {tuple(x.shape)} must be one row as long as the "
                         f"rows of w {tuple(w.shape)}, which must be an even number")
    if not use_triton(x):
        return silu_and_mul(gemv(x, w))
    x = x.contiguous()
    if w.stride(1) != 1:
        w = w.contiguous()
    inter, k = w.shape[0] // 2, w.shape[1]
    y = torch.empty(1, inter, dtype=x.dtype, device=x.device)
    _gemv_silu_mul_kernel[(cdiv(inter, block_n),)](x, w, y, inter, k, w.stride(0),
                                                   BLOCK_N=block_n, BLOCK_K=block_k,
                                                   PRELOAD=preload, num_warps=num_warps,
                                                   **launch_kwargs(x))
    return y


def one_row(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether `linear(x, w)` runs `gemv` (and so can send its row, see `linear`)."""
    return (ENABLED and x.is_cuda and x.numel() == x.shape[-1] and w.dtype == x.dtype
            and x.dtype in (torch.bfloat16, torch.float16) and use_triton(x))


def linear(x: torch.Tensor, w: torch.Tensor, send: SendTarget | None = None) -> torch.Tensor:
    """F.linear(x, w) without bias; one row of 16-bit x on a GPU runs `gemv`. send:
    gemv also sends its row to the other ranks (only where `one_row(x, w)`)."""
    if one_row(x, w):
        return gemv(x.reshape(1, -1), w, send=send).reshape(*x.shape[:-1], w.shape[0])
    if send is not None:
        raise ValueError("linear: only the one-row GEMV sends its output (see one_row)")
    return torch.nn.functional.linear(x, w)


def linear_silu_mul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """silu_and_mul(F.linear(x, w)) for a [gate | up] weight w [2I, K]; one row of
    16-bit x on a GPU runs `gemv_silu_mul`."""
    if one_row(x, w):
        return gemv_silu_mul(x.reshape(1, -1), w).reshape(*x.shape[:-1], w.shape[0] // 2)
    return silu_and_mul(torch.nn.functional.linear(x, w))
