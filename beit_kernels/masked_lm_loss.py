"""Masked-token LM loss: gather the masked rows, apply the LM head, cross-entropy and accuracy.

    loss = mean over masked tokens of CE(hidden[mask] @ weightᵀ + bias, labels[mask]);  accuracy = mean(argmax == label)

Fused path (Liger FusedLinearCrossEntropy style, without its host sync): the masked rows are compacted to the front of
a fixed-size `[B*N]` row order by a stable argsort of the mask (row-major order kept, count kept on device), then
processed in chunks: LM head GEMM → `_cross_entropy_kernel` (online logsumexp, argmax, loss, and dlogits written in
place over the logits) → grad_hidden rows = dlogits @ W, grad_weight/grad_bias accumulated in fp32. All gradients are
computed in the forward; the backward only scales them by the incoming gradient. The fp32 `[M, V]` logits are never
held: at most one `[chunk, V]` logits tile in the compute dtype is alive.

Limits and costs: with no host sync the number of masked rows is unknown on the host. Without a bound all `B*N`
rows go through the GEMMs and rows past the count contribute exactly zero (≈ N / masked-count × the masked-only GEMM
work: 2.6× at BEiT's 75 of 196). Pass `max_masked` (a static upper bound on the masked count, e.g. B × the masking
generator's `num_masking_patches`, which it never exceeds) to run the GEMMs on that many rows only; a count above the
bound fails a device-side assertion rather than giving a wrong loss. grad_weight accumulates each chunk's
`dlogitsᵀ @ x` product in fp32, and the product itself comes out of the GEMM in fp32 (never rounded to bf16 per
chunk). A label outside `[0, V)` at a masked position gives a NaN loss (a device-side signal, no sync); labels at
unmasked positions are never read. The weight is cast to the hidden dtype for the GEMMs (autocast-style).
Dispatch: Triton for CUDA tensors or under `TRITON_INTERPRET=1`; a CPU tensor otherwise is an error naming the fix.
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from beit_kernels._dispatch import require_triton_on


def masked_lm_loss_ref(
    hidden: torch.Tensor,
    bool_masked_pos: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    max_masked: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-PyTorch reference (float64-capable; boolean indexing syncs with the host).

    hidden `[B, N, C]` patch tokens, bool_masked_pos `[B, N]`, weight `[V, C]`, bias `[V]` or None, labels `[B, N]`
    (read only at masked positions). Returns (mean cross-entropy over masked tokens, fraction of masked tokens whose
    argmax equals the label). Zero masked tokens give a loss of 0 with zero gradients, never NaN. `max_masked` is
    checked like in the fused path (a count above the bound is an error) but does not change the result.
    """
    mask = bool_masked_pos.bool()
    rows = hidden[mask]  # [M, C]
    if max_masked is not None and rows.shape[0] > max_masked:
        raise RuntimeError(f"masked_lm_loss: more masked tokens than max_masked ({rows.shape[0]} > {max_masked})")
    targets = labels[mask].long()  # [M]
    logits = F.linear(rows, weight, bias).float() if rows.dtype != torch.float64 else F.linear(rows, weight, bias)
    count = max(rows.shape[0], 1)  # an empty mask divides a zero sum by one instead of averaging over nothing
    loss = F.cross_entropy(logits, targets, reduction="sum") / count
    accuracy = (logits.argmax(dim=-1) == targets).sum().to(logits.dtype) / count
    return loss, accuracy.detach()


@triton.jit
def _cross_entropy_kernel(
    LOGITS,  # [C_rows, V] logits of one chunk (compute dtype); overwritten with dlogits
    stride_row,  # row stride of LOGITS
    LABELS,  # [C_rows] int64 labels of the chunk's rows (read only for valid rows)
    COUNT,  # [] int64 number of masked rows (device scalar)
    LOSS,  # [C_rows] fp32 per-row loss (output; 0 for rows past COUNT)
    CORRECT,  # [C_rows] fp32 per-row argmax == label (output; 0 for rows past COUNT)
    row_start,  # index of this chunk's first row in the compacted order
    V,  # vocabulary size
    BLOCK_V: tl.constexpr,  # vocabulary entries per step
):
    row = tl.program_id(0)
    count = tl.load(COUNT)
    valid = (row_start + row) < count
    label = tl.load(LABELS + row, mask=valid, other=0)
    label_ok = (label >= 0) & (label < V)
    logits_row = LOGITS + row.to(tl.int64) * stride_row
    running_max = float("-inf")
    running_sum = 0.0
    best_value = float("-inf")
    best_index = 0
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        x = tl.load(logits_row + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        block_max = tl.max(x, axis=0)
        block_arg = tl.argmax(x, axis=0, tie_break_left=True) + start
        best_index = tl.where(block_max > best_value, block_arg, best_index)  # strict: first maximum wins
        best_value = tl.maximum(best_value, block_max)
        new_max = tl.maximum(running_max, block_max)
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)
        running_max = new_max
    lse = running_max + tl.log(running_sum)
    label_logit = tl.load(logits_row + label, mask=valid & label_ok, other=0.0).to(tl.float32)
    loss = tl.where(label_ok, lse - label_logit, float("nan"))
    tl.store(LOSS + row, tl.where(valid, loss, 0.0))
    tl.store(CORRECT + row, tl.where(valid & (best_index == label), 1.0, 0.0))
    grad_scale = tl.where(valid, 1.0 / tl.maximum(count, 1).to(tl.float32), 0.0)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        x = tl.load(logits_row + offs, mask=offs < V, other=0.0).to(tl.float32)
        grad = (tl.exp(x - lse) - tl.where(offs == label, 1.0, 0.0)) * grad_scale
        tl.store(logits_row + offs, grad.to(LOGITS.dtype.element_ty), mask=offs < V)


def _matmul_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`a @ b` returned in fp32 without a rounding to the half input dtype on the way: cuBLAS's fp32-output GEMM of
    half inputs on CUDA (tensor-core speed), an fp32 GEMM otherwise (CPU, fp32 inputs)."""
    if a.is_cuda and a.dtype in (torch.float16, torch.bfloat16):
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


def _chunk_rows(total_rows: int, vocab: int, channels: int) -> int:
    """Liger's chunking: each chunk's logits are about the size of the hidden rows."""
    return min(total_rows, triton.next_power_of_2(triton.cdiv(total_rows, triton.cdiv(vocab, channels))))


# The launcher is a torch.library custom op: opaque to torch.compile (the fake kernel gives shapes), differentiated by
# MaskedLMLossFunction below.
@torch.library.custom_op("beit_kernels::masked_lm_loss_fwd", mutates_args=())
def masked_lm_loss_forward(
    hidden: torch.Tensor,
    bool_masked_pos: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    max_masked: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused forward. Returns loss [], accuracy [] (fp32), grad_hidden `[B, N, C]` (hidden dtype),
    grad_weight `[V, C]` and grad_bias `[V]` (fp32; `[0]` when bias is None), all for a unit loss gradient."""
    batch, tokens, channels = hidden.shape
    vocab = weight.shape[0]
    flat_mask = bool_masked_pos.reshape(batch * tokens).bool()  # [B*N]
    order = torch.argsort((~flat_mask).to(torch.int8), stable=True)  # [B*N] masked rows first, row-major kept
    count = flat_mask.sum()  # [] int64, stays on device
    total = batch * tokens if max_masked is None else max(0, min(batch * tokens, max_masked))  # rows through the GEMMs
    if total < batch * tokens:
        torch._assert_async(count <= total, "masked_lm_loss: more masked tokens than max_masked")
    rows = hidden.reshape(batch * tokens, channels)  # [B*N, C]
    order = order[:total]  # [T] the rows that can be masked, in compacted order
    targets = labels.reshape(batch * tokens)[order].long()  # [T] labels in compacted order
    head_weight = weight.to(hidden.dtype)
    head_bias = bias.to(hidden.dtype) if bias is not None else None
    loss_rows = torch.empty(total, device=hidden.device, dtype=torch.float32)
    correct_rows = torch.empty(total, device=hidden.device, dtype=torch.float32)
    grad_rows = torch.empty(total, channels, device=hidden.device, dtype=hidden.dtype)  # [T, C] compacted order
    grad_weight = torch.zeros(vocab, channels, device=hidden.device, dtype=torch.float32)
    grad_bias = torch.zeros(vocab if bias is not None else 0, device=hidden.device, dtype=torch.float32)
    chunk = _chunk_rows(max(total, 1), vocab, channels)
    for start in range(0, total, chunk):
        stop = min(start + chunk, total)
        x = rows.index_select(0, order[start:stop])  # [c, C]
        logits = F.linear(x, head_weight, head_bias).contiguous()  # [c, V], becomes dlogits in place
        _cross_entropy_kernel[(stop - start,)](
            logits, logits.stride(0), targets[start:stop], count, loss_rows[start:stop], correct_rows[start:stop],
            start, vocab, BLOCK_V=min(4096, triton.next_power_of_2(vocab)),
        )
        grad_rows[start:stop] = logits @ head_weight  # [c, C]
        grad_weight += _matmul_fp32(logits.t(), x)
        if bias is not None:
            grad_bias += logits.float().sum(dim=0)
    # rows never gathered (past the bound) are unmasked: their gradient is zero
    grad_hidden = torch.zeros_like(rows).index_copy_(0, order, grad_rows).view(batch, tokens, channels)
    denominator = count.clamp(min=1).float()
    return loss_rows.sum() / denominator, correct_rows.sum() / denominator, grad_hidden, grad_weight, grad_bias


@masked_lm_loss_forward.register_fake
def _fwd_fake(hidden, bool_masked_pos, weight, bias, labels, max_masked=None):
    scalar = hidden.new_empty((), dtype=torch.float32)
    grad_bias = hidden.new_empty((weight.shape[0] if bias is not None else 0,), dtype=torch.float32)
    grad_weight = weight.new_empty(weight.shape, dtype=torch.float32)
    return scalar, scalar.clone(), hidden.new_empty(hidden.shape), grad_weight, grad_bias


class MaskedLMLossFunction(torch.autograd.Function):
    """Gradients are computed in the forward; the backward scales them by the loss gradient."""

    @staticmethod
    def forward(ctx, hidden, bool_masked_pos, weight, bias, labels, max_masked=None):
        loss, accuracy, grad_hidden, grad_weight, grad_bias = masked_lm_loss_forward(hidden, bool_masked_pos, weight,
                                                                                     bias, labels, max_masked)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.mark_non_differentiable(accuracy)
        return loss, accuracy

    @staticmethod
    def backward(ctx, grad_loss, grad_accuracy):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        grad_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype)
        grad_weight = (grad_weight * grad_loss).to(ctx.weight_dtype)
        grad_bias = (grad_bias * grad_loss).to(ctx.bias_dtype) if ctx.bias_dtype is not None else None
        return grad_hidden, None, grad_weight, grad_bias, None, None


def _check_inputs(hidden, bool_masked_pos, weight, bias, labels) -> None:
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [B, N, C], got shape {tuple(hidden.shape)}")
    batch, tokens, channels = hidden.shape
    if tuple(bool_masked_pos.shape) != (batch, tokens) or tuple(labels.shape) != (batch, tokens):
        raise ValueError(f"bool_masked_pos and labels must be [B, N] = [{batch}, {tokens}], "
                         f"got {tuple(bool_masked_pos.shape)} and {tuple(labels.shape)}")
    if weight.dim() != 2 or weight.shape[1] != channels:
        raise ValueError(f"weight must be [V, C={channels}], got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must be [V={weight.shape[0]}], got {tuple(bias.shape)}")
    if labels.dtype.is_floating_point:
        raise ValueError(f"labels must be integer token ids, got {labels.dtype}")


def masked_lm_loss(
    hidden: torch.Tensor,
    bool_masked_pos: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    max_masked: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused masked LM loss → (loss [], accuracy []), no device→host sync, differentiable in hidden, weight, bias.

    hidden `[B, N, C]` patch tokens (no CLS), bool_masked_pos `[B, N]`, weight `[V, C]`, bias `[V]` or None,
    labels `[B, N]` (read only at masked positions). Zero masked tokens give loss 0 with zero gradients.
    `max_masked`: optional static bound on the number of masked tokens in the batch (see the module docstring).
    Triton kernels only: CPU tensors without `TRITON_INTERPRET=1` raise (the CPU path is `masked_lm_loss_ref`).
    """
    _check_inputs(hidden, bool_masked_pos, weight, bias, labels)
    if max_masked is not None and max_masked < 0:
        raise ValueError(f"max_masked must be a non-negative bound on the masked count, got {max_masked}")
    require_triton_on("masked_lm_loss", hidden)
    return MaskedLMLossFunction.apply(hidden, bool_masked_pos, weight, bias, labels, max_masked)
