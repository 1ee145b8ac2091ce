"""Every bad input raises ControlNetError with a message naming the file and what was found."""

from __future__ import annotations

import os

import pytest
import torch
from cn_helpers import random_inputs, tiny_controlnet, to_diffusers_state_dict
from controlstack.controlnet import ControlNetError, load_controlnet
from controlstack.controlnet.kinds import load_control
from safetensors.torch import save_file

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def sd():
    return {f"control_model.{k}": v for k, v in tiny_controlnet("sd1").state_dict().items()}


def _raises(path, *words, **kw):
    # load_control: what LoadControlNet calls for any file (it dispatches to load_controlnet for ControlNets)
    with pytest.raises(ControlNetError) as info:
        load_control(path, **kw)
    msg = str(info.value)
    assert os.fspath(path) in msg if not isinstance(path, dict) else True, msg
    for w in words:
        assert w.lower() in msg.lower(), msg
    return msg


def test_error_type_is_value_error():
    assert issubclass(ControlNetError, ValueError)


def test_missing_empty_and_garbage_files(tmp_path):
    _raises(tmp_path / "nope.safetensors", "no such file")
    (tmp_path / "empty.pth").write_bytes(b"")
    _raises(tmp_path / "empty.pth", "empty")
    (tmp_path / "garbage.ckpt").write_bytes(os.urandom(4096))
    _raises(tmp_path / "garbage.ckpt", "corrupt")
    (tmp_path / "bad_header.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json!!!!!!}")
    _raises(tmp_path / "bad_header.safetensors", "safetensors")


def test_truncated_files(tmp_path, sd):
    for name in ("cn.safetensors", "cn.pth"):
        path = tmp_path / name
        save_file(sd, str(path)) if name.endswith(".safetensors") else torch.save(sd, path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        _raises(path)


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch PWNED_BY_PICKLE",))


def test_pickle_that_would_run_code_is_refused(tmp_path, monkeypatch, sd):
    monkeypatch.chdir(tmp_path)
    for legacy in (False, True):
        path = tmp_path / f"evil_{legacy}.pth"
        torch.save({**sd, "payload": _RunsCode()}, path, _use_new_zipfile_serialization=not legacy)
        _raises(path, "refused")
    assert not (tmp_path / "PWNED_BY_PICKLE").exists()


@pytest.mark.parametrize(
    ("keys", "words"),
    [
        (
            {
                "model.diffusion_model.input_blocks.0.0.weight": (8, 4, 3, 3),
                "model.diffusion_model.output_blocks.0.0.in_layers.0.weight": (8,),
            },
            ["UNet"],
        ),
        (
            {
                "conv_in.weight": (8, 4, 3, 3),
                "down_blocks.0.resnets.0.conv1.weight": (8, 8, 3, 3),
                "up_blocks.0.resnets.0.conv1.weight": (8, 8, 3, 3),
            },
            ["UNet"],
        ),
        (
            {"encoder.down.0.block.0.conv1.weight": (8, 8, 3, 3), "decoder.conv_in.weight": (8, 4, 3, 3)},
            ["VAE"],
        ),
        ({"encoder.down_blocks.0.resnets.0.conv1.weight": (8, 8, 3, 3)}, ["VAE"]),
        ({"body.0.block1.weight": (8, 8, 3, 3), "conv_in.weight": (8, 192, 3, 3)}, ["T2I-Adapter"]),
        ({"adapter.body.0.resnets.0.block1.weight": (8, 8, 3, 3)}, ["T2I-Adapter"]),
        (
            {"lora_controlnet": (0,), "input_blocks.1.0.in_layers.2.down": (8, 8)},
            ["Control-LoRA", "needs the base model"],
        ),
        (
            {"task_embedding": (8, 320), "controlnet_cond_embedding.conv_in.weight": (16, 3, 3, 3)},
            ["Union", "missing"],
        ),
        (
            {"lllite_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.down.0.weight": (8, 8)},
            ["LLLite", "missing"],
        ),
        (
            {"controlnet_blocks.0.weight": (8, 8), "transformer_blocks.0.attn.to_q.weight": (8, 8)},
            ["DiT ControlNet", "SD1.x / SD2.x / SDXL"],
        ),
        ({"controlnet_x_embedder.weight": (8, 8)}, ["Flux ControlNet", "SD1.x / SD2.x / SDXL"]),
        ({"after_proj_list.18.bias": (8,)}, ["HunyuanDiT"]),
        ({"style_embedding": (1, 8, 8)}, ["style model"]),
        ({"image_proj.proj.weight": (8, 8)}, ["IP-Adapter"]),
        ({"lllite_dit_blocks_0.conditioning1.0.weight": (8, 3, 4, 4)}, ["Anima"]),
        ({"some.random.weight": (3, 3)}, ["unknown layout", "some.random.weight"]),
    ],
)
def test_wrong_kind_of_file(tmp_path, keys, words):
    path = tmp_path / "model.safetensors"
    save_file({k: torch.zeros(s) for k, s in keys.items()}, str(path))
    _raises(path, *words)


def test_incomplete_controlnet(tmp_path, sd):
    path = tmp_path / "partial.safetensors"
    save_file({k: v for k, v in sd.items() if "middle_block.2" not in k}, str(path))
    _raises(path, "missing", "middle_block.2")
    bad = dict(sd)
    bad["control_model.input_blocks.1.0.in_layers.2.bias"] = torch.zeros(5)
    save_file(bad, str(path))
    _raises(path, "shape")


def test_difference_file_needs_base_unet(tmp_path, sd):
    path = tmp_path / "diff.safetensors"
    save_file({**sd, "difference": torch.tensor([])}, str(path))
    _raises(path, "difference", "base_unet")


def test_state_dict_source_is_named(sd):
    with pytest.raises(ControlNetError, match="state dict"):
        load_controlnet({"x": torch.zeros(1)})
    with pytest.raises(ControlNetError, match="my_cn"):
        load_controlnet({"x": torch.zeros(1)}, name="my_cn")
    assert load_controlnet(to_diffusers_state_dict(tiny_controlnet("sd1"))).family == "sd1"


def test_bad_hints_and_inputs():
    cn = tiny_controlnet("sd1")
    cn.name = "canny.safetensors"
    x, hint, t, ctx, _ = random_inputs(cn, batch=2, latent=8)
    cases = [
        ((x, hint[:, :1], t, ctx), "channels"),  # 1-channel hint
        ((x, hint[:1], t, ctx), "same batch"),  # batch 1 vs 2: broadcasting is the stack's job
        ((x, hint[:, :, :32, :32], t, ctx), "8 x latent"),  # wrong size
        ((x[:, :3], hint, t, ctx), "latent"),
        ((x, hint, t, ctx[..., :8]), "context"),
        ((x, hint, t, ctx, torch.zeros(2, 16)), "y"),
        ((x, None, t, ctx), "hint"),
    ]
    for args, word in cases:
        with pytest.raises(ControlNetError) as info:
            cn(*args)
        assert "canny.safetensors" in str(info.value) and word in str(info.value), str(info.value)
    with pytest.raises(ControlNetError, match="encoded_hint"):
        cn(x, None, t, ctx, encoded_hint=torch.zeros(1, 32, 8, 8))
    with pytest.raises(ControlNetError, match="hint must have 3 channels"):
        cn.encode_hint(hint[:, :1])
    sdxl = tiny_controlnet("sdxl")
    with pytest.raises(ControlNetError, match="need y"):
        sdxl(*random_inputs(sdxl)[:4])
