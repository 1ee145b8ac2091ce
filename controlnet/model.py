"""The ControlNet module: a trainable copy of the SD UNet encoder plus zero convolutions.

Zhang, Rao, Agrawala, "Adding Conditional Control to Text-to-Image Diffusion Models", arXiv 2302.05543.
The module and parameter names mirror the original ldm code (and ComfyUI's ``comfy/cldm/cldm.py``) so
that checkpoints load without renaming and the numbers match ComfyUI's built-in ControlNet.

ControlNet Union / ProMax (xinsir6/ControlNetPlus ``models/controlnet_union.py``; diffusers
``ControlNetUnionModel``) is the same encoder plus a condition-fusion stage in front of it; its modules
carry ComfyUI's names (``task_embedding``, ``control_add_embedding``, ``transformer_layes``,
``spatial_ch_projs``).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from .checks import check_int
from .config import ControlNetConfig
from .errors import ControlNetError
from .ops import Operations, TorchOperations
from .union import UNION_TYPE_NAMES, union_type_label


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding [cos | sin] computed in float32, as ldm / ComfyUI do."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class ResBlock(nn.Module):
    """ldm ResBlock (no scale-shift norm, no up/down sampling): the only kind SD ControlNets use."""

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        out_channels: int | None = None,
        ops: Operations = TorchOperations,
    ) -> None:
        super().__init__()
        out = out_channels or channels
        self.in_layers = nn.Sequential(
            ops.GroupNorm(32, channels), nn.SiLU(), ops.Conv2d(channels, out, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), ops.Linear(emb_channels, out))
        # The Dropout keeps ldm's indices (out_layers.3 is the conv); it is inactive at inference.
        self.out_layers = nn.Sequential(
            ops.GroupNorm(32, out), nn.SiLU(), nn.Dropout(0.0), ops.Conv2d(out, out, 3, padding=1)
        )
        self.skip_connection = nn.Identity() if out == channels else ops.Conv2d(channels, out, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    def __init__(self, channels: int, ops: Operations = TorchOperations) -> None:
        super().__init__()
        self.op = ops.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class CrossAttention(nn.Module):
    """Multi-head attention on PyTorch's scaled-dot-product attention (self-attention when context is None)."""

    def __init__(
        self,
        query_dim: int,
        heads: int,
        dim_head: int,
        context_dim: int | None = None,
        ops: Operations = TorchOperations,
    ) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = ops.Linear(query_dim, inner, bias=False)
        self.to_k = ops.Linear(context_dim or query_dim, inner, bias=False)
        self.to_v = ops.Linear(context_dim or query_dim, inner, bias=False)
        self.to_out = nn.Sequential(ops.Linear(inner, query_dim), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        b = x.shape[0]
        q, k, v = (
            t.view(b, -1, self.heads, t.shape[-1] // self.heads).transpose(1, 2)
            for t in (self.to_q(x), self.to_k(context), self.to_v(context))
        )
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, -1, q.shape[1] * q.shape[3]))


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int, ops: Operations = TorchOperations) -> None:
        super().__init__()
        self.proj = ops.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class BasicTransformerBlock(nn.Module):
    def __init__(
        self, dim: int, heads: int, dim_head: int, context_dim: int, ops: Operations = TorchOperations
    ) -> None:
        super().__init__()
        self.attn1 = CrossAttention(dim, heads, dim_head, ops=ops)
        self.ff = nn.Module()
        self.ff.net = nn.Sequential(GEGLU(dim, dim * 4, ops), nn.Dropout(0.0), ops.Linear(dim * 4, dim))
        self.attn2 = CrossAttention(dim, heads, dim_head, context_dim, ops)
        self.norm1, self.norm2, self.norm3 = ops.LayerNorm(dim), ops.LayerNorm(dim), ops.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff.net(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """Image-to-sequence transformer; SD2.x / SDXL project with Linear, SD1.x with 1x1 convs."""

    def __init__(
        self,
        channels: int,
        heads: int,
        dim_head: int,
        depth: int,
        context_dim: int,
        use_linear: bool,
        ops: Operations = TorchOperations,
    ):
        super().__init__()
        inner = heads * dim_head
        self.use_linear = use_linear
        self.norm = ops.GroupNorm(32, channels, eps=1e-6)
        self.proj_in = ops.Linear(channels, inner) if use_linear else ops.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim, ops) for _ in range(depth)
        )
        self.proj_out = ops.Linear(inner, channels) if use_linear else ops.Conv2d(inner, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        x_in = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        x = x.movedim(1, 3).flatten(1, 2)
        if self.use_linear:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context)
        if self.use_linear:
            x = self.proj_out(x)
        x = x.reshape(b, h, w, -1).movedim(3, 1)
        if not self.use_linear:
            x = self.proj_out(x)
        return x + x_in


class TimestepEmbedSequential(nn.Sequential):
    """ldm's Sequential that hands the time embedding to ResBlocks and the context to transformers."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


def _zero_conv(channels: int, ops: Operations) -> TimestepEmbedSequential:
    # "Zero convolution" (paper section 3.1): a 1x1 conv initialised to zero, so an untrained ControlNet
    # adds exactly nothing to the frozen UNet.
    conv = ops.Conv2d(channels, channels, 1)
    if conv.weight.device.type != "meta":
        nn.init.zeros_(conv.weight)
        nn.init.zeros_(conv.bias)
    return TimestepEmbedSequential(conv)


class UnionAttention(nn.Module):
    """Self-attention with one packed q/k/v projection (``in_proj``), as torch's nn.MultiheadAttention
    (xinsir, diffusers) and ComfyUI's ``OptimizedAttention``: attends over dim 1 of a B x N x C input."""

    def __init__(self, dim: int, heads: int, ops: Operations = TorchOperations) -> None:
        super().__init__()
        self.heads = heads
        self.in_proj = ops.Linear(dim, 3 * dim)
        self.out_proj = ops.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = (t.view(b, n, self.heads, -1).transpose(1, 2) for t in self.in_proj(x).chunk(3, dim=-1))
        return self.out_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class QuickGELU(nn.Module):
    """CLIP's GELU approximation x * sigmoid(1.702 x), used by the Union fusion MLP."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class UnionTransformerLayer(nn.Module):
    """One pre-norm block of the Union fusion transformer (ComfyUI's ``ResBlockUnionControlnet``, CLIP's
    ``ResidualAttentionBlock``): x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, dim: int, heads: int, ops: Operations = TorchOperations) -> None:
        super().__init__()
        self.attn = UnionAttention(dim, heads, ops)
        self.ln_1 = ops.LayerNorm(dim)
        self.mlp = nn.Sequential(
            OrderedDict(c_fc=ops.Linear(dim, 4 * dim), gelu=QuickGELU(), c_proj=ops.Linear(4 * dim, dim))
        )
        self.ln_2 = ops.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class ControlAddEmbedding(nn.Module):
    """Union's control-type embedding: the 0/1 type vector, each entry sinusoid-embedded and flattened,
    through Linear-SiLU-Linear (diffusers ``control_type_proj`` + ``control_add_embedding``)."""

    def __init__(
        self, type_dim: int, num_types: int, out_dim: int, ops: Operations = TorchOperations
    ) -> None:
        super().__init__()
        self.type_dim, self.num_types = type_dim, num_types
        self.linear_1 = ops.Linear(type_dim * num_types, out_dim)
        self.linear_2 = ops.Linear(out_dim, out_dim)

    def forward(self, types: list[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        # The result depends only on the types and the weights: computed once and reused, which also keeps the
        # host -> device copy of the type vector out of CUDA-graph capture (where it is not allowed).
        # Keyed by the weights' storage too (loading new weights gives new storage); not by `_version`, which
        # inference tensors (ComfyUI loads models under inference_mode) do not track.
        key = (
            tuple(types),
            dtype,
            str(device),
            self.linear_1.weight.data_ptr(),
            self.linear_2.weight.data_ptr(),
        )
        cache = self.__dict__.setdefault("_cache", {})
        hit = None if torch.is_grad_enabled() else cache.get(key)
        if hit is None:
            vec = torch.zeros(self.num_types)
            vec[types] = 1.0
            e = timestep_embedding(vec.to(device), self.type_dim).to(dtype).reshape(1, -1)
            hit = self.linear_2(F.silu(self.linear_1(e)))
            if not torch.is_grad_enabled():
                if len(cache) >= 64:  # a handful of type sets per model in practice; never grow without bound
                    cache.clear()
                cache[key] = hit
        return hit


class ControlNet(nn.Module):
    """ControlNet for SD1.x / SD2.x / SDXL (arXiv 2302.05543), ldm parameter layout.

    ``forward`` returns one residual per encoder block (shallow -> deep) and the middle one last, for the
    frozen UNet to add to its skip connections and its middle block output. With
    ``config.union_num_control_types`` set it is a ControlNet Union / ProMax (``kind == "union"``).
    """

    injection = "output"  # control-module protocol: residuals go to the UNet's skips and middle block

    compute_dtype: torch.dtype | None = None
    """Set by a host whose operations cast per layer: inputs are cast to it, weights stay in their storage dtype."""

    gradient_checkpointing: bool = False
    """Training only: recompute each encoder block in the backward pass instead of keeping its activations."""

    def __init__(
        self, config: ControlNetConfig, name: str = "ControlNet", operations: Operations = TorchOperations
    ) -> None:
        super().__init__()
        ops = operations
        self.config = config
        self.name = name
        self.global_average_pooling = False  # shuffle ControlNets; applied by the residual stack
        mc, ted = config.model_channels, config.time_embed_dim

        self.time_embed = nn.Sequential(ops.Linear(mc, ted), nn.SiLU(), ops.Linear(ted, ted))
        if config.adm_in_channels is not None:
            self.label_emb = nn.Sequential(
                nn.Sequential(ops.Linear(config.adm_in_channels, ted), nn.SiLU(), ops.Linear(ted, ted))
            )

        # Hint encoder: 8 3x3 convs, pixel space -> latent grid, last one zero-initialised.
        widths = (config.hint_channels, *config.hint_widths, mc)
        layers: list[nn.Module] = []
        for i in range(len(widths) - 1):
            stride = 2 if i in (2, 4, 6) else 1
            layers += [ops.Conv2d(widths[i], widths[i + 1], 3, padding=1, stride=stride), nn.SiLU()]
        self.input_hint_block = TimestepEmbedSequential(*layers[:-1])
        if layers[-2].weight.device.type != "meta":
            nn.init.zeros_(layers[-2].weight)
            nn.init.zeros_(layers[-2].bias)

        blocks = [TimestepEmbedSequential(ops.Conv2d(config.in_channels, mc, 3, padding=1))]
        zero_convs = [_zero_conv(mc, ops)]
        depths = iter(config.transformer_depth)
        ch = mc
        for level, (mult, n_res) in enumerate(zip(config.channel_mult, config.num_res_blocks, strict=True)):
            for _ in range(n_res):
                block: list[nn.Module] = [ResBlock(ch, ted, mult * mc, ops)]
                ch = mult * mc
                if (depth := next(depths)) > 0:
                    block.append(
                        SpatialTransformer(
                            ch, *config.heads(ch), depth, config.context_dim, config.use_linear, ops
                        )
                    )
                blocks.append(TimestepEmbedSequential(*block))
                zero_convs.append(_zero_conv(ch, ops))
            if level != len(config.channel_mult) - 1:
                blocks.append(TimestepEmbedSequential(Downsample(ch, ops)))
                zero_convs.append(_zero_conv(ch, ops))
        self.input_blocks = nn.ModuleList(blocks)
        self.zero_convs = nn.ModuleList(zero_convs)

        middle: list[nn.Module] = [ResBlock(ch, ted, ops=ops)]
        if config.transformer_depth_middle >= 0:
            middle += [
                SpatialTransformer(
                    ch,
                    *config.heads(ch),
                    config.transformer_depth_middle,
                    config.context_dim,
                    config.use_linear,
                    ops,
                ),
                ResBlock(ch, ted, ops=ops),
            ]
        self.middle_block = TimestepEmbedSequential(*middle)
        self.middle_block_out = _zero_conv(ch, ops)

        if config.union_num_control_types is not None:
            # Fusion tokens are hint features, so everything is model_channels wide (xinsir: 320).
            n = config.union_num_control_types
            self.task_embedding = nn.Parameter(torch.empty(n, mc))
            self.transformer_layes = nn.Sequential(  # sic: the published files' spelling
                *(
                    UnionTransformerLayer(mc, config.union_num_heads, ops)
                    for _ in range(config.union_num_layers)
                )
            )
            self.spatial_ch_projs = ops.Linear(mc, mc)
            self.control_add_embedding = ControlAddEmbedding(config.union_type_embed_dim, n, ted, ops)
            if self.task_embedding.device.type != "meta":
                nn.init.normal_(self.task_embedding, std=mc**0.5)  # diffusers' init: sqrt(C) * randn

    @property
    def kind(self) -> str:
        return "union" if self.config.union_num_control_types is not None else "controlnet"

    @property
    def family(self) -> str:
        return self.config.family

    @property
    def num_residuals(self) -> int:
        return self.config.num_residuals

    @property
    def dtype(self) -> torch.dtype:
        """The dtype this module computes in (its weights' unless a host set ``compute_dtype``)."""
        return self.compute_dtype or self.time_embed[0].weight.dtype

    def _bad(self, what: str) -> ControlNetError:
        return ControlNetError(f"{self.name}: {what}")

    def encode_hint(self, hint: torch.Tensor) -> torch.Tensor:
        """Hint B x 3 x H x W (RGB in [0, 1], H, W = 8 x latent) -> B x model_channels x H/8 x W/8.

        Callable on its own so a sampler can encode a constant hint once per run.
        """
        c = self.config.hint_channels
        if hint.ndim != 4 or hint.shape[1] != c:
            raise self._bad(
                f"hint must have {c} channels (B x {c} x H x W, RGB in [0, 1]), got shape {tuple(hint.shape)}"
            )
        if hint.shape[2] % 8 or hint.shape[3] % 8:
            raise self._bad(f"hint height and width must be multiples of 8, got {tuple(hint.shape[2:])}")
        return self.input_hint_block(hint.to(self.dtype), None, None)

    def forward(
        self,
        x: torch.Tensor,
        hint: torch.Tensor | Sequence[torch.Tensor] | None,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        y: torch.Tensor | None = None,
        *,
        encoded_hint: torch.Tensor | Sequence[torch.Tensor] | None = None,
        control_types: Sequence[int] | None = None,
        condition_scales: Sequence[float] | None = None,
        latent_token: bool = True,
    ) -> list[torch.Tensor]:
        """Residuals for the UNet, shallow -> deep, middle last, in ``x``'s dtype.

        ``timesteps`` are UNet timesteps (0..999, float); ``y`` is SDXL's adm vector. When
        ``encoded_hint`` (from :meth:`encode_hint`) is given, ``hint`` is ignored.

        Union / ProMax models only (``kind == "union"``):

        - ``control_types``: one type id (see :data:`.union.UNION_TYPES`) per condition; ``hint`` /
          ``encoded_hint`` is then a list with one hint per condition (a bare tensor is one condition).
          ``None`` or ``[]`` is ComfyUI's "auto": a zero type vector and the plain encoded hint, no fusion.
        - ``condition_scales``: per-condition strengths, used only with several conditions, inside the
          fusion exactly like diffusers' ``ControlNetUnionModel`` without ``from_multi`` (features,
          conditions and fusion offsets scaled). With one condition they are ignored: the caller scales the
          residuals (as diffusers and ComfyUI do). Residuals are never scaled here.
        - ``latent_token=True``: the reference maths (xinsir6/ControlNetPlus, diffusers): the noisy latent's
          mean feature after conv_in is appended as a token, and the fusion transformer runs the way
          their non-batch-first ``nn.MultiheadAttention`` does, attending over the batch axis for each
          token position. ``False``: ComfyUI's built-in maths (``union_controlnet_merge``): no latent
          token, attention over each sample's condition tokens (ComfyUI itself uses one condition).
        """
        cfg, dtype, out_dtype = self.config, self.dtype, x.dtype
        # 1. Check the inputs: broadcasting hints over the batch is the stack's job, not ours.
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise self._bad(f"latent must be B x {cfg.in_channels} x h x w, got {tuple(x.shape)}")
        b, _, h, w = x.shape
        types = self._check_types(control_types)
        n_cond = max(1, len(types))
        if encoded_hint is None:
            if hint is None:
                raise self._bad("forward needs a hint or an encoded_hint")
            hints = list(hint) if isinstance(hint, (list, tuple)) else [hint]
            self._check_count(len(hints), n_cond, "hint")
            for one in hints:
                if one.ndim != 4 or one.shape[0] != b or tuple(one.shape[2:]) != (8 * h, 8 * w):
                    raise self._bad(
                        f"hint shape {tuple(one.shape)} does not fit latent {tuple(x.shape)}: expected "
                        f"{b} x {cfg.hint_channels} x {8 * h} x {8 * w} (8 x latent, same batch)"
                    )
            encoded = [self.encode_hint(one) for one in hints]
        else:
            encoded = list(encoded_hint) if isinstance(encoded_hint, (list, tuple)) else [encoded_hint]
            self._check_count(len(encoded), n_cond, "encoded_hint")
            for one in encoded:
                if tuple(one.shape) != (b, cfg.model_channels, h, w):
                    raise self._bad(
                        f"encoded_hint shape {tuple(one.shape)} does not fit latent {tuple(x.shape)}: "
                        f"expected {(b, cfg.model_channels, h, w)}"
                    )
        scales = [1.0] * n_cond if condition_scales is None else [float(s) for s in condition_scales]
        if len(types) > 1 and len(scales) != n_cond:
            raise self._bad(f"{n_cond} control types need {n_cond} condition_scales, got {len(scales)}")
        if context.ndim != 3 or context.shape[-1] != cfg.context_dim:
            raise self._bad(f"context must be B x tokens x {cfg.context_dim}, got {tuple(context.shape)}")
        if (y is None) != (cfg.adm_in_channels is None):
            raise self._bad("SDXL ControlNets need y (the adm vector); SD1.x/2.x ones take none")
        timesteps = torch.as_tensor(timesteps, device=x.device).reshape(-1).expand(b)

        # 2. Time (Union: control type, SDXL: label) embedding; ComfyUI and diffusers add in this order.
        emb = self.time_embed(timestep_embedding(timesteps, cfg.model_channels).to(dtype))
        if self.kind == "union":
            emb = emb + self.control_add_embedding(types, dtype, x.device)
        if y is not None:
            emb = emb + self.label_emb(y.to(dtype))

        # 3. Encoder copy; the (fused) hint is added once, right after conv_in (input_blocks[0]).
        x, context = x.to(dtype), context.to(dtype)
        encoded = [e.to(dtype) for e in encoded]
        residuals = []
        for i, (block, zero_conv) in enumerate(zip(self.input_blocks, self.zero_convs, strict=True)):
            x = self._run(block, x, emb, context)
            if i == 0:
                if types:
                    x = x + self._fuse(encoded, types, scales, x, latent_token, over_batch=latent_token)
                else:
                    x = x + encoded[0]
            residuals.append(zero_conv(x, emb, context).to(out_dtype))

        # 4. Middle block and its zero conv.
        x = self._run(self.middle_block, x, emb, context)
        residuals.append(self.middle_block_out(x, emb, context).to(out_dtype))
        return residuals

    def _run(
        self, block: nn.Module, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor
    ) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled() and self.training:
            return torch.utils.checkpoint.checkpoint(block, x, emb, context, use_reentrant=False)
        return block(x, emb, context)

    def _check_types(self, control_types: Sequence[int] | None) -> list[int]:
        types = [] if control_types is None else list(control_types)
        if self.kind != "union":
            if types:
                raise self._bad(
                    f"control types {types} only apply to ControlNet Union / ProMax models; this is a classic "
                    "ControlNet (no task_embedding)"
                )
            return types
        n = self.config.union_num_control_types
        for t in types:
            t = check_int(f"{self.name}: control type id", t, 0)
            if t >= n:
                if t in UNION_TYPE_NAMES and t >= 6:  # tile / repaint: ProMax-only
                    need = f"needs a ProMax file with {len(UNION_TYPE_NAMES)} control types"
                else:
                    need = "is out of range"
                raise self._bad(f"{union_type_label(t)} {need}; this file has {n} (ids 0..{n - 1})")
        return types

    def _check_count(self, got: int, want: int, what: str) -> None:
        if got != want:
            n = f"{want} control types" if self.kind == "union" and want > 1 else "this forward"
            raise self._bad(f"{n} need(s) {want} {what}(s), got {got}")

    def _fuse(
        self,
        conditions: list[torch.Tensor],
        types: list[int],
        scales: list[float],
        latent: torch.Tensor,
        latent_token: bool,
        over_batch: bool,
    ) -> torch.Tensor:
        """Union condition fusion: what is added to ``h`` after conv_in.

        xinsir6/ControlNetPlus ``ControlNetModel_Union.forward`` section 2 / diffusers
        ``ControlNetUnionModel.forward`` "pre-process", and ComfyUI's ``union_controlnet_merge``. Each
        condition becomes one token (its mean feature plus its type's task embedding); the fusion transformer
        mixes them and ``spatial_ch_projs`` turns each condition's token into a per-channel offset.
        ``over_batch``: attend over dim 0 like the reference's non-batch-first ``nn.MultiheadAttention``
        (each token position separately); otherwise over each sample's tokens (ComfyUI).
        """
        multi = len(conditions) > 1  # one condition: the caller scales the residuals instead
        feats, conds = [], []
        for cond, t, s in zip(conditions, types, scales, strict=True):
            feat = cond.mean(dim=(2, 3)) + self.task_embedding[t].to(device=cond.device, dtype=cond.dtype)
            feats.append(feat * s if multi else feat)
            conds.append(cond * s if multi else cond)
        if latent_token:
            feats.append(latent.mean(dim=(2, 3)))
        tokens = torch.stack(feats, dim=1)  # B x N x C
        if over_batch:
            tokens = self.transformer_layes(tokens.transpose(0, 1)).transpose(0, 1)
        else:
            tokens = self.transformer_layes(tokens)
        fused = torch.zeros_like(latent)
        for i, (cond, s) in enumerate(zip(conds, scales, strict=True)):
            alpha = self.spatial_ch_projs(tokens[:, i])[:, :, None, None]
            fused = fused + cond + (alpha * s if multi else alpha)
        return fused


def build_controlnet(
    config: ControlNetConfig,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    name: str = "ControlNet",
    operations: Operations | None = None,
) -> ControlNet:
    """A ControlNet with fresh weights (zero convs zero, as in training) or, on ``device="meta"``,
    an empty shell for ``load_state_dict(assign=True)``. ``operations``: the layer classes (see ``ops.py``)."""
    with torch.device(device or "cpu"):
        model = ControlNet(config, name=name, operations=operations or TorchOperations)
    if dtype is not None:
        model.to(dtype)
    return model.eval().requires_grad_(False)
