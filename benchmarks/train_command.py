#!/usr/bin/env python
"""The whole `embryo-ml train --config configs/default.yaml` vs a plain loop, wall clock.

What a user waits for: each side is one fresh process, start-up to exit. Ours is the CLI with the
recommended recipe from scratch (`--set model.pretrained=false model.name=resnet18
data.image_size=128 train.epochs=E`): its grouped validation split, per-epoch validation, the
decoded cache, and everything after the epochs (calibration, evaluation with 1,000 patient
bootstraps, the validation verdict, quality thresholds, run files, MLflow figures and the
checkpoint artifact). The plain loop (written here, in `plain_loop`) is the 60-line tutorial
loop: timm resnet18, PIL + torchvision Resize, flips and any-angle rotation, AdamW 1e-3 with
cosine decay, cross-entropy, every image, no validation, DataLoader with 2 workers.

Both see the same images: synthetic embryos stored as 500 px JPEGs (like clinic exports).
Runs are interleaved (plain, ours, plain, ours, ...); the speed-up is the median over
repetitions of plain seconds / ours seconds.

    python benchmarks/train_command.py                       # 588 images, 4 epochs, 2 reps
    python benchmarks/train_command.py --epochs 10 --reps 1 --set data.num_workers=0
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from bench_common import median, plain_training, workspace, write_json

REPO = Path(__file__).resolve().parents[1]


def plain_loop(manifest: Path, epochs: int, size: int, workers: int) -> None:
    """The plain loop of the module text (run in its own process by `--plain`)."""
    import pandas as pd
    import timm
    import torch
    from PIL import Image
    from torchvision import transforms as T

    table = pd.read_csv(manifest)
    paths = [str(manifest.parent / p) for p in table["path"]]
    labels = (table["label"] == "good").astype(int).tolist()
    tf = T.Compose([T.Resize((size, size)), T.RandomHorizontalFlip(), T.RandomVerticalFlip(),
                    T.RandomRotation(180), T.ToTensor(),
                    T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])

    class Images(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(paths)

        def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
            return tf(Image.open(paths[i]).convert("RGB")), labels[i]

    loader = torch.utils.data.DataLoader(Images(), batch_size=32, shuffle=True,
                                         num_workers=workers, drop_last=True)
    model = timm.create_model("resnet18", num_classes=2)
    plain_training(model, loader, epochs)
    torch.save(model.state_dict(), manifest.parent / "plain.pt")


def timed(command: list[str]) -> float:
    """Wall seconds of `command`; its error output is shown when it fails."""
    started = time.perf_counter()
    done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(command)}\n"
                         f"{done.stderr[-2000:]}")
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=588)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--source-size", type=int, default=500)
    parser.add_argument("--source-format", default="jpg")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plain-workers", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], help="extra overrides for ours")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--plain", type=Path, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args(argv)
    if args.plain:
        plain_loop(args.plain, args.epochs, args.size, args.plain_workers)
        return 0
    results = []
    with workspace(args, "train-command-") as (work, manifest):
        for rep in range(args.reps):
            plain = timed([sys.executable, __file__, "--plain", str(manifest), "--epochs",
                           str(args.epochs), "--size", str(args.size), "--plain-workers",
                           str(args.plain_workers)])
            overrides = ["model.pretrained=false", "model.name=resnet18",
                         f"data.image_size={args.size}", f"train.epochs={args.epochs}",
                         f"data.cache_dir={work / f'cache{rep}'}",
                         f"tracking.tracking_uri=sqlite:///{work / f'mlflow{rep}.db'}", *args.set]
            ours = timed([sys.executable, "-m", "embryo_ml.cli", "-q", "train", "--config",
                          str(REPO / "configs" / "default.yaml"), "--data", str(manifest),
                          "--out", str(work / f"run{rep}"),
                          *[x for o in overrides for x in ("--set", o)]])
            results.append({"rep": rep, "plain_s": plain, "ours_s": ours})
            print(f"rep {rep}: plain loop {plain:.1f} s, embryo-ml train {ours:.1f} s, "
                  f"speed-up {plain / ours:.2f}x", flush=True)
    summary = {"plain_s": median([r["plain_s"] for r in results]),
               "ours_s": median([r["ours_s"] for r in results]),
               "speedup": median([r["plain_s"] / r["ours_s"] for r in results])}
    print(f"median: plain {summary['plain_s']:.1f} s, ours {summary['ours_s']:.1f} s, "
          f"speed-up {summary['speedup']:.2f}x ({args.images} images, {args.epochs} epochs, "
          f"{args.size} px, overrides {args.set or 'none'})")
    if args.json:
        write_json(args.json, {"settings": {k: str(v) for k, v in vars(args).items()},
                               "runs": results, "summary": summary})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
