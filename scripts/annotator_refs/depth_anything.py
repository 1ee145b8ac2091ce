"""Reference side of the Depth Anything V2 annotator: transformers' DepthAnythingForDepthEstimation + the authors'
transforms.

Test/bench code only (imports transformers). Neither the authors' ``depth_anything_v2`` package nor
comfyui_controlnet_aux is installed, so the reference is:

* the network: transformers 5.x ``DepthAnythingForDepthEstimation`` with the V2 config of transformers'
  ``convert_depth_anything_to_hf.py`` (``get_dpt_config`` for "depth-anything-v2-{small,base,large}": DINOv2 with
  ``out_indices`` [3, 6, 9, 12] / [3, 6, 9, 12] / [5, 12, 18, 24], ``apply_layernorm``, relative head), holding
  weights mapped from the authors' layout by that script's ``create_rename_keys`` + ``read_in_q_k_v``
  (replicated here: the script is not shipped in the wheel). The DINOv2 config is what
  ``Dinov2Config.from_pretrained("facebook/dinov2-{small,base,large}")`` gives (written out: nothing downloads).
  One deliberate change: transformers resizes the 37 x 37 position embeddings with ``size=(h, w)``, the authors'
  DINOv2 (which runs the published files, also in comfyui_controlnet_aux) with ``scale_factor=(h + 0.1) / 37``,
  which samples other positions. :func:`reference_network` swaps in the authors' formula (``authors_pos=False``
  keeps transformers' own, which equals the authors' only at 518 x 518 where nothing is resized).
* the detector: the authors' ``image2tensor`` (``Resize`` lower_bound / multiple of 14 / ``cv2.INTER_CUBIC`` on
  the float64 image / 255, ``NormalizeImage``, ``PrepareForNet``), the forward, ``infer_image``'s bilinear
  (align_corners) resize back, and comfyui_controlnet_aux's ``DepthAnythingV2Detector.__call__`` normalisation
  ``((d - d.min()) / (d.max() - d.min()) * 255.0).astype(uint8)`` repeated to 3 channels.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "SIZES",
    "hf_config",
    "rename_keys",
    "authors_to_hf",
    "published_shapes",
    "published_state_dict",
    "reference_network",
    "reference_resized_size",
    "reference_detect_all",
    "reference_detect",
]

# get_dpt_config's per-size settings (facebook/dinov2-* configs: 12/12/24 layers, 6/12/16 heads).
SIZES = {
    "vits": {"hidden_size": 384, "layers": 12, "heads": 6, "out_indices": [3, 6, 9, 12], "fusion": 64,
             "neck": [48, 96, 192, 384]},
    "vitb": {"hidden_size": 768, "layers": 12, "heads": 12, "out_indices": [3, 6, 9, 12], "fusion": 128,
             "neck": [96, 192, 384, 768]},
    "vitl": {"hidden_size": 1024, "layers": 24, "heads": 16, "out_indices": [5, 12, 18, 24], "fusion": 256,
             "neck": [256, 512, 1024, 1024]},
}  # fmt: skip


def hf_config(size: str = "vits"):
    """The DepthAnythingConfig ``get_dpt_config("depth-anything-v2-<small|base|large>")`` builds."""
    from transformers import DepthAnythingConfig, Dinov2Config

    s = SIZES[size]
    backbone = Dinov2Config(
        hidden_size=s["hidden_size"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        mlp_ratio=4,
        image_size=518,
        patch_size=14,
        layerscale_value=1.0,
        layer_norm_eps=1e-6,
        qkv_bias=True,
        use_swiglu_ffn=False,
        out_indices=s["out_indices"],
        apply_layernorm=True,
        reshape_hidden_states=False,
    )
    return DepthAnythingConfig(
        reassemble_hidden_size=backbone.hidden_size,
        patch_size=backbone.patch_size,
        backbone_config=backbone,
        fusion_hidden_size=s["fusion"],
        neck_hidden_sizes=s["neck"],
        depth_estimation_type="relative",
        # The script passes max_depth=None for relative models, which transformers 4 turned into 1 (the head
        # multiplies by it); transformers 5 keeps None, so give its default, 1, explicitly.
        max_depth=1,
    )


def rename_keys(num_layers: int) -> list[tuple[str, str]]:
    """(authors' name, transformers' name) pairs: ``create_rename_keys`` of the conversion script."""
    keys = [
        ("pretrained.cls_token", "backbone.embeddings.cls_token"),
        ("pretrained.mask_token", "backbone.embeddings.mask_token"),
        ("pretrained.pos_embed", "backbone.embeddings.position_embeddings"),
        ("pretrained.patch_embed.proj.weight", "backbone.embeddings.patch_embeddings.projection.weight"),
        ("pretrained.patch_embed.proj.bias", "backbone.embeddings.patch_embeddings.projection.bias"),
    ]
    for i in range(num_layers):
        src, dst = f"pretrained.blocks.{i}", f"backbone.encoder.layer.{i}"
        keys += [
            (f"{src}.ls1.gamma", f"{dst}.layer_scale1.lambda1"),
            (f"{src}.ls2.gamma", f"{dst}.layer_scale2.lambda1"),
        ]
        for p in ("weight", "bias"):
            keys += [
                (f"{src}.norm1.{p}", f"{dst}.norm1.{p}"),
                (f"{src}.norm2.{p}", f"{dst}.norm2.{p}"),
                (f"{src}.mlp.fc1.{p}", f"{dst}.mlp.fc1.{p}"),
                (f"{src}.mlp.fc2.{p}", f"{dst}.mlp.fc2.{p}"),
                (f"{src}.attn.proj.{p}", f"{dst}.attention.output.dense.{p}"),
            ]
    keys += [
        ("pretrained.norm.weight", "backbone.layernorm.weight"),
        ("pretrained.norm.bias", "backbone.layernorm.bias"),
    ]
    for i in range(4):
        for p in ("weight", "bias"):
            keys.append((f"depth_head.projects.{i}.{p}", f"neck.reassemble_stage.layers.{i}.projection.{p}"))
            if i != 2:
                keys.append(
                    (f"depth_head.resize_layers.{i}.{p}", f"neck.reassemble_stage.layers.{i}.resize.{p}")
                )
    # The fusion stage runs coarse to fine: authors' refinenet4 is transformers' layer 0.
    for i, j in {1: 3, 2: 2, 3: 1, 4: 0}.items():
        src, dst = f"depth_head.scratch.refinenet{i}", f"neck.fusion_stage.layers.{j}"
        for p in ("weight", "bias"):
            keys.append((f"{src}.out_conv.{p}", f"{dst}.projection.{p}"))
            for unit in (1, 2):
                for conv in (1, 2):
                    keys.append(
                        (
                            f"{src}.resConfUnit{unit}.conv{conv}.{p}",
                            f"{dst}.residual_layer{unit}.convolution{conv}.{p}",
                        )
                    )
    keys += [(f"depth_head.scratch.layer{i + 1}_rn.weight", f"neck.convs.{i}.weight") for i in range(4)]
    for p in ("weight", "bias"):
        keys += [
            (f"depth_head.scratch.output_conv1.{p}", f"head.conv1.{p}"),
            (f"depth_head.scratch.output_conv2.0.{p}", f"head.conv2.{p}"),
            (f"depth_head.scratch.output_conv2.2.{p}", f"head.conv3.{p}"),
        ]
    return keys


# transformers 5 renamed DINOv2's attention; its loader maps the (4.x) names the conversion script writes with
# these renamings (``conversion_mapping.py``, "Dinov2Model"). ``load_state_dict`` does not, so they are applied here.
_V5_RENAMES = (
    ("attention.attention.query", "attention.q_proj"),
    ("attention.attention.key", "attention.k_proj"),
    ("attention.attention.value", "attention.v_proj"),
    ("attention.output.dense", "attention.o_proj"),
)


def _v5_name(key: str) -> str:
    for old, new in _V5_RENAMES:
        key = key.replace(old, new)
    return key


def authors_to_hf(sd: dict[str, torch.Tensor], size: str = "vits") -> dict[str, torch.Tensor]:
    """The conversion script's mapping (renames, each ``attn.qkv`` split into query / key / value), then
    transformers 5's renaming of the DINOv2 attention."""
    s = SIZES[size]
    out = dict(sd)
    for src, dst in rename_keys(s["layers"]):
        out[dst] = out.pop(src)
    d = s["hidden_size"]
    for i in range(s["layers"]):
        w, b = (
            out.pop(f"pretrained.blocks.{i}.attn.qkv.weight"),
            out.pop(f"pretrained.blocks.{i}.attn.qkv.bias"),
        )
        dst = f"backbone.encoder.layer.{i}.attention.attention"
        for k, name in enumerate(("query", "key", "value")):
            out[f"{dst}.{name}.weight"] = w[k * d : (k + 1) * d]
            out[f"{dst}.{name}.bias"] = b[k * d : (k + 1) * d]
    return {_v5_name(k): v for k, v in out.items()}


def _meta_model(size: str) -> nn.Module:
    from transformers import DepthAnythingForDepthEstimation

    with torch.device("meta"):
        return DepthAnythingForDepthEstimation(hf_config(size))


def published_shapes(size: str = "vits") -> dict[str, torch.Size]:
    """Names and shapes of ``depth_anything_v2_<size>.pth``: transformers' V2 model mapped back to the authors'
    names (the inverse of the conversion script; query / key / value rows stacked into ``attn.qkv``)."""
    hf = {k: v.shape for k, v in _meta_model(size).state_dict().items()}
    s = SIZES[size]
    out = {src: hf.pop(_v5_name(dst)) for src, dst in rename_keys(s["layers"])}
    for i in range(s["layers"]):
        src, dst = f"pretrained.blocks.{i}.attn.qkv", f"backbone.encoder.layer.{i}.attention.attention"
        for p in ("weight", "bias"):
            parts = [hf.pop(_v5_name(f"{dst}.{name}.{p}")) for name in ("query", "key", "value")]
            out[f"{src}.{p}"] = torch.Size([sum(t[0] for t in parts), *parts[0][1:]])
    assert not hf, f"transformers tensors the conversion does not map: {sorted(hf)[:5]}"
    return out


def published_state_dict(seed: int = 0, size: str = "vits", device: str = "cpu") -> dict[str, torch.Tensor]:
    """Seeded random weights in the layout of ``depth_anything_v2_<size>.pth`` (authors' names, no prefix), in
    sorted key order; ``device="meta"`` gives shape-only tensors (for the large sizes).

    Scaled for a non-degenerate forward: weights ~ N(0, 1/fan_in), norm scales ~ 1 +- 0.1, layer scales
    ~ 0.5 +- 0.1, small biases, position embeddings large enough that a wrong resize shows, and a zero-mean last
    conv with a positive bias so the final ReLU (non-negative depth) keeps most pixels.
    """
    shapes = published_shapes(size)
    if device == "meta":
        return {k: torch.empty(v, device="meta") for k, v in sorted(shapes.items())}
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in sorted(shapes.items()):
        noise = torch.randn(shape, generator=g)
        if key.endswith(("cls_token", "pos_embed", "mask_token")):
            value = 0.5 * noise
        elif key.endswith(".gamma"):
            value = 0.5 + 0.1 * noise
        elif len(shape) >= 2:
            # ConvTranspose weights are (in, out, k, k): fan_in is what one output sums over.
            transposed = key.startswith(("depth_head.resize_layers.0.", "depth_head.resize_layers.1."))
            fan_in = shape[0] if transposed else math.prod(shape[1:])
            value = noise / math.sqrt(fan_in)
        elif key.endswith(".weight"):
            value = 1.0 + 0.1 * noise
        else:
            value = 0.05 * noise
        out[key] = value.contiguous()
    # depth = ReLU(w . f + b) with f >= 0 (post-ReLU features): the sign of sum(w) would decide for all pixels at
    # once. Zero-mean weights and a positive bias keep the map mostly positive and varying.
    w = out["depth_head.scratch.output_conv2.2.weight"]
    out["depth_head.scratch.output_conv2.2.weight"] = w - w.mean()
    out["depth_head.scratch.output_conv2.2.bias"] = out["depth_head.scratch.output_conv2.2.bias"] + 1.0
    return out


def _authors_interpolate_pos_encoding(
    self, embeddings: torch.Tensor, height: int, width: int
) -> torch.Tensor:
    """The authors' DINOv2 ``interpolate_pos_encoding`` (interpolate_offset 0.1, no antialias) in transformers'
    ``Dinov2Embeddings`` signature (``height``, ``width`` in pixels)."""
    npatch = embeddings.shape[1] - 1
    n = self.position_embeddings.shape[1] - 1
    if npatch == n and height == width:
        return self.position_embeddings
    previous_dtype = embeddings.dtype
    pos_embed = self.position_embeddings.float()
    class_pos_embed, patch_pos_embed = pos_embed[:, 0], pos_embed[:, 1:]
    dim = embeddings.shape[-1]
    patch = self.patch_embeddings.patch_size[0]
    h0, w0 = height // patch + 0.1, width // patch + 0.1
    sqrt_n = math.sqrt(n)
    patch_pos_embed = F.interpolate(
        patch_pos_embed.reshape(1, int(sqrt_n), int(sqrt_n), dim).permute(0, 3, 1, 2),
        scale_factor=(float(h0) / sqrt_n, float(w0) / sqrt_n),
        mode="bicubic",
        antialias=False,
    )
    assert int(h0) == patch_pos_embed.shape[-2] and int(w0) == patch_pos_embed.shape[-1]
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1).to(previous_dtype)


def reference_network(sd: dict[str, torch.Tensor], size: str = "vits", authors_pos: bool = True) -> nn.Module:
    """transformers' ``DepthAnythingForDepthEstimation`` (V2 config) holding the authors'-layout ``sd`` mapped by
    the conversion script, loaded strictly, in eval. ``authors_pos``: resize position embeddings as the authors'
    DINOv2 (see the module docstring)."""
    model = _meta_model(size)
    model.load_state_dict(authors_to_hf(sd, size), strict=True, assign=True)
    if authors_pos:
        embeddings = model.backbone.embeddings
        embeddings.interpolate_pos_encoding = _authors_interpolate_pos_encoding.__get__(embeddings)
    return model.eval()


def reference_resized_size(height: int, width: int, input_size: int = 518) -> tuple[int, int]:
    """The authors' ``Resize.get_size`` (width = height = input_size, keep_aspect_ratio, ensure_multiple_of 14,
    lower_bound) as (height, width)."""
    multiple = 14

    def constrain_to_multiple_of(x: float, min_val: int = 0) -> int:
        y = (np.round(x / multiple) * multiple).astype(int)
        if y < min_val:
            y = (np.ceil(x / multiple) * multiple).astype(int)
        return int(y)

    scale_height, scale_width = input_size / height, input_size / width
    if scale_width > scale_height:
        scale_height = scale_width
    else:
        scale_width = scale_height
    new_height = constrain_to_multiple_of(scale_height * height, min_val=input_size)
    new_width = constrain_to_multiple_of(scale_width * width, min_val=input_size)
    return new_height, new_width


_MEAN = np.array([0.485, 0.456, 0.406])
_STD = np.array([0.229, 0.224, 0.225])


def reference_detect_all(
    sd: dict[str, torch.Tensor], images_uint8: list[np.ndarray], input_size: int = 518, size: str = "vits"
) -> dict[str, list]:
    """The hint of each H x W x 3 uint8 RGB frame (H x W x 3 uint8), one frame at a time as the preprocessor.

    Returns {"hint": [...], "input": [...], "raw": [...]}: per frame also the 1 x 3 x h x w tensor fed to the
    network and the 1 x h x w depth it returned (so a test can check the network on the same forward).
    The preprocessor's final ``resize_image_with_pad(hint, detect_resolution)`` is the identity at
    detect_resolution = the short side for 64-multiple sizes, so it is left out (asserted by shape here).
    """
    model = reference_network(sd, size)
    result: dict[str, list] = {"hint": [], "input": [], "raw": []}
    for raw_image in images_uint8:
        h, w = raw_image.shape[:2]
        # The preprocessor hands infer_image BGR and image2tensor turns it back to RGB: net RGB / 255 (float64).
        image = raw_image / 255.0
        new_h, new_w = reference_resized_size(h, w, input_size)
        image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_CUBIC)
        image = (image - _MEAN) / _STD
        image = np.ascontiguousarray(np.transpose(image, (2, 0, 1))).astype(np.float32)
        x = torch.from_numpy(image).unsqueeze(0)
        with torch.no_grad():
            depth = model(pixel_values=x).predicted_depth
        result["input"].append(x)
        result["raw"].append(depth.clone())
        depth = F.interpolate(depth[:, None], (h, w), mode="bilinear", align_corners=True)[0, 0].numpy()
        depth = (depth - depth.min()) / (depth.max() - depth.min()) * 255.0
        depth = depth.astype(np.uint8)
        hint = np.repeat(depth[:, :, None], 3, axis=2)
        assert hint.shape == raw_image.shape
        result["hint"].append(hint)
    return result


def reference_detect(
    sd: dict[str, torch.Tensor], images_uint8: list[np.ndarray], input_size: int = 518, size: str = "vits"
) -> list[np.ndarray]:
    """The Depth Anything V2 hint of each frame, H x W x 3 uint8."""
    return reference_detect_all(sd, images_uint8, input_size=input_size, size=size)["hint"]
