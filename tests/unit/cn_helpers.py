"""Shared helpers for ControlNet tests: small configs, random weights, diffusers twins.

Imported by other test modules (the residual stack's too); keep the signatures stable.
"""

from __future__ import annotations

import math

import torch
from controlstack.controlnet import ControlNet, ControlNetConfig, build_controlnet
from controlstack.controlnet.convert import ldm_to_diffusers
from controlstack.controlnet.model import timestep_embedding
from numerics import rel_err as rel_err  # one home (scripts/numerics.py); re-exported for the tests

# Very small configs that still have every block type: identity and projecting ResBlocks, transformers,
# downsamples, a level without attention (SD1/SD2) or without transformers at all (SDXL), the middle block.
TINY = {
    "sd1": ControlNetConfig(
        "sd1",
        model_channels=32,
        context_dim=32,
        channel_mult=(1, 2, 2),
        num_res_blocks=(1, 1, 1),
        transformer_depth=(1, 1, 0),
        transformer_depth_middle=1,
    ),
    "sd2": ControlNetConfig(
        "sd2",
        model_channels=64,
        context_dim=32,
        channel_mult=(1, 2, 2),
        num_res_blocks=(1, 1, 1),
        transformer_depth=(1, 1, 0),
        transformer_depth_middle=1,
        num_heads=-1,
        num_head_channels=64,
        use_linear=True,
    ),
    "sdxl": ControlNetConfig(
        "sdxl",
        model_channels=64,
        context_dim=32,
        channel_mult=(1, 2),
        num_res_blocks=(2, 2),
        transformer_depth=(0, 0, 2, 2),
        transformer_depth_middle=2,
        num_heads=-1,
        num_head_channels=64,
        use_linear=True,
        adm_in_channels=64,
    ),
}


def add_time_dim(config: ControlNetConfig) -> int:
    """Width of each SDXL size/crop embedding in y (6 of them follow the pooled text embedding)."""
    return 256 if config.adm_in_channels == 2816 else 8


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int = 0, zero_convs: bool = True) -> torch.nn.Module:
    """Give EVERY parameter a seeded random value (std 1/sqrt(fan_in)), zero convs included, so no
    residual is trivially zero. Norm scales get 1 + noise, biases small noise."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if not zero_convs and name.startswith(("zero_convs.", "middle_block_out.")):
            p.zero_()
            continue
        noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
        if p.ndim > 1:
            noise *= 1.0 / math.sqrt(p[0].numel())
        elif name.endswith("weight"):  # GroupNorm / LayerNorm scale
            noise = 1.0 + 0.1 * noise
        else:
            noise *= 0.1
        p.copy_(noise.to(p.dtype))
    return module


def random_controlnet(config: ControlNetConfig, seed: int = 0, zero_convs: bool = True) -> ControlNet:
    """Built on the meta device and filled tensor by tensor: one copy of the weights in memory."""
    cn = build_controlnet(config, device="meta")
    cn.to_empty(device="cpu")
    return randomize_(cn, seed, zero_convs)


def tiny_controlnet(family: str = "sd1", seed: int = 0) -> ControlNet:
    """A very small ControlNet of ``family`` with all weights (zero convs too) randomised."""
    return random_controlnet(TINY[family], seed)


SD1_SLOTS = ControlNetConfig(
    "sd1",
    model_channels=32,
    context_dim=32,
    channel_mult=(1, 2, 2, 2),
    transformer_depth=(1, 1, 0, 0, 0, 0, 0, 0),
    transformer_depth_middle=1,
)
"""A small SD1-shaped ControlNet config with SD1's 13 residual slots (4 levels of 2 ResBlocks), as T2I-Adapters
have: mixed stacks need equal layer counts."""


def sdxl_cond(
    config: ControlNetConfig, batch: int, seed: int = 0
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SDXL's adm vector y and the diffusers ``added_cond_kwargs`` it is made of."""
    g = torch.Generator().manual_seed(seed + 1)
    tdim = add_time_dim(config)
    text = torch.randn(batch, config.adm_in_channels - 6 * tdim, generator=g)
    time_ids = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]]).repeat(batch, 1)
    time_ids += torch.randint(0, 64, time_ids.shape, generator=g)
    y = torch.cat([text, timestep_embedding(time_ids.flatten(), tdim).reshape(batch, -1)], dim=-1)
    return y, {"text_embeds": text, "time_ids": time_ids}


def random_inputs(cn: ControlNet, batch: int = 2, latent: int = 8, seed: int = 0):
    """(x, hint, timesteps, context, y) for ``cn``: latent batch x C x latent x latent, hint 8x larger."""
    cfg = cn.config
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, latent, latent, generator=g)
    hint = torch.rand(batch, cfg.hint_channels, 8 * latent, 8 * latent, generator=g)
    timesteps = torch.rand(batch, generator=g) * 999
    context = torch.randn(batch, 7, cfg.context_dim, generator=g)
    y = sdxl_cond(cfg, batch, seed)[0] if cfg.adm_in_channels is not None else None
    return x, hint, timesteps, context, y


def _levels(config: ControlNetConfig) -> tuple[int, list[int], list[int]]:
    nrb = config.num_res_blocks[0]
    assert all(n == nrb for n in config.num_res_blocks), "diffusers needs the same ResBlock count per level"
    depth = [config.transformer_depth[i * nrb] for i in range(len(config.channel_mult))]
    chans = [config.model_channels * m for m in config.channel_mult]
    return nrb, depth, chans


def diffusers_kwargs(config: ControlNetConfig) -> dict:
    """ControlNetModel / UNet2DConditionModel arguments matching ``config``."""
    nrb, depth, chans = _levels(config)
    # diffusers' middle block takes the last level's depth; a level without attention ignores it.
    layers = [d if d > 0 else 1 for d in depth]
    layers[-1] = max(config.transformer_depth_middle, 1) if depth[-1] == 0 else layers[-1]
    assert layers[-1] == config.transformer_depth_middle
    heads = (
        config.num_heads if config.num_head_channels == -1 else [c // config.num_head_channels for c in chans]
    )
    kw = dict(
        in_channels=config.in_channels,
        down_block_types=["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depth],
        block_out_channels=chans,
        layers_per_block=nrb,
        cross_attention_dim=config.context_dim,
        attention_head_dim=heads,
        use_linear_projection=config.use_linear,
        transformer_layers_per_block=layers,
    )
    if config.adm_in_channels is not None:
        kw.update(
            addition_embed_type="text_time",
            addition_time_embed_dim=add_time_dim(config),
            projection_class_embeddings_input_dim=config.adm_in_channels,
        )
    return kw


def to_diffusers_state_dict(cn: ControlNet) -> dict[str, torch.Tensor]:
    """Our ldm weights under diffusers ControlNetModel keys (shares the tensors, no copy)."""
    sd = cn.state_dict()
    names = ldm_to_diffusers(sd, len(cn.config.channel_mult), cn.config.num_res_blocks[0])
    assert len(names) == len(sd), sorted(set(sd) - set(names))[:5]
    return {names[k]: v for k, v in sd.items()}


def to_diffusers(cn: ControlNet):
    """diffusers' ControlNetModel holding ``cn``'s weights (shared tensors)."""
    from diffusers import ControlNetModel

    cfg = cn.config
    kw = diffusers_kwargs(cfg)
    if cfg.hint_channels != 3:
        kw["conditioning_channels"] = cfg.hint_channels
    with torch.device("meta"):
        model = ControlNetModel(**kw)
    model.load_state_dict(to_diffusers_state_dict(cn), strict=True, assign=True)
    return model.eval().requires_grad_(False)


def diffusers_unet(config: ControlNetConfig, seed: int = 0):
    """A randomised diffusers UNet2DConditionModel whose encoder matches ``config``."""
    from diffusers import UNet2DConditionModel

    kw = diffusers_kwargs(config)
    kw["up_block_types"] = [
        "CrossAttnUpBlock2D" if t.startswith("Cross") else "UpBlock2D"
        for t in reversed(kw["down_block_types"])
    ]
    kw["out_channels"] = config.in_channels
    unet = UNet2DConditionModel(**kw)
    return randomize_(unet, seed).eval().requires_grad_(False)


def diffusers_residuals(model, x, hint, timesteps, context, added_cond_kwargs=None) -> list[torch.Tensor]:
    """diffusers ControlNetModel's residuals in our order (down blocks shallow -> deep, middle last)."""
    down, mid = model(
        x,
        timesteps,
        encoder_hidden_states=context,
        controlnet_cond=hint,
        added_cond_kwargs=added_cond_kwargs,
        return_dict=False,
    )
    return [*down, mid]
