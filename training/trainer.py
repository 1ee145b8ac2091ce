"""Training a ControlNet the paper's way (arXiv 2302.05543, section 3.3 and the Fill50K tutorial).

- The trainable copy starts as the base UNet's encoder (time embedding, input blocks, middle block), the hint
  encoder is new and every zero convolution is zero, so step 0 renders exactly what the base model renders.
- The base UNet stays frozen (``sd_locked``); gradients reach it only when the decoder is unlocked. The residuals go
  into the UNet through the host's own injection path (``TrainingHost.denoise``), the one ApplyHint uses at
  inference, so what is trained is exactly what is applied.
- Loss: the noise-prediction MSE. ComfyUI's models return a denoised estimate ``x0``; with ``x = x0 + sigma * eps``
  the predicted noise is ``(x - x0_hat) / sigma`` for every parameterisation (eps and v), so one loss fits all.
- Every random choice (data order, timestep, noise, prompt dropout) is a pure function of (seed, sample number), so a
  resumed run and a ``torchrun`` run with the same global batch make the same steps as one uninterrupted process.

This module imports no host code: the host glue (``TrainingHost``) lives in the patcher and is passed in.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..controlnet.config import ControlNetConfig
from ..controlnet.convert import LDM_PREFIX
from ..controlnet.loading import load_controlnet
from ..controlnet.model import ControlNet, build_controlnet
from .data import DatasetError, Row, load_example, read_rows

log = logging.getLogger(__name__)

SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")
FINAL_NAME = "controlnet.safetensors"
UNET_NAME = "unet.safetensors"
UNLOCKED_WARNING = (
    "sd_locked is off: the base UNet's decoder trains too. The paper advises this only for large datasets on "
    "strong hardware; with little data it forgets what the base model knew. The trained decoder is saved as "
    f"{UNET_NAME} (load it with UNETLoader) next to the ControlNet, which needs it."
)


class TrainingError(ValueError):
    """A training run that cannot start or go on; the message says which option or file."""


class Host(Protocol):
    """The host glue the trainer drives (``nodes.patcher.TrainingHost`` implements it)."""

    family: str
    device: torch.device

    @property
    def unet(self) -> nn.Module: ...
    @property
    def sigmas(self) -> torch.Tensor: ...
    def controlnet_config(self) -> ControlNetConfig: ...
    def encoder_state_dict(self) -> dict[str, torch.Tensor]: ...
    def encode_prompts(self, prompts: list[str], width: int, height: int) -> tuple[torch.Tensor, Any]: ...
    def encode_images(self, images: torch.Tensor) -> torch.Tensor: ...
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor: ...
    def controlnet_inputs(
        self, x: torch.Tensor, sigma: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]: ...
    def denoise(self, x, sigma, context, residuals=None, y=None) -> torch.Tensor: ...


@dataclass
class TrainConfig:
    """One training run. The defaults are the Fill50K tutorial's recipe."""

    data: str
    output: str
    resolution: int = 512
    steps: int = 1000
    batch_size: int = 4
    """Global batch: split over the processes of a torchrun launch."""
    grad_accum: int = 1
    lr: float = 1e-5
    sd_locked: bool = True
    only_mid_control: bool = False
    drop_prompt: float = 0.0
    """Probability of training a sample with the empty prompt (the paper uses 0.5), so CFG works without prompts."""
    mixed_precision: str = "auto"
    """"auto" (fp16 on CUDA, off elsewhere), "no", "fp16" or "bf16"."""
    gradient_checkpointing: bool = False
    save_every: int = 500
    validate_every: int = 500
    validation_rows: int = 4
    validation_steps: int = 20
    validation_cfg: float = 3.0
    seed: int = 0
    init: str | None = None
    """An existing ControlNet file to start from instead of the base UNet's encoder."""
    train_unet: bool = False
    """Train the whole UNet and no ControlNet (how the demo's base model is made); saved as unet.safetensors."""
    cache_latents: bool = False
    """Keep each row's VAE latent in memory after its first use (exact: the VAE is frozen and rows are not
    augmented). Saves the VAE encode on every later epoch, at 16 KB per row per 256 px of resolution."""
    save_dtype: str = "fp16"
    """dtype of the final file ("fp16", "bf16" or "fp32"); checkpoints are always fp32 (a resume is exact)."""
    prompt_cache: int = 4096

    def check(self) -> None:
        positive = ("resolution", "steps", "batch_size", "grad_accum", "save_every", "validate_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise TrainingError(
                    f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}"
                )
        if self.resolution % 8:
            raise TrainingError(f"--resolution must be a multiple of 8, got {self.resolution}")
        if not 0.0 <= self.drop_prompt <= 1.0:
            raise TrainingError(f"--drop-prompt is a probability in [0, 1], got {self.drop_prompt}")
        if not self.lr > 0:
            raise TrainingError(f"--lr must be positive, got {self.lr}")
        if self.save_dtype not in SAVE_DTYPES:
            raise TrainingError(
                f"--save-dtype must be one of {', '.join(SAVE_DTYPES)}, got {self.save_dtype!r}"
            )
        if self.mixed_precision not in ("auto", "no", "fp16", "bf16"):
            raise TrainingError(
                f"--mixed-precision must be auto, no, fp16 or bf16, got {self.mixed_precision!r}"
            )

    # what a resumed run must share with the run it resumes (everything that decides the numbers)
    RESUME_KEYS = (
        "data", "resolution", "batch_size", "grad_accum", "lr", "sd_locked", "only_mid_control", "drop_prompt",
        "mixed_precision", "seed", "init", "train_unet",
    )  # fmt: skip


# Randomness ------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)  # every sample of a step asks for its epoch's order: make it once per epoch
def epoch_order(seed: int, epoch: int, count: int) -> np.ndarray:
    """The data order of one pass over ``count`` rows (read-only: shared by the cache)."""
    order = np.random.default_rng([seed, 0x0DA7A, epoch]).permutation(count)
    order.flags.writeable = False
    return order


def sample_draws(
    seed: int, sample: int, num_timesteps: int, shape: tuple[int, ...]
) -> tuple[int, torch.Tensor, float]:
    """(timestep, noise, dropout draw) of global sample number ``sample``: the same on every process and restart."""
    rng = np.random.default_rng([seed, 0x5A3B1E, sample])
    t = int(rng.integers(0, num_timesteps))
    coin = float(rng.random())
    gen = torch.Generator().manual_seed(int(rng.integers(0, 2**63 - 1)))
    return t, torch.randn(shape, generator=gen), coin


# Distributed (torchrun) ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_world() -> World:
    """The process group of a ``torchrun`` launch (WORLD_SIZE > 1), or a single process."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return World(dist.get_rank(), dist.get_world_size())


# The trainable model ---------------------------------------------------------------------------------------------


class ControlledDenoiser(nn.Module):
    """The frozen UNet with the trainable ControlNet copy in front of it: x, sigma, hint, prompt -> predicted noise.

    One module so that DistributedDataParallel sees every trainable parameter (the copy and, when unlocked, the
    UNet's decoder) in one forward.
    """

    def __init__(self, host: Host, controlnet: ControlNet | None, only_mid_control: bool) -> None:
        super().__init__()
        self.host = host  # plain attribute: the frozen host model is not ours to move or save
        self.controlnet = controlnet
        self.unet = host.unet  # registered so DDP syncs it when unlocked (frozen tensors are only broadcast)
        self.only_mid_control = only_mid_control

    def forward(
        self, x: torch.Tensor, sigma: torch.Tensor, hint: torch.Tensor, context: torch.Tensor, y=None
    ):
        residuals = None
        if self.controlnet is not None:
            xc, timesteps = self.host.controlnet_inputs(x, sigma)
            residuals = self.controlnet(xc, hint, timesteps, context, y)
            if self.only_mid_control:  # the tutorial's option: only the middle block's residual is applied
                residuals = [None] * (len(residuals) - 1) + [residuals[-1]]
        denoised = self.host.denoise(x, sigma, context, residuals, y)
        return (x - denoised) / sigma.reshape(-1, 1, 1, 1)


def new_controlnet(host: Host, init: str | None, seed: int) -> ControlNet:
    """The paper's initialisation: the base encoder's weights, a fresh hint encoder, zero convs zero (fp32)."""
    config = host.controlnet_config()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the hint encoder's fresh weights: the same on every process
        cn = build_controlnet(config, dtype=torch.float32, name="trained ControlNet")
    if init is not None:
        loaded = load_controlnet(init, dtype=torch.float32)
        if loaded.config != config:
            raise TrainingError(
                f"--init {init}: a {loaded.config.family} ControlNet of another layout than this base model's "
                f"({config.family}); it needs the base model it was trained for"
            )
        cn.load_state_dict(loaded.state_dict())
    else:
        missing, _ = cn.load_state_dict(host.encoder_state_dict(), strict=False)
        own = ("zero_convs.", "middle_block_out.", "input_hint_block.")
        wrong = [k for k in missing if not k.startswith(own)]
        if wrong:
            raise TrainingError(f"the base UNet lacks the encoder tensors {wrong[:4]}: not an SD UNet layout")
    return cn.to(host.device).train().requires_grad_(True)


def controlnet_file_tensors(cn: ControlNet, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The ControlNet's tensors in the original ldm layout (``control_model.`` keys), as the paper's files."""
    out = {}
    for k, v in cn.state_dict().items():
        v = v.detach().cpu()
        out[LDM_PREFIX + k] = (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
    return out


# Data ------------------------------------------------------------------------------------------------------------


class PromptCache:
    """Text-encoder outputs per prompt (the encoder is frozen; prompts repeat across epochs)."""

    def __init__(self, host: Host, size: int, width: int, height: int) -> None:
        self.host, self.size, self.width, self.height = host, size, width, height
        self.items: OrderedDict[str, tuple[torch.Tensor, Any]] = OrderedDict()

    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        todo = [p for p in dict.fromkeys(prompts) if p not in self.items]
        if todo:
            context, y = self.host.encode_prompts(todo, self.width, self.height)
            for i, p in enumerate(todo):
                self.items[p] = (context[i : i + 1], None if y is None else y[i : i + 1])
        for p in prompts:
            self.items.move_to_end(p)
        contexts = [self.items[p][0] for p in prompts]
        tokens = max(c.shape[1] for c in contexts)
        if any(c.shape[1] != tokens for c in contexts):  # long prompts: repeat the shorter ones' last chunk
            contexts = [c.repeat(1, math.ceil(tokens / c.shape[1]), 1)[:, :tokens] for c in contexts]
        ys = [self.items[p][1] for p in prompts]
        while len(self.items) > self.size:
            self.items.popitem(last=False)
        return torch.cat(contexts), None if ys[0] is None else torch.cat(ys)


# The run ---------------------------------------------------------------------------------------------------------


def latest_checkpoint(output: Path) -> Path | None:
    found = [(int(m.group(1)), p) for p in output.glob("checkpoint-*") if (m := CHECKPOINT_DIR.match(p.name))]
    found = [(n, p) for n, p in found if (p / "trainer_state.json").is_file()]
    return max(found)[1] if found else None


def _autocast(config: TrainConfig, device: torch.device) -> tuple[contextlib.AbstractContextManager, bool]:
    mode = config.mixed_precision
    if mode == "auto":
        mode = "fp16" if device.type == "cuda" else "no"
    if mode == "no":
        return contextlib.nullcontext(), False
    dtype = torch.float16 if mode == "fp16" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype), mode == "fp16" and device.type == "cuda"


class Trainer:
    """One training run on one process of a (possibly distributed) launch."""

    def __init__(self, config: TrainConfig, host: Host, world: World | None = None) -> None:
        config.check()
        self.config, self.host, self.world = config, host, world or World()
        if config.batch_size % self.world.size:
            raise TrainingError(
                f"--batch-size {config.batch_size} does not split over {self.world.size} processes; use a multiple"
            )
        self.output = Path(config.output)
        self.rows: list[Row] = read_rows(config.data)
        if not self.rows:
            raise DatasetError(f"{config.data}: the dataset has no rows")
        self.sigmas = host.sigmas
        self.prompts = PromptCache(host, config.prompt_cache, config.resolution, config.resolution)
        self.controlnet = None if config.train_unet else new_controlnet(host, config.init, config.seed)
        if config.train_unet:
            host.unet.requires_grad_(True).train()
        elif not config.sd_locked:
            log.warning(UNLOCKED_WARNING)
            for name in ("output_blocks", "out"):
                getattr(host.unet, name).requires_grad_(True)
        if self.controlnet is not None:
            self.controlnet.gradient_checkpointing = config.gradient_checkpointing
        self.model = ControlledDenoiser(host, self.controlnet, config.only_mid_control)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.step = 0
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr)
        self.autocast, use_scaler = _autocast(config, host.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
        self.ddp = self.model
        if self.world.size > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [host.device.index] if host.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(
                self.model, device_ids=ids, find_unused_parameters=config.only_mid_control
            )
        self.losses: list[tuple[int, float]] = []
        self._latents: dict[int, torch.Tensor] = {}

    # one global step ---------------------------------------------------------------------------------------------
    def _local_samples(self, micro: int) -> range:
        """Global sample numbers of this process's share of one micro-batch."""
        c, per = self.config, self.config.batch_size // self.world.size
        first = (self.step * c.grad_accum + micro) * c.batch_size + self.world.rank * per
        return range(first, first + per)

    def _batch(self, samples: range) -> dict[str, torch.Tensor]:
        c, n = self.config, len(self.rows)
        hints, latents, prompts, ts, noises = [], [], [], [], []
        device = self.host.device
        for g in samples:
            index = int(epoch_order(c.seed, g // n, n)[g % n])
            hint, target, prompt = load_example(self.rows[index], c.resolution)
            t, noise, coin = sample_draws(c.seed, g, len(self.sigmas), self._latent_shape)
            hints.append(hint)
            latents.append(self._latent(index, target))
            prompts.append("" if coin < c.drop_prompt else prompt)
            ts.append(t)
            noises.append(noise)
        x0 = torch.cat(latents)
        context, y = self.prompts(prompts)
        sigma = self.sigmas[torch.tensor(ts)].to(device)
        noise = torch.stack(noises).to(device)
        return {
            "x": x0 + noise * sigma.reshape(-1, 1, 1, 1),
            "sigma": sigma,
            "hint": torch.stack(hints).to(device),
            "context": context,
            "y": y,
            "noise": noise,
        }

    def _latent(self, index: int, target: torch.Tensor) -> torch.Tensor:
        # One row per encode, cached or not: a latent never depends on which rows share its batch, so a resumed
        # run (whose cache starts empty) sees the same bits.
        latent = self._latents.get(index)
        if latent is None:
            latent = self.host.encode_images(target[None].to(self.host.device))
            if self.config.cache_latents:
                self._latents[index] = latent
        return latent

    @property
    def _latent_shape(self) -> tuple[int, int, int]:
        r = self.config.resolution // 8
        return (4, r, r)

    def train_step(self) -> float:
        c = self.config
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for micro in range(c.grad_accum):
            batch = self._batch(self._local_samples(micro))
            sync = micro == c.grad_accum - 1 or self.ddp is self.model
            with contextlib.nullcontext() if sync else self.ddp.no_sync(), self.autocast:
                eps = self.ddp(batch["x"], batch["sigma"], batch["hint"], batch["context"], batch["y"])
                loss = torch.nn.functional.mse_loss(eps.float(), batch["noise"].float())
            self.scaler.scale(loss / c.grad_accum).backward()
            total += float(loss.detach()) / c.grad_accum
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.step += 1
        if self.world.size > 1:  # the loss shown is the global batch's
            import torch.distributed as dist

            t = torch.tensor([total], device=self.host.device)
            dist.all_reduce(t)
            total = float(t) / self.world.size
        return total

    # files -------------------------------------------------------------------------------------------------------
    def trainable_tensors(self, dtype: torch.dtype | None = None) -> dict[str, dict[str, torch.Tensor]]:
        """File name -> tensors of what this run trains (the ControlNet, and the UNet when it trains)."""
        out = {}
        if self.controlnet is not None:
            out[FINAL_NAME] = controlnet_file_tensors(self.controlnet, dtype)
        if self.config.train_unet or not self.config.sd_locked:
            out[UNET_NAME] = {
                k: (
                    v.detach().cpu().to(dtype)
                    if dtype is not None and v.is_floating_point()
                    else v.detach().cpu()
                )
                for k, v in self.host.unet.state_dict().items()
            }
        return out

    def _metadata(self) -> dict[str, str]:
        return {"controlstack_training": json.dumps(asdict(self.config)), "step": str(self.step)}

    def save_checkpoint(self) -> Path:
        folder = self.output / f"checkpoint-{self.step}"
        if self.world.main:
            tmp = folder.with_name(folder.name + ".partial")
            tmp.mkdir(parents=True, exist_ok=True)
            for name, tensors in self.trainable_tensors().items():  # fp32: a resume continues bit for bit
                save_file(tensors, str(tmp / name), metadata=self._metadata())
            torch.save(
                {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict()},
                tmp / "optimizer.pt",
            )
            state = {"step": self.step, "config": asdict(self.config), "losses": self.losses}
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
            if folder.exists():
                import shutil

                shutil.rmtree(folder)
            tmp.rename(folder)
        self._barrier()
        return folder

    def resume(self, folder: Path) -> None:
        state = json.loads((folder / "trainer_state.json").read_text())
        old = state["config"]
        changed = [k for k in TrainConfig.RESUME_KEYS if old.get(k) != getattr(self.config, k)]
        if changed:
            raise TrainingError(
                f"{folder}: cannot resume with other {', '.join('--' + k.replace('_', '-') for k in changed)} "
                f"(the checkpoint has {', '.join(f'{k}={old.get(k)!r}' for k in changed)})"
            )
        if self.controlnet is not None:
            sd = load_file(str(folder / FINAL_NAME))
            self.controlnet.load_state_dict({k[len(LDM_PREFIX) :]: v for k, v in sd.items()})
        if (folder / UNET_NAME).is_file():
            self.host.unet.load_state_dict(load_file(str(folder / UNET_NAME)))
        opt = torch.load(folder / "optimizer.pt", map_location=self.host.device, weights_only=True)
        self.optimizer.load_state_dict(opt["optimizer"])
        self.scaler.load_state_dict(opt["scaler"])
        self.step, self.losses = int(state["step"]), [tuple(x) for x in state["losses"]]
        log.info("resumed from %s at step %d", folder, self.step)

    def save_final(self) -> dict[str, Path]:
        paths, dtype = {}, SAVE_DTYPES[self.config.save_dtype]
        if self.world.main:
            self.output.mkdir(parents=True, exist_ok=True)
            for name, tensors in self.trainable_tensors(dtype).items():
                paths[name] = self.output / name
                save_file(tensors, str(paths[name]), metadata=self._metadata())
            (self.output / "losses.json").write_text(json.dumps(self.losses))
        self._barrier()
        return paths

    def _barrier(self) -> None:
        if self.world.size > 1:
            import torch.distributed as dist

            dist.barrier()

    # validation --------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self, hints: torch.Tensor, prompts: list[str], seed: int, steps: int, cfg: float
    ) -> torch.Tensor:
        """Euler sampling with CFG (the control on both halves), on the model's own noise levels -> images [0, 1]."""
        was = self.model.training
        self.model.eval()
        try:
            b, device = hints.shape[0], self.host.device
            context, y = self.prompts(prompts + [""] * b)
            idx = torch.linspace(len(self.sigmas) - 1, 0, steps).round().long()
            sigmas = torch.cat([self.sigmas[idx], torch.zeros(1)]).to(device)
            gen = torch.Generator().manual_seed(seed)
            x = torch.randn((b, *self._latent_shape), generator=gen).to(device) * sigmas[0]
            hint2 = torch.cat([hints, hints]).to(device)
            for i in range(steps):
                s = sigmas[i].expand(2 * b)
                with self.autocast:
                    eps = self.model(torch.cat([x, x]), s, hint2, context, y).float()
                cond, uncond = eps.chunk(2)
                d = uncond + cfg * (cond - uncond)  # dx/dsigma of the Euler ODE in eps form
                x = x + d * (sigmas[i + 1] - sigmas[i])
            return self.host.decode_latents(x)
        finally:
            self.model.train(was)

    @torch.no_grad()
    def evaluate(self, samples: range) -> float:
        """Mean loss over the given global sample numbers, without training (e.g. a held-out range)."""
        was = self.model.training
        self.model.eval()
        try:
            b = self._batch(samples)
            with self.autocast:
                eps = self.model(b["x"], b["sigma"], b["hint"], b["context"], b["y"])
            return float(torch.nn.functional.mse_loss(eps.float(), b["noise"].float()))
        finally:
            self.model.train(was)

    def validate(self) -> Path | None:
        if not self.world.main:
            return None
        c = self.config
        picked = [load_example(r, c.resolution) for r in self.rows[: c.validation_rows]]
        hints = torch.stack([p[0] for p in picked])
        images = self.sample(hints, [p[2] for p in picked], c.seed, c.validation_steps, c.validation_cfg)
        targets = torch.stack([(p[1] + 1) / 2 for p in picked])
        grid = torch.cat(
            [torch.cat([h, s, t], dim=2) for h, s, t in zip(hints, images, targets, strict=True)], 1
        )
        path = self.output / "validation" / f"step_{self.step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        from PIL import Image

        pixels = (grid.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(pixels).save(path)  # rows: hint | sample | target
        return path

    # the loop ----------------------------------------------------------------------------------------------------
    def run(self, progress: Callable[[Iterator[int]], Iterator[int]] | None = None) -> dict[str, Path]:
        c = self.config
        steps = range(self.step, c.steps)
        bar = progress(steps) if progress and self.world.main else steps
        started = time.perf_counter()
        try:
            for _ in bar:
                loss = self.train_step()
                self.losses.append((self.step, loss))
                if hasattr(bar, "set_postfix"):
                    bar.set_postfix(loss=f"{loss:.4f}")
                if self.step % c.validate_every == 0:
                    self.validate()
                # the last step too: `--steps N --resume` goes on from it
                if self.step % c.save_every == 0 or self.step == c.steps:
                    self.save_checkpoint()
        except KeyboardInterrupt:
            if self.world.size == 1 and self.step and not (self.output / f"checkpoint-{self.step}").exists():
                log.warning("interrupted: saving checkpoint-%d so that --resume goes on from here", self.step)
                self.save_checkpoint()
            raise
        paths = self.save_final()
        if self.world.main:
            log.info("trained %d steps in %.1f s", len(steps), time.perf_counter() - started)
        return paths
