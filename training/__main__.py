"""``python -m controlstack.training``: train a ControlNet for a checkpoint you have, or write synthetic Fill50K data.

    python -m controlstack.training train --checkpoint v1-5-pruned-emaonly.safetensors --data fill50k --output runs/a
    torchrun --nproc-per-node 2 -m controlstack.training train ...      # several GPUs (or CPU processes: gloo)
    python -m controlstack.training fill50k data/circles --count 1000 --size 64

The checkpoint is a path or a name in ComfyUI's ``models/checkpoints`` (``--comfyui`` or ``COMFYUI_PATH`` says where
ComfyUI is; by default the ComfyUI this pack is installed in). Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .data import DatasetError, write_synthetic_fill50k
from .trainer import TrainConfig, Trainer, TrainingError, init_world, latest_checkpoint

PACK = Path(__file__).resolve().parent.parent


def _comfy_dir(given: str | None) -> Path:
    candidates = [given, os.environ.get("COMFYUI_PATH"), PACK.parent.parent, PACK / ".host" / "comfyui"]
    for c in candidates:
        if c and (Path(c) / "comfy" / "sd.py").is_file():
            return Path(c).resolve()
    raise TrainingError(
        "ComfyUI not found: pass --comfyui DIR or set COMFYUI_PATH (looked in "
        + ", ".join(str(c) for c in candidates if c)
        + ")"
    )


def _import_host(comfy_dir: Path):
    if str(comfy_dir) not in sys.path:
        sys.path.insert(0, str(comfy_dir))
    import torch
    from comfy.cli_args import args  # its defaults: no argv is parsed outside ComfyUI's main.py

    if not torch.cuda.is_available():
        args.cpu = True  # what `main.py --cpu` sets; ComfyUI's device probe otherwise asks CUDA

    from ..nodes.patcher import TrainingHost

    return TrainingHost


def _checkpoint_path(name: str) -> str:
    if Path(name).is_file():
        return name
    import folder_paths

    found = folder_paths.get_full_path("checkpoints", name)
    if found is None:
        folders = folder_paths.get_folder_paths("checkpoints")
        raise TrainingError(
            f"--checkpoint {name}: no such file, and not in ComfyUI's checkpoint folders {folders}"
        )
    return found


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m controlstack.training", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a ControlNet (defaults: the Fill50K tutorial's recipe)")
    t.add_argument("--checkpoint", required=True, help="base SD1.x / SD2.x / SDXL checkpoint (path or name)")
    t.add_argument(
        "--data", required=True, help="a Fill50K folder (prompt.json) or an image folder (metadata.jsonl)"
    )
    t.add_argument(
        "--output", required=True, help="folder for checkpoints, validation images and the final file"
    )
    t.add_argument("--comfyui", help="the ComfyUI folder (default: COMFYUI_PATH or the one this pack is in)")
    d = TrainConfig(data="", output="")
    t.add_argument("--resolution", type=int, default=d.resolution)
    t.add_argument("--steps", type=int, default=d.steps, help="optimizer steps in all (resume counts on)")
    t.add_argument("--batch-size", type=int, default=d.batch_size, help="global batch, split over processes")
    t.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per optimizer step")
    t.add_argument("--lr", type=float, default=d.lr)
    t.add_argument(
        "--unlock-decoder",
        action="store_true",
        help="train the base UNet's decoder too (sd_locked off; only for large datasets: it forgets the base)",
    )
    t.add_argument("--only-mid-control", action="store_true", help="apply only the middle block's residual")
    t.add_argument(
        "--drop-prompt", type=float, default=d.drop_prompt, help="share of samples with an empty prompt"
    )
    t.add_argument("--mixed-precision", default=d.mixed_precision, choices=("auto", "no", "fp16", "bf16"))
    t.add_argument(
        "--gradient-checkpointing", action="store_true", help="recompute the copy's blocks: less memory"
    )
    t.add_argument("--save-every", type=int, default=d.save_every, help="checkpoint every N steps")
    t.add_argument(
        "--validate-every", type=int, default=d.validate_every, help="validation images every N steps"
    )
    t.add_argument("--validation-rows", type=int, default=d.validation_rows)
    t.add_argument("--validation-steps", type=int, default=d.validation_steps)
    t.add_argument("--validation-cfg", type=float, default=d.validation_cfg)
    t.add_argument("--seed", type=int, default=d.seed)
    t.add_argument(
        "--cache-latents", action="store_true", help="encode each image once (memory: 16 KB/row/256px)"
    )
    t.add_argument(
        "--save-dtype", default=d.save_dtype, choices=("fp16", "bf16", "fp32"), help="final file dtype"
    )
    t.add_argument("--init", help="start from this ControlNet file instead of the base UNet's encoder")
    t.add_argument(
        "--resume", nargs="?", const="latest", help="go on from a checkpoint (default: the latest)"
    )
    t.add_argument("--train-unet", action="store_true", help=argparse.SUPPRESS)  # the demo's base model only
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    f = sub.add_parser(
        "fill50k", help="write a synthetic Fill50K dataset (circle outlines -> filled circles)"
    )
    f.add_argument("folder")
    f.add_argument("--count", type=int, default=1000)
    f.add_argument("--size", type=int, default=512)
    f.add_argument("--seed", type=int, default=0)
    return p


def _train(args: argparse.Namespace) -> int:
    TrainingHost = _import_host(_comfy_dir(args.comfyui))
    config = TrainConfig(
        data=args.data,
        output=args.output,
        resolution=args.resolution,
        steps=args.steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        lr=args.lr,
        sd_locked=not args.unlock_decoder,
        only_mid_control=args.only_mid_control,
        drop_prompt=args.drop_prompt,
        mixed_precision=args.mixed_precision,
        gradient_checkpointing=args.gradient_checkpointing,
        save_every=args.save_every,
        validate_every=args.validate_every,
        validation_rows=args.validation_rows,
        validation_steps=args.validation_steps,
        validation_cfg=args.validation_cfg,
        seed=args.seed,
        save_dtype=args.save_dtype,
        cache_latents=args.cache_latents,
        init=args.init,
        train_unet=args.train_unet,
    )
    config.check()
    world = init_world()
    import torch

    device = None
    if torch.cuda.is_available() and world.size > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    host = TrainingHost(_checkpoint_path(args.checkpoint), device=device)
    trainer = Trainer(config, host, world)
    if args.resume:
        folder = latest_checkpoint(Path(args.output)) if args.resume == "latest" else Path(args.resume)
        if folder is None:
            raise TrainingError(
                f"--resume: no checkpoint-N folder with a trainer_state.json in {args.output}"
            )
        trainer.resume(folder)
    progress = None
    if not args.quiet:
        from tqdm import tqdm

        def progress(steps):
            return tqdm(steps, initial=trainer.step, total=config.steps, desc="training", unit="step")

    paths = trainer.run(progress)
    if world.main:
        for name, path in paths.items():
            print(f"{name}: {path}")
        first, last = trainer.losses[:1], trainer.losses[-1:]
        if first and last:
            print(f"loss: step {first[0][0]} {first[0][1]:.4f} -> step {last[0][0]} {last[0][1]:.4f}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = _parser().parse_args(argv)
    try:
        if args.command == "fill50k":
            write_synthetic_fill50k(args.folder, args.count, args.size, args.seed)
            print(f"wrote {args.count} examples to {args.folder}")
            return 0
        return _train(args)
    except (TrainingError, DatasetError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
