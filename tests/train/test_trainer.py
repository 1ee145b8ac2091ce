"""The trainer on the tiny random SD1.x checkpoint: the paper's cold start, learning, a frozen base, exact resume,
torchrun (gloo) equal to one process, and a saved file that every loader reads alike."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from controlstack.controlnet.convert import LDM_PREFIX
from controlstack.controlnet.loading import load_controlnet
from controlstack.training.data import DatasetError, write_synthetic_fill50k
from controlstack.training.trainer import TrainConfig, Trainer, TrainingError, controlnet_file_tensors
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "unit"))
from cn_helpers import diffusers_kwargs, diffusers_residuals, randomize_  # noqa: E402

RES = 64  # 8x8 latents: a step of the tiny model takes ~0.3 s on 2 CPUs


@pytest.fixture(scope="module")
def host(comfy_dir: Path, tiny_checkpoint: Path):
    from controlstack.nodes.patcher import TrainingHost

    return TrainingHost(str(tiny_checkpoint))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("fill50k")
    write_synthetic_fill50k(folder, 24, size=RES, seed=3)
    return folder


def config(dataset: Path, output: Path, **kw) -> TrainConfig:
    base = dict(data=str(dataset), output=str(output), resolution=RES, steps=4, batch_size=4, lr=1e-4)
    base.update(save_every=1000, validate_every=1000, validation_rows=2, validation_steps=3)
    base.update(kw)
    return TrainConfig(**base)


def digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def test_cold_start_is_the_base_model_bit_for_bit(host, dataset, tmp_path):
    trainer = Trainer(config(dataset, tmp_path), host)
    cn = trainer.controlnet
    unet = host.unet.state_dict()
    # the trainable copy is the base encoder, tensor for tensor
    for k, v in cn.state_dict().items():
        if k.startswith(("time_embed.", "input_blocks.", "middle_block.")):
            assert torch.equal(v, unet[k].float()), k
    zero = [k for k, v in cn.state_dict().items() if k.startswith(("zero_convs.", "middle_block_out."))]
    assert zero and all(not cn.state_dict()[k].any() for k in zero)
    batch = trainer._batch(range(8))
    with torch.no_grad():
        eps = trainer.model(batch["x"], batch["sigma"], batch["hint"], batch["context"])
        base = (batch["x"] - host.denoise(batch["x"], batch["sigma"], batch["context"])) / batch[
            "sigma"
        ].reshape(-1, 1, 1, 1)
    assert torch.equal(eps, base)
    # the same comparison sees a ControlNet that is not at its cold start
    with torch.no_grad():
        for k in zero:
            cn.get_parameter(k).normal_(0, 0.05)
        moved = trainer.model(batch["x"], batch["sigma"], batch["hint"], batch["context"])
    assert (moved - base).abs().max() > 1e-3


def test_loss_falls_and_only_the_copy_learns(host, dataset, tmp_path):
    trainer = Trainer(config(dataset, tmp_path, steps=50), host)
    held_out = range(10**6, 10**6 + 16)  # sample numbers the run never draws
    before_eval = trainer.evaluate(held_out)
    base_before, cn_before = digest(host.unet), digest(trainer.controlnet)
    trainer.run()
    after_eval = trainer.evaluate(held_out)
    losses = [loss for _, loss in trainer.losses]
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    print(
        f"loss: first 10 steps {first:.4f}, last 10 {last:.4f}; held out {before_eval:.4f} -> {after_eval:.4f}"
    )
    assert last < 0.9 * first
    assert after_eval < 0.9 * before_eval
    assert digest(host.unet) == base_before  # sd_locked: the frozen UNet is bit for bit what was loaded
    assert digest(trainer.controlnet) != cn_before
    assert not any(p.grad is not None for p in host.unet.parameters())
    saved = load_file(str(tmp_path / "controlnet.safetensors"))
    assert all(k.startswith(LDM_PREFIX) for k in saved) and {v.dtype for v in saved.values()} == {
        torch.float16
    }


def test_resume_equals_an_uninterrupted_run(host, dataset, tmp_path):
    whole = Trainer(config(dataset, tmp_path / "whole", steps=6, save_every=3, grad_accum=2), host)
    whole.run()
    first = Trainer(config(dataset, tmp_path / "split", steps=3, save_every=3, grad_accum=2), host)
    first.run()
    assert (tmp_path / "split" / "checkpoint-3" / "optimizer.pt").is_file()
    second = Trainer(config(dataset, tmp_path / "split", steps=6, save_every=3, grad_accum=2), host)
    second.resume(tmp_path / "split" / "checkpoint-3")
    second.run()
    assert second.losses == whole.losses
    a, b = whole.controlnet.state_dict(), second.controlnet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(TrainingError, match="--lr"):
        Trainer(config(dataset, tmp_path / "split", steps=6, lr=2e-4, grad_accum=2), host).resume(
            tmp_path / "split" / "checkpoint-3"
        )


def test_validation_images_are_written(host, dataset, tmp_path):
    trainer = Trainer(config(dataset, tmp_path, steps=2, validate_every=2), host)
    trainer.run()
    from PIL import Image

    image = Image.open(tmp_path / "validation" / "step_000002.png")
    assert image.size == (3 * RES, 2 * RES)  # rows: hint | sample | target, one per validation row


def test_saved_file_loads_alike_in_controlstack_and_comfyui(host, dataset, tmp_path):
    import comfy.controlnet

    trainer = Trainer(config(dataset, tmp_path, steps=1, save_dtype="fp32"), host)
    randomize_(trainer.controlnet, seed=5)  # every weight, zero convs too: no residual is trivially zero
    path = trainer.save_final()["controlnet.safetensors"]
    ours = load_controlnet(str(path), dtype=torch.float32)
    assert ours.config == host.controlnet_config()
    builtin = comfy.controlnet.load_controlnet(str(path)).control_model.float()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    hint = torch.rand(2, 3, RES, RES, generator=g)
    t = torch.tensor([10.0, 700.0])
    context = torch.randn(2, 77, 768, generator=g)
    with torch.no_grad():
        mine = ours(x, hint, t, context)
        trained = trainer.controlnet.eval()(x, hint, t, context)
        theirs = builtin(x=x, hint=hint, timesteps=t, context=context)
    theirs = [*theirs["output"], *theirs["middle"]]
    assert len(mine) == len(theirs) == len(trained)
    for a, b, c in zip(mine, theirs, trained, strict=True):
        assert a.abs().max() > 1e-3
        assert torch.allclose(a, c, rtol=1e-5, atol=1e-6)
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), (a - b).abs().max()


def test_a_full_size_file_converts_in_diffusers(comfy_dir):
    """The tiny layout's middle block (one ResBlock) has no diffusers equivalent; the SD1.5 layout has."""
    import host as harness
    from controlstack.nodes.patcher import TrainingHost
    from controlstack.training.trainer import new_controlnet
    from diffusers import ControlNetModel
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    checkpoint = harness.build_models(harness.resolve_base_dir(), comfy_dir=comfy_dir)["checkpoint"]
    sd15 = TrainingHost(str(checkpoint))
    cn = randomize_(new_controlnet(sd15, None, seed=0), seed=7)
    del sd15
    # the tensors save_final writes (not written to disk here: 1.4 GB in fp32; the tiny tests cover the file)
    kw = diffusers_kwargs(cn.config)
    converted = convert_controlnet_checkpoint(controlnet_file_tensors(cn), kw)
    with torch.device("meta"):
        model = ControlNetModel(**kw)
    model.load_state_dict(converted, strict=True, assign=True)
    g = torch.Generator().manual_seed(1)
    x, hint = torch.randn(1, 4, 8, 8, generator=g), torch.rand(1, 3, 64, 64, generator=g)
    t, context = torch.tensor([500.0]), torch.randn(1, 77, 768, generator=g)
    with torch.no_grad():
        ours = cn.eval()(x, hint, t, context)
        theirs = diffusers_residuals(model.eval(), x, hint, t, context)
    for a, b in zip(ours, theirs, strict=True):
        assert a.abs().max() > 1e-3
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * a.abs().max()), (a - b).abs().max()


def test_torchrun_gloo_equals_one_process(comfy_dir, tiny_checkpoint, dataset, tmp_path):
    args = [
        "-m", "controlstack.training", "train", "--checkpoint", str(tiny_checkpoint), "--data", str(dataset),
        "--resolution", str(RES), "--steps", "3", "--batch-size", "4", "--lr", "1e-4", "--save-dtype", "fp32",
        "--comfyui", str(comfy_dir), "--quiet", "--validate-every", "1000",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run(
        [sys.executable, *args, "--output", str(tmp_path / "one")], env=env, capture_output=True, text=True
    )
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args[0:]]
        + ["--output", str(tmp_path / "two")],
        env=env,
        capture_output=True,
        text=True,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    a = load_file(str(tmp_path / "one" / "controlnet.safetensors"))
    b = load_file(str(tmp_path / "two" / "controlnet.safetensors"))
    la = json.loads((tmp_path / "one" / "losses.json").read_text())
    lb = json.loads((tmp_path / "two" / "losses.json").read_text())
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    moved = max(float((a[k]).abs().max()) for k in a if "zero_convs" in k)
    print(f"one vs two processes: max weight difference {worst:.2e}; zero convs moved to {moved:.2e}")
    assert moved > 1e-5
    # Not bit-equal: the gradient all-reduce sums in another order (~1e-7 relative), and Adam's m / sqrt(v) turns
    # such differences on near-zero gradients into up to a few % of one step (lr 1e-4 here). A different batch
    # or seed moves weights by ~lr per step, 30x more than the bound.
    assert worst < 1e-5
    assert torch.allclose(torch.tensor(la)[:, 1], torch.tensor(lb)[:, 1], rtol=1e-5)


def test_bad_data_is_named(host, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "prompt.json").write_text("\n")
    with pytest.raises(DatasetError, match="no rows"):
        Trainer(config(empty, tmp_path / "out"), host)
    broken = tmp_path / "broken"
    write_synthetic_fill50k(broken, 4, size=RES)
    (broken / "target" / "2.png").unlink()
    trainer = Trainer(config(broken, tmp_path / "out2", batch_size=4), host)
    with pytest.raises(DatasetError, match=r"prompt.json line 3.*target"):
        trainer.train_step()
    sized = tmp_path / "sized"
    write_synthetic_fill50k(sized, 2, size=RES)
    from PIL import Image

    Image.new("RGB", (RES, RES + 8)).save(sized / "source" / "1.png")
    trainer = Trainer(config(sized, tmp_path / "out3", batch_size=2), host)
    with pytest.raises(DatasetError, match=r"line 2.*one size"):
        trainer.train_step()
    with pytest.raises(TrainingError, match="--batch-size"):
        Trainer(config(sized, tmp_path / "out4", batch_size=0), host)


def test_gradient_checkpointing_changes_memory_not_numbers(host, dataset, tmp_path):
    plain = Trainer(config(dataset, tmp_path / "a", steps=2), host)
    plain.run()
    saving = Trainer(config(dataset, tmp_path / "b", steps=2, gradient_checkpointing=True), host)
    saving.run()
    a, b = plain.controlnet.state_dict(), saving.controlnet.state_dict()
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-7) for k in a)
    assert plain.losses == saving.losses  # the forward is the same; only the backward recomputes


def test_bf16_autocast_trains_close_to_fp32(host, dataset, tmp_path):
    fp32 = Trainer(config(dataset, tmp_path / "a", steps=1), host)
    bf16 = Trainer(config(dataset, tmp_path / "b", steps=1, mixed_precision="bf16"), host)
    l32, l16 = fp32.train_step(), bf16.train_step()
    print(f"first-step loss fp32 {l32:.5f}, bf16 autocast {l16:.5f}")
    assert l16 != l32 and abs(l16 - l32) < 0.02 * l32
