"""UDA benchmark, Digits: printed -> handwritten. source_only vs DANN vs BiPC, 3 seeds each.

Source: digits rendered from the machine's fonts (augmented). Target: scikit-learn's bundled UCI
handwritten digits (1797 scans; labels read only to score each epoch). No ImageNet weights exist
offline, so the timm backbone and its "pre-trained head" are first trained on 62-class printed
alphanumerics (one pretrain step shared by all runs, seed 0); every method starts from those weights.
The quoted number is the *last* epoch's target accuracy (no target labels are used to pick an epoch);
the best epoch is recorded too.

``--ablations`` adds BiPC variants that show where its gain comes from: ``bipc_no_losses`` (CPA and CGI
weights 0: source CE while target batches still pass through the backbone, so BatchNorm sees them),
``bipc_cpa_only`` and ``bipc_cgi_only``; they run on the first seed only.

    python benchmarks/uda_digits.py [--out benchmarks/results/uda_digits.json] [--ablations]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from omniar.uda.data import HandwrittenDigits, PrintedCharacters, font_files
from omniar.uda.model import create_backbone
from omniar.uda.train import METHODS, UDAConfig, cache_dataset, pretrain_backbone, train_uda


ABLATIONS = {"bipc_no_losses": dict(cpa_weight=0.0, cgi_weight=0.0), "bipc_cpa_only": dict(cgi_weight=0.0),
             "bipc_cgi_only": dict(cpa_weight=0.0)}


def summary(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "seeds": values}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet10t")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--ablations", action="store_true", help="also run the BiPC ablations (first seed)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--steps-per-epoch", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32, help="per domain")
    parser.add_argument("--lr", type=float, default=1e-3, help="backbone; the heads get 10x")
    parser.add_argument("--source-size", type=int, default=3000)
    parser.add_argument("--pretrain-size", type=int, default=9300, help="62 classes x 150")
    parser.add_argument("--pretrain-epochs", type=int, default=3)
    parser.add_argument("--work", default="runs/uda_digits", help="scratch: weights, runs (reused if present)")
    parser.add_argument("--out", default="benchmarks/results/uda_digits.json")
    args = parser.parse_args()
    start = time.perf_counter()
    work = Path(args.work)
    weights = work / f"pretrained_{args.backbone}.safetensors"
    if not weights.is_file():
        alnum = cache_dataset(PrintedCharacters("alnum", args.pretrain_size, seed=100))
        pretrain_backbone(args.backbone, alnum, weights, epochs=args.pretrain_epochs)
    held_out = cache_dataset(PrintedCharacters("alnum", 1240, seed=101))
    pre = create_backbone(args.backbone, weights, num_classes=62)
    pre_acc = 100.0 * sum((pre.eval()(x).argmax(1) == y).sum().item()
                          for x, y in torch.utils.data.DataLoader(held_out, batch_size=256)) / len(held_out)
    print(f"pretrained head: {pre_acc:.1f}% on held-out printed alphanumerics "
          f"({time.perf_counter() - start:.0f} s)", flush=True)

    source = cache_dataset(PrintedCharacters("digits", args.source_size, seed=0))
    target = HandwrittenDigits()
    result = {}
    variants = {m: {"method": m} for m in args.methods}
    if args.ablations:
        variants.update({name: {"method": "bipc", **kw} for name, kw in ABLATIONS.items()})
    for method, overrides in variants.items():
        runs = []
        for seed in args.seeds if method in METHODS else args.seeds[:1]:
            cfg = UDAConfig(backbone=args.backbone, weights=str(weights), pretrained_classes=62,
                            epochs=args.epochs, steps_per_epoch=args.steps_per_epoch, batch_size=args.batch_size,
                            lr=args.lr, seed=seed, out_dir=str(work / f"{method}_seed{seed}"), **overrides)
            runs.append(train_uda(cfg, source, target))
            print(f"{method} seed {seed}: per epoch {[round(a, 1) for a in runs[-1]['per_epoch']]} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
        result[method] = {**summary([r["last"] for r in runs]), "best_epoch": summary([r["best"] for r in runs]),
                          "per_epoch": [r["per_epoch"] for r in runs]}
    result["quoted"] = "target accuracy (%) after the last epoch; best_epoch: the best epoch per seed"
    result["setup"] = {
        "backbone": args.backbone, "image_size": 32, "epochs": args.epochs, "steps_per_epoch": args.steps_per_epoch,
        "batch_size_per_domain": args.batch_size, "lr": args.lr, "source_size": args.source_size,
        "target_size": len(target), "pretrain_size": args.pretrain_size, "pretrain_epochs": args.pretrain_epochs,
        "pretrained_head_heldout_acc": pre_acc, "fonts": len(font_files()), "seconds": time.perf_counter() - start,
        "machine": f"{platform.machine()} CPU, torch {torch.__version__}, {torch.get_num_threads()} threads"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({m: {k: round(result[m][k], 2) for k in ("mean", "std")} for m in variants}))


if __name__ == "__main__":
    main()
