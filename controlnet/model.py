"""The ControlNet module: a trainable copy of the SD UNet encoder plus zero convolutions.

Zhang, Rao, Agrawala, "Adding Conditional Control to Text-to-Image Diffusion Models", arXiv 2302.05543.
The module and parameter names mirror the original ldm code (and ComfyUI's ``comfy/cldm/cldm.py``) so
that checkpoints load without renaming and the numbers match ComfyUI's built-in ControlNet.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ControlNetConfig
from .errors import ControlNetError

HINT_CHANNELS = (16, 16, 32, 32, 96, 96, 256)  # input_hint_block conv widths; every 2nd one strides by 2


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

    def __init__(self, channels: int, emb_channels: int, out_channels: int | None = None) -> None:
        super().__init__()
        out = out_channels or channels
        self.in_layers = nn.Sequential(
            nn.GroupNorm(32, channels), nn.SiLU(), nn.Conv2d(channels, out, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out))
        # The Dropout keeps ldm's indices (out_layers.3 is the conv); it is inactive at inference.
        self.out_layers = nn.Sequential(
            nn.GroupNorm(32, out), nn.SiLU(), nn.Dropout(0.0), nn.Conv2d(out, out, 3, padding=1)
        )
        self.skip_connection = nn.Identity() if out == channels else nn.Conv2d(channels, out, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class CrossAttention(nn.Module):
    """Multi-head attention on PyTorch's scaled-dot-product attention (self-attention when context is None)."""

    def __init__(self, query_dim: int, heads: int, dim_head: int, context_dim: int | None = None) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))

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
    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int) -> None:
        super().__init__()
        self.attn1 = CrossAttention(dim, heads, dim_head)
        self.ff = nn.Module()
        self.ff.net = nn.Sequential(GEGLU(dim, dim * 4), nn.Dropout(0.0), nn.Linear(dim * 4, dim))
        self.attn2 = CrossAttention(dim, heads, dim_head, context_dim)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff.net(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """Image-to-sequence transformer; SD2.x / SDXL project with Linear, SD1.x with 1x1 convs."""

    def __init__(
        self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int, use_linear: bool
    ):
        super().__init__()
        inner = heads * dim_head
        self.use_linear = use_linear
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner) if use_linear else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim) for _ in range(depth)
        )
        self.proj_out = nn.Linear(inner, channels) if use_linear else nn.Conv2d(inner, channels, 1)

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


def _zero_conv(channels: int) -> TimestepEmbedSequential:
    # "Zero convolution" (paper section 3.1): a 1x1 conv initialised to zero, so an untrained ControlNet
    # adds exactly nothing to the frozen UNet.
    conv = nn.Conv2d(channels, channels, 1)
    if conv.weight.device.type != "meta":
        nn.init.zeros_(conv.weight)
        nn.init.zeros_(conv.bias)
    return TimestepEmbedSequential(conv)


class ControlNet(nn.Module):
    """ControlNet for SD1.x / SD2.x / SDXL (arXiv 2302.05543), ldm parameter layout.

    ``forward`` returns one residual per encoder block (shallow -> deep) and the middle one last, for the
    frozen UNet to add to its skip connections and its middle block output.
    """

    def __init__(self, config: ControlNetConfig, name: str = "ControlNet") -> None:
        super().__init__()
        self.config = config
        self.name = name
        self.global_average_pooling = False  # shuffle ControlNets; applied by the residual stack
        mc, ted = config.model_channels, config.time_embed_dim

        self.time_embed = nn.Sequential(nn.Linear(mc, ted), nn.SiLU(), nn.Linear(ted, ted))
        if config.adm_in_channels is not None:
            self.label_emb = nn.Sequential(
                nn.Sequential(nn.Linear(config.adm_in_channels, ted), nn.SiLU(), nn.Linear(ted, ted))
            )

        # Hint encoder: 8 3x3 convs, pixel space -> latent grid, last one zero-initialised.
        widths = (config.hint_channels, *HINT_CHANNELS, mc)
        layers: list[nn.Module] = []
        for i in range(len(widths) - 1):
            stride = 2 if i in (2, 4, 6) else 1
            layers += [nn.Conv2d(widths[i], widths[i + 1], 3, padding=1, stride=stride), nn.SiLU()]
        self.input_hint_block = TimestepEmbedSequential(*layers[:-1])
        if layers[-2].weight.device.type != "meta":
            nn.init.zeros_(layers[-2].weight)
            nn.init.zeros_(layers[-2].bias)

        blocks = [TimestepEmbedSequential(nn.Conv2d(config.in_channels, mc, 3, padding=1))]
        zero_convs = [_zero_conv(mc)]
        depths = iter(config.transformer_depth)
        ch = mc
        for level, (mult, n_res) in enumerate(zip(config.channel_mult, config.num_res_blocks, strict=True)):
            for _ in range(n_res):
                block: list[nn.Module] = [ResBlock(ch, ted, mult * mc)]
                ch = mult * mc
                if (depth := next(depths)) > 0:
                    block.append(
                        SpatialTransformer(
                            ch, *config.heads(ch), depth, config.context_dim, config.use_linear
                        )
                    )
                blocks.append(TimestepEmbedSequential(*block))
                zero_convs.append(_zero_conv(ch))
            if level != len(config.channel_mult) - 1:
                blocks.append(TimestepEmbedSequential(Downsample(ch)))
                zero_convs.append(_zero_conv(ch))
        self.input_blocks = nn.ModuleList(blocks)
        self.zero_convs = nn.ModuleList(zero_convs)

        middle: list[nn.Module] = [ResBlock(ch, ted)]
        if config.transformer_depth_middle >= 0:
            middle += [
                SpatialTransformer(
                    ch,
                    *config.heads(ch),
                    config.transformer_depth_middle,
                    config.context_dim,
                    config.use_linear,
                ),
                ResBlock(ch, ted),
            ]
        self.middle_block = TimestepEmbedSequential(*middle)
        self.middle_block_out = _zero_conv(ch)

    @property
    def family(self) -> str:
        return self.config.family

    @property
    def num_residuals(self) -> int:
        return self.config.num_residuals

    @property
    def dtype(self) -> torch.dtype:
        return self.time_embed[0].weight.dtype

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
        hint: torch.Tensor | None,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        y: torch.Tensor | None = None,
        *,
        encoded_hint: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """Residuals for the UNet, shallow -> deep, middle last, in ``x``'s dtype.

        ``timesteps`` are UNet timesteps (0..999, float); ``y`` is SDXL's adm vector. When
        ``encoded_hint`` (from :meth:`encode_hint`) is given, ``hint`` is ignored.
        """
        cfg, dtype, out_dtype = self.config, self.dtype, x.dtype
        b, _, h, w = x.shape
        # 1. Check the inputs: broadcasting hints over the batch is the stack's job, not ours.
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise self._bad(f"latent must be B x {cfg.in_channels} x h x w, got {tuple(x.shape)}")
        if encoded_hint is None:
            if hint is None:
                raise self._bad("forward needs a hint or an encoded_hint")
            if hint.shape[0] != b or tuple(hint.shape[2:]) != (8 * h, 8 * w):
                raise self._bad(
                    f"hint shape {tuple(hint.shape)} does not fit latent {tuple(x.shape)}: expected "
                    f"{b} x {cfg.hint_channels} x {8 * h} x {8 * w} (8 x latent, same batch)"
                )
            encoded_hint = self.encode_hint(hint)
        elif tuple(encoded_hint.shape) != (b, cfg.model_channels, h, w):
            raise self._bad(
                f"encoded_hint shape {tuple(encoded_hint.shape)} does not fit latent {tuple(x.shape)}: "
                f"expected {(b, cfg.model_channels, h, w)}"
            )
        if context.ndim != 3 or context.shape[-1] != cfg.context_dim:
            raise self._bad(f"context must be B x tokens x {cfg.context_dim}, got {tuple(context.shape)}")
        if (y is None) != (cfg.adm_in_channels is None):
            raise self._bad("SDXL ControlNets need y (the adm vector); SD1.x/2.x ones take none")
        timesteps = torch.as_tensor(timesteps, device=x.device).reshape(-1).expand(b)

        # 2. Time (and SDXL label) embedding.
        emb = self.time_embed(timestep_embedding(timesteps, cfg.model_channels).to(dtype))
        if y is not None:
            emb = emb + self.label_emb(y.to(dtype))

        # 3. Encoder copy; the encoded hint is added once, right after conv_in (input_blocks[0]).
        x, context, encoded_hint = x.to(dtype), context.to(dtype), encoded_hint.to(dtype)
        residuals = []
        for i, (block, zero_conv) in enumerate(zip(self.input_blocks, self.zero_convs, strict=True)):
            x = block(x, emb, context)
            if i == 0:
                x = x + encoded_hint
            residuals.append(zero_conv(x, emb, context).to(out_dtype))

        # 4. Middle block and its zero conv.
        x = self.middle_block(x, emb, context)
        residuals.append(self.middle_block_out(x, emb, context).to(out_dtype))
        return residuals


def build_controlnet(
    config: ControlNetConfig,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    name: str = "ControlNet",
) -> ControlNet:
    """A ControlNet with fresh weights (zero convs zero, as in training) or, on ``device="meta"``,
    an empty shell for ``load_state_dict(assign=True)``."""
    with torch.device(device or "cpu"):
        model = ControlNet(config, name=name)
    if dtype is not None:
        model.to(dtype)
    return model.eval().requires_grad_(False)
