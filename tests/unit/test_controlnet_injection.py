"""Our residuals injected into diffusers' UNet: same noise prediction as diffusers' own ControlNet path."""

from __future__ import annotations

import pytest
import torch
from cn_helpers import (
    TINY,
    diffusers_residuals,
    diffusers_unet,
    random_controlnet,
    random_inputs,
    rel_err,
    sdxl_cond,
    tiny_controlnet,
    to_diffusers,
)
from controlstack.controlnet.stack import ResidualStack, StackEntry

pytestmark = pytest.mark.unit


def _unet(unet, x, t, ctx, added, residuals=None) -> torch.Tensor:
    kw = {}
    if residuals is not None:
        kw = {
            "down_block_additional_residuals": tuple(residuals[:-1]),
            "mid_block_additional_residual": residuals[-1],
        }
    return unet(x, t, encoder_hidden_states=ctx, added_cond_kwargs=added, return_dict=False, **kw)[0]


def _added(cn, y, seed):
    return sdxl_cond(cn.config, 2, seed)[1] if y is not None else None


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_injection_matches_diffusers_controlnet_path(family):
    cn = tiny_controlnet(family, seed=21)
    unet = diffusers_unet(cn.config, seed=22)
    x, hint, t, ctx, y = random_inputs(cn, seed=23)
    added = _added(cn, y, 23)
    ours = _unet(unet, x, t, ctx, added, cn(x, hint, t, ctx, y))
    theirs = _unet(unet, x, t, ctx, added, diffusers_residuals(to_diffusers(cn), x, hint, t, ctx, added))
    plain = _unet(unet, x, t, ctx, added)
    assert rel_err(ours - plain, theirs - plain) <= 1e-4  # the ControlNet's effect itself, not just the sum
    assert rel_err(ours, theirs) <= 1e-5


def _stack_residuals(stack: ResidualStack, x, t, ctx, y) -> list[torch.Tensor]:
    """One UNet call of a fresh run of ``stack`` (no sigma: every entry active; one cond chunk)."""
    with stack.begin_run(lambda p: 1.0 - p, use_cuda_graphs=False) as run:
        residuals = run.residuals(x, t, ctx, y)
    assert residuals is not None
    return residuals


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_two_stacked_controlnets_equal_multicontrolnet(family):
    """The stack, not a hand-made sum, against diffusers' MultiControlNetModel: two ControlNets with every weight
    random (zero convs too), different hints and strengths other than 1."""
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

    cn1, cn2 = tiny_controlnet(family, seed=31), tiny_controlnet(family, seed=32)
    unet = diffusers_unet(cn1.config, seed=33)
    x, hint1, t, ctx, y = random_inputs(cn1, seed=34)
    hint2 = torch.rand(hint1.shape, generator=torch.Generator().manual_seed(35))
    added = _added(cn1, y, 34)
    strengths = (0.7, 1.3)
    stack = ResidualStack(
        [StackEntry(cn1, hint1, strength=strengths[0]), StackEntry(cn2, hint2, strength=strengths[1])]
    )
    ours = _stack_residuals(stack, x, t, ctx, y)
    multi = MultiControlNetModel([to_diffusers(cn1), to_diffusers(cn2)])
    down, mid = multi(x, t, ctx, [hint1, hint2], list(strengths), added_cond_kwargs=added, return_dict=False)
    theirs = [*down, mid]
    assert len(ours) == len(theirs) == cn1.num_residuals
    assert max(rel_err(a, b) for a, b in zip(ours, theirs, strict=True)) <= 1e-5
    # each ControlNet's share is there: dropping either one moves the sum far beyond the tolerance
    for i, single in enumerate((cn1, cn2)):
        alone = _stack_residuals(ResidualStack([stack.entries[i]]), x, t, ctx, y)
        assert min(rel_err(a, b) for a, b in zip(alone, theirs, strict=True)) > 1e-2, single.config.family
    plain = _unet(unet, x, t, ctx, added)
    got, want = _unet(unet, x, t, ctx, added, ours), _unet(unet, x, t, ctx, added, theirs)
    assert rel_err(got - plain, want - plain) <= 1e-4  # the two ControlNets' effect itself, not just the sum
    assert rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_zero_conv_cold_start_leaves_unet_bit_identical(family):
    # Paper section 3.1: zero convolutions make an untrained ControlNet a no-op, exactly.
    cn = random_controlnet(TINY[family], seed=41, zero_convs=False)
    assert all(
        torch.equal(p, torch.zeros_like(p))
        for n, p in cn.named_parameters()
        if n.startswith(("zero_convs.", "middle_block_out."))
    )
    unet = diffusers_unet(cn.config, seed=42)
    x, hint, t, ctx, y = random_inputs(cn, seed=43)
    added = _added(cn, y, 43)
    assert torch.equal(_unet(unet, x, t, ctx, added, cn(x, hint, t, ctx, y)), _unet(unet, x, t, ctx, added))
