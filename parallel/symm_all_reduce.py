"""A one-shot all-reduce over symmetric memory, for decode-sized messages.

A decode step all-reduces a few KB twice per layer. NCCL's all-reduce costs
~22 us a call at that size inside a CUDA graph on 2 x H200, this one-shot
path 7-11 us (scripts/bench_all_reduce.py). The one-shot all-reduce of torch's symmetric memory
copies the local input into a buffer every rank can read over NVLink, meets
the other ranks at a barrier of signal pads, and sums all ranks' buffers
itself; it needs no multicast (NVLS), and a barrier at its end lets the next
call reuse the buffer. It works inside CUDA graphs: the buffer never moves.

A decode step's all-reduces each feed a residual add and an RMSNorm. Up to
MAX_FUSED_ROWS rows of 16-bit values, `add_rms_norm` does the three in one kernel
(below), with no barrier: each row's program writes its partial sums straight
into every peer's symmetric buffer, in the slot of that row from this rank, and
waits until the slots the peers write into its own buffer hold data. An empty
slot holds -0.0 in every element (the data travel with -0.0 made +0.0), so the
data are their own signal and arrive in one trip over NVLink; the program sums
the rows in rank order (every rank gets the same bits), adds the bias and the
residual, normalizes, and empties the slots it read. The caller names a buffer
half, and consecutive calls must name different ones (the decoder: 0 after
attention, 1 after the MLP): a peer writes a half again only two calls later,
after it has received this rank's rows of the call between, which this rank sends
only once it has emptied that half.

At batch 1 the row-parallel layer's GEMV sends its row itself, as it computes it
(`send_target`, kernels/peer_slots.py), and the kernel here (`sent=True`) only waits
for the peers' rows: the sending overlaps the GEMV. The rule above still holds: that
GEMV runs after this rank's previous all-reduce kernel has finished. The vocab-parallel
embedding's lookup sends its row the same way, and its all-reduce has no residual.

`gather` uses the same slots for the vocab-parallel logits: each rank's slice of a
row goes to every peer, and each rank writes all slices side by side as float32.
It is a call of the alternation too (the decoder: the embedding 1, then 0 and 1 per
layer, the gather 0). A step that gathers no rows meets the other ranks over NCCL
instead (parallel/comm.py), as do the calls that do not fit these slots.

`SymmAllReduce.create` returns None where it cannot work (ranks on several
nodes, no symmetric memory in this torch build, no peer access between the
GPUs), so the caller keeps NCCL. Larger messages (prefill) always go to NCCL,
which is faster there. TPSERVE_ALLREDUCE=nccl turns the one-shot path off;
TPSERVE_ALLREDUCE=unfused keeps it but runs the add and norm as kernels of their own.
"""
from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from ..kernels.pdl import launch_kwargs
from ..kernels.peer_slots import SendTarget
from ..kernels.rmsnorm import norm_warps
from ..kernels.switches import env_choice
from .hosts import same_host

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton: the one-shot path is never set up (CUDA only)
    triton = None

logger = logging.getLogger(__name__)

# up to 64 decode rows of a 4096-wide bf16 hidden state; past that NCCL catches up
MAX_BYTES = 512 * 1024
MAX_FUSED_ROWS = 64  # one program a row

MODES = ("auto", "nccl", "unfused")


def all_reduce_mode() -> str:
    """TPSERVE_ALLREDUCE, checked: an unknown value warns and means auto."""
    return env_choice("TPSERVE_ALLREDUCE", MODES, "auto")


if triton is not None:
    from ..kernels.pdl import allow_next, start, wait_prior
    from ..kernels.peer_slots import own_buffer, send_row, take_row, wire_bits

    @triton.jit
    def _all_reduce_add_rms_norm_kernel(x_ptr, bias_ptr, res_ptr, w_ptr, out_ptr, new_res_ptr,
                                        buffers, half_offset, slot_stride, rank,
                                        stride_x, stride_r, stride_o, stride_nr, hidden, eps,
                                        WORLD: tl.constexpr, HAS_BIAS: tl.constexpr,
                                        HAS_RESIDUAL: tl.constexpr, SENT: tl.constexpr,
                                        BLOCK: tl.constexpr):
        allow_next()  # kernels/pdl.py
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < hidden
        dtype = x_ptr.dtype.element_ty
        # every load is issued before the wait for the peers' rows, so that their
        # latencies overlap it: the norm weight and the bias (no kernel writes them)
        # even before the wait for the kernel before
        w = tl.load(w_ptr + cols, mask=mask, other=0.0)
        if HAS_BIAS:
            b = tl.load(bias_ptr + cols, mask=mask, other=0.0)
        wait_prior()
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
        if SENT:  # the kernel that wrote x sent it to the peers already (`SendTarget`)
            bits = wire_bits(x)  # as the peers got it
        else:  # this row from this rank: the slot `rank` of the row in every peer's half
            bits = send_row(x, buffers, half_offset + rank * slot_stride + row * hidden, cols,
                            mask, rank, WORLD)
        mine = own_buffer(buffers, rank)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for src in tl.static_range(WORLD):
            if src == rank:
                got = bits
            else:
                got = take_row(mine + half_offset + src * slot_stride + row * hidden + cols, mask)
            acc += got.to(dtype, bitcast=True).to(tl.float32)
        # from here as kernels/rmsnorm.py: the sum, the bias add and the residual add, each
        # rounded to the activation dtype as the unfused all-reduce and adds are
        total = acc.to(dtype)
        if HAS_BIAS:
            total = (total.to(tl.float32) + b.to(tl.float32)).to(dtype)
        h = total
        if HAS_RESIDUAL:
            h = (total.to(tl.float32) + r.to(tl.float32)).to(dtype)
        tl.store(new_res_ptr + row * stride_nr + cols, h, mask=mask)
        hf = h.to(tl.float32)
        var = tl.sum(hf * hf, axis=0) / hidden
        hn = (hf * tl.rsqrt(var + eps)).to(dtype)
        out = w.to(tl.float32) * hn.to(tl.float32)
        tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


    @triton.jit
    def _all_gather_kernel(x_ptr, out_ptr, buffers, half_offset, slot_stride, rank, stride_x,
                           stride_o, cols, vocab, WORLD: tl.constexpr, SENT: tl.constexpr,
                           BLOCK: tl.constexpr):
        """out[row, src * cols + c] = rank src's x[row, c] as float32, for src * cols + c <
        vocab: one BLOCK of one row from every rank, through the slots as above."""
        start()  # kernels/pdl.py
        row = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = c < cols
        x = tl.load(x_ptr + row * stride_x + c, mask=mask, other=0.0)
        dtype = x_ptr.dtype.element_ty
        if SENT:
            bits = wire_bits(x)
        else:
            bits = send_row(x, buffers, half_offset + rank * slot_stride + row * cols, c, mask,
                            rank, WORLD)
        mine = own_buffer(buffers, rank)
        for src in tl.static_range(WORLD):
            if src == rank:
                got = bits
            else:
                got = take_row(mine + half_offset + src * slot_stride + row * cols + c, mask)
            dst = src * cols + c
            tl.store(out_ptr + row * stride_o + dst, got.to(dtype, bitcast=True).to(tl.float32),
                     mask=mask & (dst < vocab))


class SymmAllReduce:
    """Sums a small CUDA tensor over the group's ranks through one symmetric buffer."""

    def __init__(self, group: dist.ProcessGroup, dtype: torch.dtype, device: torch.device,
                 max_bytes: int = MAX_BYTES) -> None:
        import torch.distributed._symmetric_memory as symm_mem

        try:  # CUDA peer memory; NVSHMEM (where installed) needs a bootstrap of its own
            symm_mem.set_backend("CUDA")
        except (RuntimeError, AttributeError):
            pass  # chosen already, or a torch with one backend
        self.group_name = group.group_name
        self.dtype = dtype
        self.buffer = symm_mem.empty(max_bytes // dtype.itemsize, dtype=dtype, device=device)
        symm_mem.rendezvous(self.buffer, self.group_name)
        # add_rms_norm's two halves, each a slot of max_bytes for every rank, all empty
        # (-0.0) before any peer can write: the probe's one-shot call orders them
        self.world = dist.get_world_size(group)
        self.slot_numel = max_bytes // dtype.itemsize
        self.fused = symm_mem.empty(2 * self.world * self.slot_numel, dtype=dtype,
                                    device=device)
        self.fused.fill_(-0.0)
        self.handle = symm_mem.rendezvous(self.fused, self.group_name)
        self.join_norm = all_reduce_mode() != "unfused" and dtype.itemsize == 2

    @classmethod
    def create(cls, group: dist.ProcessGroup, dtype: torch.dtype,
               device: torch.device) -> SymmAllReduce | None:
        """A checked instance, or None where the one-shot path cannot run here.
        Collective: every rank of the group calls it with the same arguments."""
        if all_reduce_mode() == "nccl":
            return None
        if not same_host(group):  # peer memory reaches only the GPUs of one node
            return None
        if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16, torch.float32):
            return None
        fast, ok, joined = None, False, False
        try:
            fast = cls(group, dtype, device)
            probe = torch.full((1024,), float(dist.get_rank(group) + 1), dtype=dtype,
                               device=device)
            total = sum(range(1, dist.get_world_size(group) + 1))
            ok = bool((fast(probe) == total).all())
            joined = ok and fast.join_norm and fast._joined_works(probe, total)
        except Exception as exc:  # noqa: BLE001  any failure here only means: keep NCCL
            what = "all-reduce joined with the norm" if ok else "one-shot all-reduce"
            logger.warning("%s unavailable (%s); not using it", what, exc)
        # every rank must take the same path, or their collectives would not match
        flags = torch.tensor([int(ok), int(joined)], device=device)
        dist.all_reduce(flags, op=dist.ReduceOp.MIN, group=group)
        if flags[0].item() != 1:
            return None
        fast.join_norm = flags[1].item() == 1
        return fast

    def _joined_works(self, probe: torch.Tensor, total: float) -> bool:
        ones = torch.ones(1, probe.numel(), dtype=probe.dtype, device=probe.device)
        ok = True
        for half in (0, 1):  # the NCCL all-reduce after the probe meets the ranks again
            out, res = self.add_rms_norm(probe.view(1, -1), ones.clone(), ones.view(-1), 0.0,
                                         None, half)
            ok = ok and bool((res == total + 1).all()) and bool(((out - 1).abs() < 1e-2).all())
        return ok

    def fits(self, x: torch.Tensor) -> bool:
        return (x.dtype == self.dtype and x.is_contiguous()
                and x.numel() <= self.buffer.numel())

    def fits_fused(self, x: torch.Tensor) -> bool:
        return (self.join_norm and x.dim() == 2 and x.shape[0] <= MAX_FUSED_ROWS
                and x.dtype == self.dtype and x.stride(-1) == 1 and x.numel() <= self.slot_numel)

    def fits_gather(self, x: torch.Tensor) -> bool:
        return self.fits_fused(x) and x.shape[0] >= 1

    def gather(self, x: torch.Tensor, vocab_size: int, half: int, sent: bool = False,
               ) -> torch.Tensor:
        """[rows, vocab_size] float32: every rank's [rows, cols] `x` side by side in rank
        order, trimmed to vocab_size, in one kernel over buffer half `half` (the same
        rule as add_rms_norm's). sent: x is one row that the kernel computing it has
        sent already (`send_target`)."""
        rows, cols = x.shape
        if sent and rows != 1:
            raise ValueError(f"gather: sent rows are one row, not {rows}")
        out = torch.empty(rows, vocab_size, dtype=torch.float32, device=x.device)
        block = min(1024, triton.next_power_of_2(cols))
        if rows:
            h = self.handle
            _all_gather_kernel[(rows, triton.cdiv(cols, block))](
                x, out, h.buffer_ptrs_dev, self._half_offset(half), self.slot_numel, h.rank,
                x.stride(0), out.stride(0), cols, vocab_size, WORLD=h.world_size, SENT=sent,
                BLOCK=block, num_warps=4, **launch_kwargs(x))
        return out

    def send_target(self, hidden: int, dtype: torch.dtype, half: int) -> SendTarget | None:
        """Where the kernel that computes one row of `hidden` values may send them itself
        (kernels/peer_slots.py), for `add_rms_norm` or `gather` with `half` and
        sent=True; None where those would not take such a row."""
        if not self.join_norm or dtype != self.dtype or hidden > self.slot_numel:
            return None
        h = self.handle
        offset = self._half_offset(half) + h.rank * self.slot_numel
        return SendTarget(h.buffer_ptrs_dev, offset, h.rank, h.world_size)

    def _half_offset(self, half: int) -> int:
        """The first element of buffer half `half`: world slots of slot_numel each."""
        return half * self.world * self.slot_numel

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float, bias: torch.Tensor | None, half: int, sent: bool = False,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """(rms_norm(h) * weight, h) for h = (sum over ranks of `x`) + bias + residual, of
        [rows, hidden] partial sums `x` (see fits_fused), in one kernel; residual None:
        no add. `half`, 0 or 1, must differ from the previous call's (see the module's
        docstring). sent: x is one row that the kernel computing it has sent already
        (`send_target`)."""
        rows, hidden = x.shape
        if sent and rows != 1:
            raise ValueError(f"add_rms_norm: sent partial sums are one row, not {rows}")
        if residual is not None:
            residual = residual.reshape(rows, hidden)
        res = x if residual is None else residual
        out, new_residual = torch.empty_like(x), torch.empty_like(x)
        if rows:
            h, block = self.handle, triton.next_power_of_2(hidden)
            _all_reduce_add_rms_norm_kernel[(rows,)](
                x, x if bias is None else bias, res, weight, out, new_residual,
                h.buffer_ptrs_dev, self._half_offset(half), self.slot_numel, h.rank,
                x.stride(0), res.stride(0), out.stride(0), new_residual.stride(0), hidden,
                eps, WORLD=h.world_size, HAS_BIAS=bias is not None,
                HAS_RESIDUAL=residual is not None, SENT=sent,
                BLOCK=block, num_warps=norm_warps(block), **launch_kwargs(x))
        return out, new_residual

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        staging = self.buffer[:x.numel()].view(x.shape)  # the op wants equal shapes
        return torch.ops.symm_mem.one_shot_all_reduce_copy(staging, x, "sum", self.group_name)
