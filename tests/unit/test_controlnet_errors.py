"""Every bad input raises ControlNetError with a message naming the file and what was found."""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import pytest
import torch
from cn_helpers import random_inputs, tiny_controlnet, to_diffusers_state_dict
from controlstack.controlnet import ControlNetError, load_controlnet
from controlstack.controlnet.kinds import describe_file, file_kind, load_control
from controlstack.controlnet.loading import read_tensors
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


# Every public entry that opens a control file: each must turn every bad file into ControlNetError naming it.
ENTRIES = {
    "load_control": load_control,
    "load_controlnet": load_controlnet,
    "file_kind": file_kind,
    "describe_file": describe_file,
    "read_tensors": read_tensors,
}
BAD_FILES = {
    "missing.safetensors": None,
    "empty.pth": b"",
    "garbage.ckpt": bytes(range(256)) * 16,
    "bad_json.safetensors": b"\x10\x00\x00\x00\x00\x00\x00\x00{not json!!!!!!}",
    "huge_header.safetensors": (2**62).to_bytes(8, "little") + b"{}",
    "not_a_pickle.pth": b"\x80\x02K\x01K\x02\x85" + bytes(64),  # a pickle that never STOPs
    "text.bin": b"just some text, not a checkpoint\n" * 8,
}


@pytest.mark.parametrize("entry", sorted(ENTRIES))
@pytest.mark.parametrize("bad", sorted(BAD_FILES))
def test_every_entry_refuses_bad_files_by_name(tmp_path, entry, bad):
    """Not "is a ValueError": every entry point x every kind of broken file -> the one error type, naming the
    file and saying what is wrong (a traceback of IndexError / UnpicklingError here would reach the user)."""
    path = tmp_path / bad
    if BAD_FILES[bad] is not None:
        path.write_bytes(BAD_FILES[bad])
    with pytest.raises(ControlNetError) as info:
        ENTRIES[entry](path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: "), msg
    assert any(w in msg for w in ("no such file", "empty", "corrupt", "safetensors", "not a checkpoint")), msg
    assert "weights_only" not in msg, msg
    # ComfyUI shows a ValueError's text as is; callers catching ValueError keep working
    assert isinstance(info.value, ValueError)


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
    """Unpickling calls os.system(command): what a malicious checkpoint does."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _Custom:
    """A class that is not a tensor: unpickling it would import this module."""


def _hand_pickles(marker: Path) -> dict[str, bytes]:
    """Pickles that ask to run code, written opcode by opcode (GLOBAL / INST / STACK_GLOBAL + REDUCE)."""
    cmd = f"touch {marker}".encode()
    return {
        # protocol 0: GLOBAL 'os system', MARK, STRING, TUPLE, REDUCE, STOP
        "global_p0": b"cos\nsystem\n(S'" + cmd + b"'\ntR.",
        # INST: MARK, STRING, INST 'os system' (calls it with the marked args), STOP
        "inst_p0": b"(S'" + cmd + b"'\nios\nsystem\n.",
        # protocol 2: GLOBAL builtins.exec with a code string
        "exec_p2": b"\x80\x02cbuiltins\nexec\nq\x00X"
        + len(b"open('%s', 'w')" % str(marker).encode()).to_bytes(4, "little")
        + b"open('%s', 'w')" % str(marker).encode()
        + b"\x85R.",
        # protocol 4 (FRAME, STACK_GLOBAL): torch's unpickler stops at FRAME without naming the import
        "stack_global_p4": pickle.dumps(_RunsCode(f"touch {marker}"), protocol=4),
        "dict_p5": pickle.dumps({"w": torch.zeros(2), "x": _RunsCode(f"touch {marker}")}, protocol=5),
    }


def _assert_refused_code(path: Path, imported: str, msg: str) -> None:
    assert msg.startswith(f"{path}: refused to unpickle"), msg
    assert "asks to import " in msg and f" {imported}" in msg.split(", which is")[0], msg  # what it imports
    assert "Nothing from it was run" in msg, msg
    assert ".safetensors" in msg and "save_file" in msg, msg  # how to convert it
    assert "weights_only" not in msg and "safe_globals" not in msg, msg  # never advice to turn safety off


def test_pickle_that_would_run_code_is_refused(tmp_path, monkeypatch, sd):
    """Zip and legacy torch.save files, raw pickles of every protocol: all get the same message, none runs."""
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "PWNED_BY_PICKLE"
    system = os.system.__module__ + ".system"  # posix.system on Linux
    messages = {}
    for legacy in (False, True):
        for payload, imported in ((_RunsCode(f"touch {marker}"), system), (_Custom(), f"{__name__}._Custom")):
            path = tmp_path / f"evil_{legacy}_{type(payload).__name__}.pth"
            torch.save({**sd, "payload": payload}, path, _use_new_zipfile_serialization=not legacy)
            msg = _raises(path)
            _assert_refused_code(path, imported, msg)
            messages[legacy, imported] = msg.removeprefix(str(path))
    # legacy and zip: the same message
    assert messages[False, system] == messages[True, system]
    assert messages[False, f"{__name__}._Custom"] == messages[True, f"{__name__}._Custom"]
    for kind, data in _hand_pickles(marker).items():
        path = tmp_path / f"{kind}.ckpt"
        path.write_bytes(data)
        imported = {"global_p0": "os.system", "inst_p0": "os.system", "exec_p2": "builtins.exec"}.get(
            kind, system
        )
        _assert_refused_code(path, imported, _raises(path))
        with pytest.raises(ControlNetError, match="refused to unpickle"):
            file_kind(path)
    assert not marker.exists()
    # the same bytes DO run code through a plain unpickler: the payload is live, the refusal is what stopped it
    pickle.loads(_hand_pickles(marker)["global_p0"])
    assert marker.exists()


def test_pickle_refusal_before_torch_sees_it(tmp_path, sd):
    """Refusal comes from our opcode scan, so it holds even where torch's own unpickler would fail first
    (protocol 4 frames) or name nothing: the message names the import in both formats."""
    marker = tmp_path / "ran"
    data = _hand_pickles(marker)["stack_global_p4"]
    with pytest.raises(pickle.UnpicklingError) as info:  # torch alone: a vague "Unsupported operand"
        torch.load(io.BytesIO(data), weights_only=True)
    assert "system" not in str(info.value)
    path = tmp_path / "p4.pth"
    path.write_bytes(data)
    _assert_refused_code(path, os.system.__module__ + ".system", _raises(path))
    assert not marker.exists()


def test_corrupt_pickle_message_has_no_torch_advice(tmp_path, sd):
    """A pickle torch rejects for another reason: "corrupt", the reason, and none of torch's advice."""
    path = tmp_path / "opcode.pth"
    path.write_bytes(b"\x80\x02}q\x00X\x01\x00\x00\x00a\x93.")  # STACK_GLOBAL on a 1-item stack
    msg = _raises(path, "corrupt")
    assert "weights_only" not in msg and "file an issue" not in msg, msg


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
