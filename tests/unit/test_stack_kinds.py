"""The residual stack with every kind of control module: T2I-Adapters (input path, once per run), LLLite (attention
patches), Union hints fused into one forward, and mixed stacks equal to the sum of their parts — on random weights."""

from __future__ import annotations

import pytest
import torch
from cn_helpers import SD1_SLOTS, random_inputs, randomize_, rel_err
from controlstack.controlnet import ControlNetError, build_controlnet
from controlstack.controlnet.graphs import StepGraphs
from controlstack.controlnet.schedule import Keyframe, Schedule
from controlstack.controlnet.stack import COND, UNCOND, ResidualStack, StackEntry, StackRun
from controlstack.controlnet.t2i_adapter import T2IAdapterConfig, build_t2i_adapter

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def cn():
    """A small SD1-shaped ControlNet with SD1's 13 residual slots (4 levels of 2 ResBlocks), as T2I-Adapters have."""
    return randomize_(build_controlnet(SD1_SLOTS, name="cn"), seed=1).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def adapter():
    config = T2IAdapterConfig(light=False, cin=192, channels=(16, 32, 32, 32), nums_rb=1)
    return randomize_(build_t2i_adapter(config, name="t2i"), seed=5).eval().requires_grad_(False)


def run_of(*entries: StackEntry, **kwargs) -> StackRun:
    """An eager run of a stack of `entries`, sigma falling from 1 to 0 over the run."""
    return ResidualStack(entries).begin_run(lambda p: 1.0 - p, use_cuda_graphs=False, **kwargs)


class Counter:
    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = 0
        module.register_forward_pre_hook(self._count)

    def _count(self, *_):
        self.calls += 1


def test_t2i_features_go_to_the_input_path_once_per_run(adapter):
    hint = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    x = torch.randn(2, 4, 8, 8)
    counter = Counter(adapter.conv_in)  # the adapter's first layer: runs once per encoding
    run = run_of(StackEntry(adapter, hint, strength=0.6))
    want = adapter.encode_hint(hint)
    counter.calls = 0
    for step in range(3):
        got = run.control(x + step, torch.full((2,), 500.0 - step), torch.randn(2, 7, 32))
        assert got is not None
        assert all(t is None for t in got.output)
        for slot, feature in enumerate(want[:-1]):
            if feature is None:
                assert got.input[slot] is None
            else:
                assert feature.abs().mean() > 0
                assert rel_err(got.input[slot], 0.6 * feature.expand(2, -1, -1, -1)) < 1e-6
        assert got.middle is None  # SD1/SD2 adapters feed no middle feature
    assert counter.calls == 1, "the adapter does not depend on x or t: once per run"
    run.end()


def test_t2i_control_mode_and_mask(adapter):
    hint = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    mask = torch.zeros(1, 64, 64)
    mask[:, :, :32] = 1.0
    x = torch.randn(2, 4, 8, 8)
    got = run_of(StackEntry(adapter, hint, mode="control", mask=mask)).control(
        x, torch.full((2,), 300.0), torch.randn(2, 7, 32), cond_or_uncond=(UNCOND, COND)
    )
    feature = adapter.encode_hint(hint)[2]
    r = got.input[2]
    assert r[0].abs().max() == 0, "uncond row gets nothing in 'ControlNet is more important' mode"
    assert r[1, :, :, 4:].abs().max() == 0 and rel_err(r[1, :, :, :4], feature[0, :, :, :4]) < 1e-6


def test_mixed_stack_is_the_sum_of_its_parts(cn, adapter):
    x, hint, t, ctx, _ = random_inputs(cn, batch=2, seed=3)
    both = run_of(StackEntry(cn, hint, strength=0.8), StackEntry(adapter, hint[:1], strength=1.3))
    only_cn = run_of(StackEntry(cn, hint, strength=0.8))
    only_t2i = run_of(StackEntry(adapter, hint[:1], strength=1.3))
    got = both.control(x, t, ctx)
    a, b = only_cn.control(x, t, ctx), only_t2i.control(x, t, ctx)
    for g, w in zip(got.output, a.output, strict=True):
        assert rel_err(g, w) < 1e-6
    for g, w in zip(got.input, b.input, strict=True):
        assert (g is None and w is None) or rel_err(g, w) < 1e-6
    assert rel_err(got.middle, a.middle) < 1e-6
    with pytest.raises(ControlNetError, match="use control"):
        both.residuals(x, t, ctx)


def test_control_type_only_for_union(cn):
    x, hint, *_ = random_inputs(cn, batch=1, seed=4)
    with pytest.raises(ControlNetError, match="Union"):
        StackEntry(cn, hint, union_type=3)


@pytest.fixture(scope="module")
def lllite():
    from controlstack.controlnet.lllite import load_lllite
    from test_lllite import SMALL, make_file

    return load_lllite(make_file(SMALL, seed=3), "lllite.safetensors")


def test_lllite_attention_patch_applies_strength_rows_and_mask(lllite):
    """The patch the host calls from its attention layers: the entry's strength x layer scale, 0 on uncond rows in
    'control' mode, the mask at the block's token grid; encoded once per run; inactive outside its window."""
    latent = 16
    hint = torch.rand(1, 3, 8 * latent, 8 * latent, generator=torch.Generator().manual_seed(4))
    x = torch.randn(2, 4, latent, latent)
    block, index = ("input", 4), 0  # SDXL input block 4: 1/2 of the latent grid, 640 channels
    q = torch.randn(2, (latent // 2) ** 2, 640)
    cond = {k: v.expand(2, -1, -1) for k, v in lllite.encode_hint(hint).items()}
    want_q, want_k, want_v = lllite.apply(block, index, "attn1", q, q, q, cond, 0.7)
    assert rel_err(want_q - q, torch.zeros_like(q) + (want_q - q)) == 0 and (want_q - q).abs().mean() > 0

    run = run_of(StackEntry(lllite, hint, strength=0.7, start_percent=0.0, end_percent=0.5))
    assert run.control(x, torch.full((2,), 900.0), torch.randn(2, 7, 32), sigma=0.9) is None  # no residuals
    patch = run.attention_patch(x, sigma=0.9, cond_or_uncond=(UNCOND, COND))
    got = patch("attn1", block, index, q, q, q, [2, 640, latent // 2, latent // 2])
    for g, w in zip(got, (want_q, want_k, want_v), strict=True):
        assert rel_err(g, w) < 1e-6
    assert run.attention_patch(x, sigma=0.2, cond_or_uncond=(UNCOND, COND)) is None  # outside the window
    unaffected = patch("attn1", ("input", 1), 0, q, q, q, [2, 320, latent, latent])
    assert all(u is q for u in unaffected)

    mask = torch.zeros(1, 8 * latent, 8 * latent)
    mask[:, : 4 * latent] = 1.0  # top half
    masked = run_of(StackEntry(lllite, hint, strength=0.7, mode="control", mask=mask))
    patch = masked.attention_patch(x, cond_or_uncond=(UNCOND, COND))
    q2, _, _ = patch("attn1", block, index, q, q, q, [2, 640, latent // 2, latent // 2])
    half = (latent // 2) ** 2 // 2
    assert torch.equal(q2[0], q[0]), "uncond row untouched in 'ControlNet is more important' mode"
    assert torch.equal(q2[1, half:], q[1, half:]), "masked-out tokens untouched"
    assert rel_err(q2[1, :half], want_q[1, :half]) < 1e-6


@pytest.fixture(scope="module")
def union():
    from test_union import union_config

    return (
        randomize_(build_controlnet(union_config(n_types=8), name="promax"), seed=6)
        .eval()
        .requires_grad_(False)
    )


def test_union_hints_of_one_model_share_one_forward(union):
    """Two typed hints of one Union model with the same window run as ONE multi-condition forward whose strengths are
    the per-condition scales; a different window splits them into two single-condition forwards."""
    from test_union import union_inputs

    x, hints, t, ctx, y, _ = union_inputs(union.config, 2, batch=2, seed=7)
    hints = [h[:1] for h in hints]  # one hint each, shared by the batch rows
    counter = Counter(union)
    a = StackEntry(union, hints[0], strength=0.9, union_type=1)
    b = StackEntry(union, hints[1], strength=0.6, union_type=3)
    got = run_of(a, b).residuals(x, t, ctx, y)
    assert counter.calls == 1, "one forward for both hints"
    want = union(
        x,
        [h.expand(2, -1, -1, -1) for h in hints],
        t,
        ctx,
        y,
        control_types=[1, 3],
        condition_scales=[0.9, 0.6],
    )
    for g, w in zip(got, want, strict=True):
        assert w.abs().mean() > 0 and rel_err(g, w) < 1e-5

    counter.calls = 0
    late = StackEntry(union, hints[1], strength=0.6, union_type=3, start_percent=0.5)
    got = run_of(a, late).residuals(x, t, ctx, y)
    assert counter.calls == 2, "different windows: two forwards"
    one = union(x, hints[0].expand(2, -1, -1, -1), t, ctx, y, control_types=[1])
    two = union(x, hints[1].expand(2, -1, -1, -1), t, ctx, y, control_types=[3])
    for g, w1, w2 in zip(got, one, two, strict=True):
        assert rel_err(g, 0.9 * w1 + 0.6 * w2) < 1e-5


def test_fused_union_hints_key_their_graph_on_their_strengths(union):
    """A multi-hint Union forward takes the scheduled strengths as python floats into its fusion, so a captured step
    is specialised to them: each held value gets its own graph, and no replay reuses another value's."""
    from test_graphs import TapeCapture
    from test_union import union_inputs

    x, hints, t, ctx, y, _ = union_inputs(union.config, 2, batch=2, seed=11)
    hold = Schedule((Keyframe(0.0, 1.0), Keyframe(0.5, 0.4)))
    entries = [
        StackEntry(union, h[:1], strength=s, union_type=k, schedule=hold)
        for h, s, k in zip(hints, (0.9, 0.6), (1, 3), strict=True)
    ]
    stack = ResidualStack(entries)
    capture = TapeCapture()
    fast = stack.begin_run(lambda p: 1.0 - p, graphs=StepGraphs(capture, device_types=("cpu",)))
    eager = stack.begin_run(lambda p: 1.0 - p, use_cuda_graphs=False)
    for sigma in (0.9, 0.8, 0.7, 0.4, 0.3, 0.2):  # 1.0 three times, then 0.4 three times
        got = fast.residuals(x, t, ctx, y, sigma=sigma)
        want = eager.residuals(x, t, ctx, y, sigma=sigma)
        for g, w in zip(got, want, strict=True):
            assert w.abs().mean() > 0 and rel_err(g, w) < 1e-6, sigma
    assert len(capture.captured) == 2 and capture.replays == 4
    fast.end()
    eager.end()


def test_lllite_terms_reach_the_control_report(lllite):
    """The Sampler's report observer gets, once per UNet call, the largest mean |term| LLLite added per layer slot."""
    latent = 16
    hint = torch.rand(1, 3, 8 * latent, 8 * latent, generator=torch.Generator().manual_seed(8))
    x = torch.randn(2, 4, latent, latent)
    q = torch.randn(2, (latent // 2) ** 2, 640)
    seen = []
    run = run_of(StackEntry(lllite, hint, strength=0.5), observer=lambda *call: seen.append(call))
    patch = run.attention_patch(x, sigma=0.4)
    new = patch("attn1", ("input", 4), 0, q, q, q, [2, 640, latent // 2, latent // 2])
    assert not seen, "reported once per UNet call, after it"
    patch.report()
    ((idx, sigma, cells, strength),) = seen
    assert idx == 0 and sigma == 0.4 and strength == 0.5 and len(cells) == lllite.num_residuals
    largest = max(float((n - q).abs().mean()) for n in new)  # the q, k and v terms of input block 4
    assert largest > 0 and abs(float(cells[4]) - largest) < 1e-6
    assert all(c == 0.0 for i, c in enumerate(cells.tolist()) if i != 4), "no module on the other slots"


def test_union_under_inference_mode(union):
    """ComfyUI loads and runs models under torch.inference_mode (inference tensors track no version counter)."""
    from test_union import union_inputs

    x, hints, t, ctx, y, _ = union_inputs(union.config, 1, batch=2, seed=9)
    with torch.inference_mode():
        loaded = randomize_(build_controlnet(union.config, name="inference"), seed=6).eval()
        got = run_of(StackEntry(loaded, hints[0][:1], union_type=2)).residuals(x, t, ctx, y)
        again = run_of(StackEntry(loaded, hints[0][:1], union_type=2)).residuals(x, t, ctx, y)
    for a, b in zip(got, again, strict=True):
        assert a.abs().mean() > 0 and torch.equal(a, b)
