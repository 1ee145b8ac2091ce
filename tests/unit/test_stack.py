"""The residual stack's semantics: windows, modes, masks, pooling, broadcasting, caching — on random weights."""

from __future__ import annotations

import pytest
import torch
from cn_helpers import random_inputs, rel_err, tiny_controlnet
from controlstack.controlnet import ControlNetError
from controlstack.controlnet.stack import COND, UNCOND, ResidualStack, StackEntry, StackRun, mode_scales

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def cn():
    return tiny_controlnet("sd1", seed=1)


@pytest.fixture(scope="module")
def cn2():
    return tiny_controlnet("sd1", seed=2)


def linear(p: float) -> float:
    """The test schedule: sigma falls from 1 to 0 over the run."""
    return 1.0 - p


def run_of(*entries: StackEntry, **kwargs) -> StackRun:
    """A run of a stack of `entries` (eager: no CUDA graphs unless a test passes its own)."""
    return ResidualStack(entries).begin_run(linear, use_cuda_graphs=False, **kwargs)


def reference(cn, x, hint, t, ctx, y=None):
    """The plain ControlNet pass with the hint broadcast by hand: what every stack result is built from."""
    if hint.shape[0] != x.shape[0]:
        hint = hint.repeat(x.shape[0] // hint.shape[0], 1, 1, 1)
    return cn(x, hint, t, ctx, y)


class CallCounter:
    def __init__(self, module):
        self.forward = 0
        self.encode = 0
        module.register_forward_pre_hook(self._count_forward)
        module.input_hint_block.register_forward_pre_hook(self._count_encode)

    def _count_forward(self, *_):
        self.forward += 1

    def _count_encode(self, *_):
        self.encode += 1


def test_single_entry_is_strength_times_controlnet(cn):
    x, hint, t, ctx, _ = random_inputs(cn, batch=2, seed=3)
    got = run_of(StackEntry(cn, hint, strength=0.7)).residuals(x, t, ctx, cond_or_uncond=(COND,))
    want = reference(cn, x, hint, t, ctx)
    assert len(got) == cn.num_residuals
    for g, w in zip(got, want, strict=True):
        assert w.abs().mean() > 0  # random zero convs: the comparison can fail
        assert rel_err(g, 0.7 * w) < 1e-6


def test_two_entries_sum(cn, cn2):
    x, hint, t, ctx, _ = random_inputs(cn, batch=1, seed=4)
    hint2 = torch.rand_like(hint)
    got = run_of(StackEntry(cn, hint, strength=1.0), StackEntry(cn2, hint2, strength=0.5)).residuals(
        x, t, ctx
    )
    a, b = reference(cn, x, hint, t, ctx), reference(cn2, x, hint2, t, ctx)
    for g, ra, rb in zip(got, a, b, strict=True):
        assert rel_err(g, ra + 0.5 * rb) < 1e-6


def test_window_skips_without_calling(cn, cn2):
    x, hint, t, ctx, _ = random_inputs(cn, batch=1, seed=5)
    early = tiny_controlnet("sd1", seed=7)
    counter = CallCounter(early)
    run = run_of(StackEntry(early, hint, start_percent=0.0, end_percent=0.4), StackEntry(cn, hint))
    late = run.residuals(x, t, ctx, sigma=0.3)  # progress 0.7: only the second entry
    assert counter.forward == 0
    for g, w in zip(late, reference(cn, x, hint, t, ctx), strict=True):
        assert rel_err(g, w) < 1e-6
    run.residuals(x, t, ctx, sigma=0.9)  # progress 0.1: both
    assert counter.forward == 1
    run.end()


def test_nothing_active_returns_none_and_strength_zero_never_runs(cn):
    x, hint, t, ctx, _ = random_inputs(cn, batch=1, seed=6)
    counter = CallCounter(cn)
    before = counter.forward
    assert run_of(StackEntry(cn, hint, strength=0.0)).residuals(x, t, ctx, sigma=0.5) is None
    assert counter.forward == before


def test_prompt_mode_scales(cn):
    x, hint, t, ctx, _ = random_inputs(cn, batch=1, seed=8)
    got = run_of(StackEntry(cn, hint, strength=2.0, mode="prompt")).residuals(x, t, ctx)
    want = reference(cn, x, hint, t, ctx)
    n = cn.num_residuals
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert rel_err(g, 2.0 * 0.825 ** (n - 1 - i) * w) < 1e-6
    assert mode_scales("prompt", 13) == tuple(0.825 ** (12 - i) for i in range(13))  # SD1.x / SD2.x
    assert mode_scales("prompt", 10)[0] == pytest.approx(0.825**9)  # SDXL analogue over its 10 residuals
    assert mode_scales("prompt", 10)[-1] == 1.0


def test_sdxl_prompt_mode_and_y():
    xl = tiny_controlnet("sdxl", seed=3)
    x, hint, t, ctx, y = random_inputs(xl, batch=1, seed=9)
    got = run_of(StackEntry(xl, hint, mode="prompt")).residuals(x, t, ctx, y)
    want = reference(xl, x, hint, t, ctx, y)
    assert len(got) == xl.num_residuals
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert rel_err(g, 0.825 ** (len(want) - 1 - i) * w) < 1e-6


def test_control_mode_zeroes_uncond_rows(cn):
    x, hint, t, ctx, _ = random_inputs(cn, batch=4, seed=10)  # 2 chunks of 2 latents: uncond, cond
    got = run_of(StackEntry(cn, hint[:1], mode="control")).residuals(x, t, ctx, cond_or_uncond=(UNCOND, COND))
    want = reference(cn, x, hint[:1], t, ctx)
    for g, w in zip(got, want, strict=True):
        assert torch.all(g[:2] == 0)
        assert rel_err(g[2:], w[2:]) < 1e-6


def test_custom_scales_multiply_per_layer(cn):
    x, hint, t, ctx, _ = random_inputs(cn, batch=1, seed=11)
    scales = tuple(float(i) / 10 for i in range(cn.num_residuals))
    got = run_of(StackEntry(cn, hint, strength=1.5, scales=scales)).residuals(x, t, ctx)
    for s, g, w in zip(scales, got, reference(cn, x, hint, t, ctx), strict=True):
        assert rel_err(g, 1.5 * s * w) < 1e-6 if s else torch.all(g == 0)


def test_mask_is_resized_to_each_residual(cn):
    x, hint, t, ctx, _ = random_inputs(cn, batch=1, latent=8, seed=12)
    mask = torch.zeros(1, 64, 64)
    mask[:, :, :32] = 1.0  # left half
    got = run_of(StackEntry(cn, hint, mask=mask)).residuals(x, t, ctx)
    want = reference(cn, x, hint, t, ctx)
    for g, w in zip(got, want, strict=True):
        half = w.shape[-1] // 2
        if half >= 2:  # away from the blurred seam, left is kept and right is zero
            assert rel_err(g[..., : half - 1], w[..., : half - 1]) < 1e-6
            assert g[..., half + 1 :].abs().max() == 0
        assert g.abs().sum() < w.abs().sum()


def test_shuffle_global_average_pooling():
    shuffle = tiny_controlnet("sd1", seed=13)
    shuffle.global_average_pooling = True
    x, hint, t, ctx, _ = random_inputs(shuffle, batch=1, seed=14)
    got = run_of(StackEntry(shuffle, hint)).residuals(x, t, ctx)
    for g, w in zip(got, reference(shuffle, x, hint, t, ctx), strict=True):
        assert torch.allclose(g, w.mean(dim=(2, 3), keepdim=True).expand_as(w), atol=1e-6)
    shuffle.global_average_pooling = False


def test_hint_broadcast_rules(cn):
    x, hint, t, ctx, _ = random_inputs(cn, batch=6, seed=15)  # 2 chunks x 3 latents (e.g. 3 video frames)
    frames = hint[:3]
    got = run_of(StackEntry(cn, frames)).residuals(x, t, ctx, cond_or_uncond=(UNCOND, COND))
    want = cn(x, frames.repeat(2, 1, 1, 1), t, ctx)
    for g, w in zip(got, want, strict=True):
        assert rel_err(g, w) < 1e-6
    with pytest.raises(ControlNetError, match="batch of 2 does not fit 3"):
        run_of(StackEntry(cn, hint[:2])).residuals(x, t, ctx, cond_or_uncond=(UNCOND, COND))


def test_hint_of_wrong_size_or_channels_is_refused(cn):
    x, hint, t, ctx, _ = random_inputs(cn, batch=1, seed=16)
    with pytest.raises(ControlNetError, match="expected 64x64 pixels"):
        run_of(StackEntry(cn, hint[..., :56, :56], label="node 7")).residuals(x, t, ctx)
    with pytest.raises(ControlNetError, match="B x 3 x H x W"):
        StackEntry(cn, hint[:, :1])
    with pytest.raises(ControlNetError, match=f"expected {cn.num_residuals} values"):
        StackEntry(cn, hint, scales=(1.0,) * (cn.num_residuals + 1))


def test_hint_encoded_once_per_run_and_fitter_used(cn):
    x, hint, t, ctx, _ = random_inputs(cn, batch=2, seed=17)
    small = hint[:1, :, ::2, ::2]  # 32x32: the fitter upsamples to 64x64
    fitted = []

    def fitter(entry, kind, h, w):
        fitted.append((kind, h, w))
        return torch.nn.functional.interpolate(entry.hint, size=(h, w), mode="nearest")

    counter = CallCounter(cn)
    stack = ResidualStack([StackEntry(cn, small)])
    run = stack.begin_run(linear, hint_fitter=fitter)
    for step in range(3):
        run.residuals(x, t * (step + 1), ctx, sigma=None, cond_or_uncond=(UNCOND, COND))
    assert counter.encode == 1 and fitted == [("hint", 64, 64)]
    run.end()
    with pytest.raises(RuntimeError, match="ended"):
        run.residuals(x, t, ctx)
    run = stack.begin_run(linear, hint_fitter=fitter)  # a new run starts from scratch
    run.residuals(x, t, ctx)
    assert counter.encode == 2


def test_eager_path_equals_plain_path_over_a_run(cn, cn2):
    """The cached / in-place path gives the same numbers as fresh plain ControlNet calls at every step."""
    x, hint, t, ctx, _ = random_inputs(cn, batch=2, seed=18)
    run = run_of(StackEntry(cn, hint[:1], strength=0.8), StackEntry(cn2, hint[1:], strength=1.2))
    for step in range(3):
        xs = x + step
        got = run.residuals(xs, t, ctx, cond_or_uncond=(UNCOND, COND))
        a = reference(cn, xs, hint[:1], t, ctx)
        b = reference(cn2, xs, hint[1:], t, ctx)
        for g, ra, rb in zip(got, a, b, strict=True):
            assert rel_err(g, 0.8 * ra + 1.2 * rb) < 1e-6
    run.end()


def test_a_step_needs_a_run(cn):
    """No silent default schedule: a stack step without begin_run is an error that says what to do."""
    x, hint, t, ctx, _ = random_inputs(cn, batch=1, seed=19)
    stack = ResidualStack([StackEntry(cn, hint)])
    for call in (
        lambda: stack.control(x, t, ctx),
        lambda: stack.residuals(x, t, ctx),
        lambda: stack.attention_patch(x),
        lambda: stack.active(0.5),
    ):
        with pytest.raises(RuntimeError, match=r"needs a run: run = stack.begin_run"):
            call()


def test_two_runs_of_one_stack_do_not_interfere(cn, cn2):
    """Two runs of ONE stack object at once (two samplers of MODEL clones): each has its own schedule, hint fitter
    and caches, steps interleaved, and ending one leaves the other working."""
    x, hint, t, ctx, _ = random_inputs(cn, batch=1, seed=20)
    hint_a, hint_b = torch.rand_like(hint[:1]), torch.rand_like(hint[:1])
    stack = ResidualStack(
        [StackEntry(cn, hint[:1], end_percent=0.5), StackEntry(cn2, hint[:1], strength=0.5)]
    )
    # run A fits every hint to hint_a and uses sigma = 1 - p; run B fits to hint_b and uses sigma = 10 * (1 - p)
    run_a = stack.begin_run(linear, hint_fitter=lambda e, kind, h, w: hint_a, use_cuda_graphs=False)
    run_b = stack.begin_run(
        lambda p: 10.0 * (1.0 - p), hint_fitter=lambda e, kind, h, w: hint_b, use_cuda_graphs=False
    )

    a = run_a.residuals(x, t, ctx, sigma=0.3)  # A: progress 0.7 -> only the second entry
    b = run_b.residuals(x, t, ctx, sigma=3.0)  # B: progress 0.7 -> only the second entry, hint_b
    b_early = run_b.residuals(x, t, ctx, sigma=9.0)  # B: progress 0.1 -> both entries
    only_a, only_b = reference(cn2, x, hint_a, t, ctx), reference(cn2, x, hint_b, t, ctx)
    first_b = reference(cn, x, hint_b, t, ctx)
    for ga, gb, ge, ra, rb, rb1 in zip(a, b, b_early, only_a, only_b, first_b, strict=True):
        assert rel_err(ra, rb) > 1e-3  # the two hints give different residuals: the test can fail
        assert rel_err(ga, 0.5 * ra) < 1e-6
        assert rel_err(gb, 0.5 * rb) < 1e-6
        assert rel_err(ge, rb1 + 0.5 * rb) < 1e-5  # a sum of two forwards: fp32 order
    run_b.end()
    again = run_a.residuals(x, t, ctx, sigma=0.9)  # A still works (both entries, hint_a)
    for g, r1, r2 in zip(
        again, reference(cn, x, hint_a, t, ctx), reference(cn2, x, hint_a, t, ctx), strict=True
    ):
        assert rel_err(g, r1 + 0.5 * r2) < 1e-6
    run_a.end()


def test_the_observer_of_one_run_sees_only_its_steps(cn):
    """The control report's observer is per run: a second run of the same stack, interleaved, never reaches it;
    it gets the entry index, the call's sigma, mean |applied (scaled) residual| per layer and the applied strength."""
    x, hint, t, ctx, _ = random_inputs(cn, batch=1, seed=21)
    stack = ResidualStack([StackEntry(cn, hint, strength=0.25)])
    seen = []
    observed = stack.begin_run(
        linear, observer=lambda idx, sigma, applied, strength: seen.append((idx, sigma, applied, strength))
    )
    other = stack.begin_run(linear)
    other.residuals(x, t, ctx, sigma=0.8)
    got = observed.residuals(x, t, ctx, sigma=0.6)
    other.residuals(x + 1, t, ctx, sigma=0.4)
    ((idx, sigma, magnitudes, strength),) = seen
    assert (idx, sigma, strength) == (0, 0.6, 0.25)
    want = reference(cn, x, hint, t, ctx)
    assert magnitudes.dtype == torch.float32 and magnitudes.shape == (len(want),)
    for m, g, w in zip(magnitudes.tolist(), got, want, strict=True):
        assert rel_err(g, 0.25 * w) < 1e-6
        assert m > 0 and m == pytest.approx(float((0.25 * w).abs().mean()), rel=1e-5)
    observed.end()
    other.end()
