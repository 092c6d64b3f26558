"""BEiT: ViT with relative position bias, as the official unilm code builds it (parameter names kept for checkpoints).

Legend: B batch, L = h*w patches, N = L + 1 tokens (CLS first), C embed dim, H heads, D = C / H head dim,
R relative-distance table rows, M masked patches in the batch, V visual-token vocabulary, K classes.

- `BeitForMaskedImageModeling` (`modeling_pretrain.py`): masked patches become `mask_token`, a shared relative
  position bias feeds every block, `lm_head` predicts the visual token at masked positions only.
- `BeitForImageClassification` (`modeling_finetune.py`): per-layer relative position bias tables, mean pooling of the
  patch tokens + `fc_norm` (or the CLS token + `norm`), linear `head`.
Both share `BeitEncoder` (patch embedding, CLS, optional absolute position embedding, blocks).

Attention backends (`attn_impl`, chosen at build): "eager" (softmax(q kᵀ·scale + bias) v in PyTorch), "sdpa"
(`F.scaled_dot_product_attention` with the bias as additive mask), "triton" (`beit_kernels.rel_pos_attention`, which
takes the `[R, H]` table and returns its gradient). The masked-token loss is chosen separately (`mlm_loss`, see
`MaskedLMHead`), so attention backends can be compared alone.

Every parameter is read inside the `forward` of the module that owns it (the shared relative position table by
`RelativePositionBias.forward`, the LM head by `MaskedLMHead.forward`), so ZeRO-3 gathers each one when it is needed
without a list of external parameters.
"""

import logging
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import beit_kernels
from beit_kernels._dispatch import require_triton_available
from beit_kernels.rel_pos_bias import TableGradPlan, table_grad_plan
from engine.pos_embed import num_relative_distance, relative_position_index
from engine.sharded import full_numel, gathered

logger = logging.getLogger(__name__)

ATTN_IMPLS = ("eager", "sdpa", "triton")
MLM_LOSSES = ("fused", "reference")
HEAD_INIT_SCALE = 0.001  # official `init_scale`: the classifier starts almost silent
LAYER_NORM_EPS = 1e-6


class SharedRelPos(NamedTuple):
    """The shared relative position bias as the blocks read it: the table and index for the triton kernel, or the
    `[H, N, N]` bias gathered once per forward for eager/sdpa (None entries when the model has no shared table)."""

    table: torch.Tensor | None  # [R, H]
    index: torch.Tensor | None  # [N, N] int32
    plan: TableGradPlan | None  # the index's table-gradient plan, triton only
    bias: torch.Tensor | None  # [H, N, N], eager/sdpa only


NO_SHARED_REL_POS = SharedRelPos(None, None, None, None)


def _pair(value: int | Sequence[int], what: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(side, int) and side > 0 for side in pair):
        raise ValueError(f"{what} must be a positive int or a (height, width) pair of positive ints, got {value!r}")
    return pair


def _resolve_kernel(name: str, choice: str, alternative: str) -> Callable:
    """`beit_kernels.<name>`, resolved once at build: a missing kernel, or a machine where Triton cannot run, fails here
    with the fix (`alternative`), never mid-training and never by silently running the PyTorch reference."""
    kernel = getattr(beit_kernels, name, None)
    if kernel is None:
        raise ValueError(f"{choice} needs beit_kernels.{name}, which this installation does not provide; choose "
                         f"{alternative}")
    require_triton_available(choice, alternative)
    return kernel


def drop_path(x: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero the whole residual branch of a random subset of samples, rescale the rest."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1.0 - drop_prob
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)  # [B, 1, 1]
    return x * keep / keep_prob


class DropPath(nn.Module):
    def __init__(self, drop_prob: float) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f"p={self.drop_prob}"


class PatchEmbed(nn.Module):
    """Image `[B, 3, H_img, W_img]` → patch tokens `[B, L, C]` with a stride-`patch_size` convolution."""

    def __init__(self, img_size: int | Sequence[int], patch_size: int | Sequence[int], in_chans: int,
                 embed_dim: int) -> None:
        super().__init__()
        self.img_size = _pair(img_size, "img_size")
        self.patch_size = _pair(patch_size, "patch_size")
        if any(img % patch for img, patch in zip(self.img_size, self.patch_size)):
            raise ValueError(f"img_size {self.img_size} must be divisible by patch_size {self.patch_size}")
        self.patch_shape = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])  # (h, w)
        self.num_patches = self.patch_shape[0] * self.patch_shape[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        expected = (self.proj.in_channels, *self.img_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"expected images of shape [B, {expected[0]}, {expected[1]}, {expected[2]}], got "
                f"{list(images.shape)}; resize the input or build the model with img_size={tuple(images.shape[-2:])}"
            )
        return self.proj(images).flatten(2).transpose(1, 2)  # [B, L, C]


def register_rel_pos_index(module: nn.Module, window_size: tuple[int, int]) -> None:
    """Buffers built once per model (not saved): the `[N, N]` int32 index (the kernels' index type, so no call
    converts it) and the plan of the Triton table gradient (`beit_kernels.rel_pos_bias.table_grad_plan`), so no forward
    or backward recomputes them."""
    index = relative_position_index(window_size).to(torch.int32)
    order, offsets = table_grad_plan(index, num_relative_distance(window_size))
    module.register_buffer("relative_position_index", index, persistent=False)
    module.register_buffer("relative_position_order", order, persistent=False)
    module.register_buffer("relative_position_offsets", offsets, persistent=False)


def rel_pos_plan(module: nn.Module) -> TableGradPlan:
    """The table-gradient plan held by a module's `register_rel_pos_index` buffers."""
    return TableGradPlan(module.relative_position_order, module.relative_position_offsets)


def gathered_bias(module: nn.Module) -> torch.Tensor:
    """`[H, N, N]` bias of a module holding `relative_position_bias_table` and the `register_rel_pos_index` buffers."""
    return beit_kernels.rel_pos_bias(module.relative_position_bias_table, module.relative_position_index,
                                rel_pos_plan(module))


class RelativePositionBias(nn.Module):
    """The shared table of the pretraining model: `[R, H]` zero-initialised, read through an `[N, N]` index (an int32
    buffer built once). `forward()` hands it to the blocks: gathered once into `[H, N, N]` for eager/sdpa, as the
    table for the triton kernel (which gathers it itself and returns the table's gradient)."""

    def __init__(self, window_size: tuple[int, int], num_heads: int, attn_impl: str) -> None:
        super().__init__()
        self.window_size = window_size
        self.attn_impl = attn_impl
        self.relative_position_bias_table = nn.Parameter(torch.zeros(num_relative_distance(window_size), num_heads))
        register_rel_pos_index(self, window_size)

    def forward(self) -> SharedRelPos:
        table, index = self.relative_position_bias_table, self.relative_position_index
        if self.attn_impl == "triton":
            # A copy that outlives this call: ZeRO-3 may release the parameter itself once this forward returns,
            # before the blocks read it. [R, H] values, a few KB; gradients flow back through the copy.
            return SharedRelPos(table.clone(), index, rel_pos_plan(self), None)
        return SharedRelPos(table, index, None, gathered_bias(self))  # bias [H, N, N]


class Attention(nn.Module):
    """Multi-head self-attention with q/v biases (k bias is zero) and optional relative position bias."""

    def __init__(self, dim: int, num_heads: int, attn_impl: str, window_size: tuple[int, int] | None) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.attn_impl = attn_impl
        self.triton_attention = _resolve_kernel("rel_pos_attention", "attn_impl='triton'",
                                                "attn_impl='sdpa' or 'eager'") if attn_impl == "triton" else None
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        if window_size is not None:
            self.relative_position_bias_table = nn.Parameter(torch.zeros(num_relative_distance(window_size), num_heads))
            register_rel_pos_index(self, window_size)
        else:
            self.relative_position_bias_table = None
            self.relative_position_index = None
        self.proj = nn.Linear(dim, dim)

    def _triton_table(self, shared: SharedRelPos) -> tuple[torch.Tensor | None, torch.Tensor | None,
                                                           TableGradPlan | None]:
        """This layer's table plus the shared one (same index, so summing tables = summing biases), the index and
        its table-gradient plan."""
        own = self.relative_position_bias_table
        if own is None:
            return shared.table, shared.index, shared.plan
        return (own if shared.table is None else own + shared.table), self.relative_position_index, rel_pos_plan(self)

    def _dense_bias(self, shared: SharedRelPos) -> torch.Tensor | None:
        """`[H, N, N]`: this layer's gathered table plus the shared bias (gathered once for all blocks)."""
        if self.relative_position_bias_table is None:
            return shared.bias
        own = gathered_bias(self)
        return own if shared.bias is None else own + shared.bias

    def forward(self, x: torch.Tensor, shared: SharedRelPos) -> torch.Tensor:
        batch, num_tokens, dim = x.shape  # [B, N, C]
        qkv_bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))  # [3C]
        qkv = F.linear(x, self.qkv.weight, qkv_bias)  # [B, N, 3C]
        q, k, v = qkv.view(batch, num_tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, N, D]
        if self.attn_impl == "triton":
            table, index, plan = self._triton_table(shared)
            out = self.triton_attention(q, k, v, table, index, self.scale, plan)  # [B, H, N, D]
        else:
            bias = self._dense_bias(shared)  # [H, N, N] or None
            if self.attn_impl == "sdpa":
                mask = None if bias is None else bias.unsqueeze(0).to(q.dtype)  # [1, H, N, N]
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
            else:
                scores = (q * self.scale) @ k.transpose(-2, -1)  # [B, H, N, N]
                if bias is not None:
                    scores = scores + bias.unsqueeze(0)
                out = scores.softmax(dim=-1) @ v  # [B, H, N, D]
        return self.proj(out.transpose(1, 2).reshape(batch, num_tokens, dim))  # [B, N, C]


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))  # [B, N, C]


class Block(nn.Module):
    """Pre-norm transformer block: `x + drop_path(gamma_1 * attn(norm1(x)))`, same with `gamma_2` and the MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float, layer_scale_init_value: float,
                 attn_impl: str, window_size: tuple[int, int] | None) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(dim, num_heads, attn_impl, window_size)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        if layer_scale_init_value > 0:
            self.gamma_1 = nn.Parameter(torch.full((dim,), float(layer_scale_init_value)))
            self.gamma_2 = nn.Parameter(torch.full((dim,), float(layer_scale_init_value)))
        else:
            self.gamma_1, self.gamma_2 = None, None

    def forward(self, x: torch.Tensor, shared: SharedRelPos = NO_SHARED_REL_POS) -> torch.Tensor:
        attn_out = self.attn(self.norm1(x), shared)  # [B, N, C]
        x = x + self.drop_path(attn_out if self.gamma_1 is None else self.gamma_1 * attn_out)
        mlp_out = self.mlp(self.norm2(x))  # [B, N, C]
        return x + self.drop_path(mlp_out if self.gamma_2 is None else self.gamma_2 * mlp_out)


class BeitEncoder(nn.Module):
    """Embeddings and transformer blocks shared by both BEiT models (heads live in the subclasses)."""

    def __init__(self, *, name: str | None = None, img_size: int | Sequence[int], patch_size: int | Sequence[int],
                 in_chans: int, embed_dim: int, depth: int, num_heads: int, mlp_ratio: float, drop_path_rate: float,
                 layer_scale_init_value: float, use_abs_pos_emb: bool, use_rel_pos_bias: bool,
                 use_shared_rel_pos_bias: bool, attn_impl: str, init_std: float, grad_checkpointing: bool) -> None:
        super().__init__()
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f"unknown attn_impl {attn_impl!r}; choose one of {ATTN_IMPLS}")
        if depth < 1 or num_heads < 1 or embed_dim % num_heads:
            raise ValueError(f"need depth >= 1 and embed_dim divisible by num_heads, got depth={depth}, "
                             f"embed_dim={embed_dim}, num_heads={num_heads}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        self.config = dict(
            name=name, img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, depth=depth,
            num_heads=num_heads, mlp_ratio=mlp_ratio, drop_path_rate=drop_path_rate,
            layer_scale_init_value=layer_scale_init_value, use_abs_pos_emb=use_abs_pos_emb,
            use_rel_pos_bias=use_rel_pos_bias, use_shared_rel_pos_bias=use_shared_rel_pos_bias, attn_impl=attn_impl,
            init_std=init_std, grad_checkpointing=grad_checkpointing,
        )
        self.attn_impl = attn_impl
        self.init_std = init_std
        self.embed_dim = self.num_features = embed_dim
        self.grad_checkpointing = grad_checkpointing
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        window = self.patch_embed.patch_shape
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim)) \
            if use_abs_pos_emb else None
        self.rel_pos_bias = RelativePositionBias(window, num_heads, attn_impl) if use_shared_rel_pos_bias else None
        drop_path_rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # grows linearly with depth
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, rate, layer_scale_init_value, attn_impl,
                  window if use_rel_pos_bias else None)
            for rate in drop_path_rates
        )

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass instead of storing its activations."""
        self.grad_checkpointing = enable

    def get_num_layers(self) -> int:
        return len(self.blocks)

    def no_weight_decay(self) -> set[str]:
        """Parameters the official optimizer factory exempts from weight decay (besides 1-D params and biases)."""
        return {"pos_embed", "cls_token"}

    def init_weights(self, trunc_bound: float, init_conv: bool) -> None:
        """Official init: truncated normal (std `init_std`, cut at ±trunc_bound) for tokens, position embedding and
        Linear weights, zero biases, LayerNorm (1, 0), then `fix_init_weight`."""
        def trunc_normal(tensor: torch.Tensor) -> None:
            nn.init.trunc_normal_(tensor, std=self.init_std, a=-trunc_bound, b=trunc_bound)

        for token in (self.pos_embed, self.cls_token, getattr(self, "mask_token", None)):
            if token is not None:
                with gathered([token]):  # whole where ZeRO-3 has already partitioned it (engine/sharded.py)
                    trunc_normal(token)
        for module in self.modules():
            is_weighted = isinstance(module, nn.Linear) or (init_conv and isinstance(module, nn.Conv2d))
            if not (is_weighted or isinstance(module, nn.LayerNorm)):
                continue
            with gathered(module.parameters(recurse=False)):
                if is_weighted:
                    trunc_normal(module.weight)
                    if module.bias is not None:
                        nn.init.zeros_(module.bias)
                else:
                    nn.init.ones_(module.weight)
                    nn.init.zeros_(module.bias)
        self.fix_init_weight()

    @torch.no_grad()
    def fix_init_weight(self) -> None:
        """Divide the residual output projections of block l (1-indexed) by sqrt(2l)."""
        for layer_id, block in enumerate(self.blocks, start=1):
            with gathered([block.attn.proj.weight, block.mlp.fc2.weight]):
                block.attn.proj.weight.div_(math.sqrt(2.0 * layer_id))
                block.mlp.fc2.weight.div_(math.sqrt(2.0 * layer_id))

    def _shared_rel_pos(self) -> SharedRelPos:
        return NO_SHARED_REL_POS if self.rel_pos_bias is None else self.rel_pos_bias()

    def _run_block(self, block: Block, x: torch.Tensor, shared: SharedRelPos) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, x, shared, use_reentrant=False)
        return block(x, shared)

    def _add_cls_and_pos(self, patches: torch.Tensor) -> torch.Tensor:
        x = torch.cat((self.cls_token.expand(patches.shape[0], -1, -1), patches), dim=1)  # [B, N, C]
        return x if self.pos_embed is None else x + self.pos_embed

    def forward_encoder(self, patches: torch.Tensor) -> torch.Tensor:
        """Patch tokens `[B, L, C]` → CLS + position embedding → all blocks → `[B, N, C]` (before the final norm)."""
        x = self._add_cls_and_pos(patches)  # [B, N, C]
        shared = self._shared_rel_pos()
        for block in self.blocks:
            x = self._run_block(block, x, shared)
        return x

    @torch.no_grad()
    def hidden_states(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Unmasked images → the tokens after each block, `depth` tensors of `[B, N, C]` (CLS first, before any final
        norm): what a linear probe or k-NN reads, layer by layer."""
        x = self._add_cls_and_pos(self.patch_embed(images))  # [B, N, C]
        shared = self._shared_rel_pos()
        states = []
        for block in self.blocks:
            x = block(x, shared)
            states.append(x)
        return states

    def _log_build(self) -> None:
        params = sum(full_numel(p) for p in self.parameters())
        loss = f", mlm_loss={self.config['mlm_loss']}" if "mlm_loss" in self.config else ""
        logger.info("built %s (%s): %.1fM params, attn_impl=%s%s", self.config["name"], type(self).__name__,
                    params / 1e6, self.attn_impl, loss)


class MaskedLMHead(nn.Linear):
    """The LM head `[V, C]` and the masked-token loss it feeds, in one module (parameter names `lm_head.weight/bias`
    as in the official checkpoints).

    `loss_impl` is chosen at build: "fused" (`beit_kernels.masked_lm_loss`: chunked GEMM + cross-entropy, the `[M, V]`
    logits never materialised, no host sync) or "reference" (`beit_kernels.masked_lm_loss_ref`: gathers the masked rows,
    which syncs with the host). `max_masked_per_image` is the masking budget the model is trained with (the masking
    generator never exceeds it): the fused loss then runs its GEMMs on B × that many rows instead of all B × L.
    """

    def __init__(self, dim: int, vocab_size: int, loss_impl: str, max_masked_per_image: int | None) -> None:
        super().__init__(dim, vocab_size)
        if loss_impl not in MLM_LOSSES:
            raise ValueError(f"unknown mlm_loss {loss_impl!r}; choose one of {MLM_LOSSES}")
        self.loss_impl = loss_impl
        self.max_masked_per_image = max_masked_per_image
        self.loss_fn = _resolve_kernel("masked_lm_loss", "mlm_loss='fused'", "mlm_loss='reference'") \
            if loss_impl == "fused" else beit_kernels.masked_lm_loss_ref

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor | None = None):
        """hidden `[B, L, C]`, mask `[B, L]` bool → logits `[M, V]` of the masked patches (row-major) when `labels` is
        None, else (mean cross-entropy over masked patches, accuracy of the argmax token); labels `[B, L]`."""
        if labels is None:
            return F.linear(hidden[mask], self.weight, self.bias)  # [M, V]
        max_masked = None if self.max_masked_per_image is None else mask.shape[0] * self.max_masked_per_image
        return self.loss_fn(hidden, mask, self.weight, self.bias, labels, max_masked)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, loss={self.loss_impl}, max_masked_per_image={self.max_masked_per_image}"


class BeitForMaskedImageModeling(BeitEncoder):
    """BEiT pretraining model: predict the visual token of every masked patch.

    `model(images, bool_masked_pos)` → logits `[M, V]` of the masked patches in row-major (batch, patch) order;
    `model(images, bool_masked_pos, labels)` → (loss, accuracy) through `MaskedLMHead`.
    """

    def __init__(self, *, vocab_size: int = 8192, mlm_loss: str = "reference", max_masked_per_image: int | None = None,
                 **encoder_kwargs) -> None:
        super().__init__(**encoder_kwargs)
        self.config.update(vocab_size=vocab_size, mlm_loss=mlm_loss, max_masked_per_image=max_masked_per_image)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
        self.norm = nn.LayerNorm(self.embed_dim, eps=LAYER_NORM_EPS)
        self.lm_head = MaskedLMHead(self.embed_dim, vocab_size, mlm_loss, max_masked_per_image)
        self.init_weights(trunc_bound=self.init_std, init_conv=True)  # pretraining truncates at ±std
        self._log_build()

    def _flat_mask(self, bool_masked_pos: torch.Tensor, batch: int) -> torch.Tensor:
        """Accept `[B, L]` or `[B, h, w]` masks; return `[B, L]` bool."""
        expected_2d = (batch, self.patch_embed.num_patches)
        expected_3d = (batch, *self.patch_embed.patch_shape)
        if tuple(bool_masked_pos.shape) not in (expected_2d, expected_3d):
            raise ValueError(f"bool_masked_pos must have shape {list(expected_2d)} or {list(expected_3d)}, "
                             f"got {list(bool_masked_pos.shape)}")
        return bool_masked_pos.reshape(expected_2d).bool()

    def forward_features(self, images: torch.Tensor, bool_masked_pos: torch.Tensor) -> torch.Tensor:
        """Images `[B, 3, H_img, W_img]`, mask `[B, L]` → normed patch tokens `[B, L, C]` (CLS dropped)."""
        patches = self.patch_embed(images)  # [B, L, C]
        mask = self._flat_mask(bool_masked_pos, patches.shape[0])
        w = mask.unsqueeze(-1).type_as(patches)  # [B, L, 1]
        patches = patches * (1 - w) + self.mask_token * w  # masked patches become the learned mask token
        return self.norm(self.forward_encoder(patches))[:, 1:]  # [B, L, C]

    def forward(self, images: torch.Tensor, bool_masked_pos: torch.Tensor, labels: torch.Tensor | None = None):
        """Without labels: visual-token logits of the masked patches `[M, V]`, row-major over (batch, patch).

        With labels `[B, L]` (or `[B, h, w]`) visual-token ids, read only at masked positions: (mean cross-entropy
        over masked patches, accuracy of the argmax token). No masked patch gives a loss of 0, never NaN.
        """
        hidden = self.forward_features(images, bool_masked_pos)  # [B, L, C]
        mask = self._flat_mask(bool_masked_pos, hidden.shape[0])
        if labels is None:
            return self.lm_head(hidden, mask)  # [M, V]
        if labels.numel() != mask.numel() or labels.shape[0] != mask.shape[0]:
            raise ValueError(f"labels must have one token id per patch, shape {list(mask.shape)}, "
                             f"got {list(labels.shape)}")
        return self.lm_head(hidden, mask, labels.reshape(mask.shape))


class BeitForImageClassification(BeitEncoder):
    """BEiT fine-tuning model: `model(images)` → class logits `[B, K]`."""

    def __init__(self, *, num_classes: int = 1000, use_mean_pooling: bool = True, **encoder_kwargs) -> None:
        super().__init__(**encoder_kwargs)
        self.config.update(num_classes=num_classes, use_mean_pooling=use_mean_pooling)
        self.num_classes = num_classes
        self.norm = nn.Identity() if use_mean_pooling else nn.LayerNorm(self.embed_dim, eps=LAYER_NORM_EPS)
        self.fc_norm = nn.LayerNorm(self.embed_dim, eps=LAYER_NORM_EPS) if use_mean_pooling else None
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights(trunc_bound=2.0, init_conv=False)  # fine-tuning: timm's default cut at ±2
        if isinstance(self.head, nn.Linear):
            with torch.no_grad(), gathered(self.head.parameters()):
                self.head.weight.mul_(HEAD_INIT_SCALE)
                self.head.bias.mul_(HEAD_INIT_SCALE)
        self._log_build()

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """Images → pooled features `[B, C]`: mean of patch tokens + `fc_norm`, or the normed CLS token."""
        x = self.norm(self.forward_encoder(self.patch_embed(images)))  # [B, N, C]
        if self.fc_norm is not None:
            return self.fc_norm(x[:, 1:].mean(dim=1))
        return x[:, 0]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(images))  # [B, K]

    def forward_intermediates(self, images: torch.Tensor, indices: Sequence[int]) -> list[torch.Tensor]:
        """Feature maps `[B, C, h, w]` after the blocks in `indices` (0-based, negative from the end; as given),
        for dense heads (the official segmentation backbone uses blocks 3, 5, 7, 11 of BEiT-B)."""
        depth = len(self.blocks)
        wanted = [int(i) + depth if int(i) < 0 else int(i) for i in indices]
        if not wanted or not all(0 <= i < depth for i in wanted):
            raise ValueError(f"indices must be a non-empty list of block indices in [-{depth}, {depth}), "
                             f"got {list(indices)}")
        x = self._add_cls_and_pos(self.patch_embed(images))  # [B, N, C]
        shared = self._shared_rel_pos()
        height, width = self.patch_embed.patch_shape
        features = {}
        for layer, block in enumerate(self.blocks[: max(wanted) + 1]):
            x = self._run_block(block, x, shared)
            if layer in wanted:
                features[layer] = x[:, 1:].transpose(1, 2).reshape(x.shape[0], -1, height, width)  # [B, C, h, w]
        return [features[i] for i in wanted]
