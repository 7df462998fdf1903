"""Balancer comparison: softmax vs sigmoid gating x auxiliary-loss-free bias rate, on AR training runs of equal
length (issue #28). Per arm: max-load / mean-load over the training steps (router statistics, mean over the MoE
layers; over all steps and over the last third), the share of held-out tokens whose chosen experts the selection
bias changes (top-k with vs without the bias, on the final model), the AR loss on held-out clips (no caption
dropout, CFEC or frame mask) and the wall time.

    python benchmarks/balancer.py [--config configs/ar_ablation.yaml] [--steps 250] [--experts 8]
        [--codes runs/ablation_codes] [--work runs/balancer] [--eval-clips 32] [--arms a,b,...] [--resume]
        [--out benchmarks/results/balancer.json]

Every arm trains the same model (the config's, with ``--experts`` routed experts) from the same seed on the same
pre-tokenized clips for the same steps, through ``omniar.train.ar.train``; only ``model.gating`` and
``model.bias_update_step`` differ. The training codes are copied from ``--codes`` (read only) into
``WORK/codes`` when it holds a complete cache, else pre-tokenized there; the held-out clips (Moving Shapes
training split, data seed 1: other clips of the same distribution) are pre-tokenized into ``WORK/heldout``.
Each arm trains into ``WORK/<arm>``; a non-empty one is refused unless ``--resume`` (then an arm already in
``--out`` is kept as recorded, another one continues from its newest checkpoint). The JSON is written after
every arm; under ``--resume`` the arms another invocation wrote there meanwhile are kept, so disjoint ``--arms``
lists can run at once into one ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from pathlib import Path

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from omniar.backbone import OmniARModel
from omniar.backbone.moe import MoELayer
from omniar.data.shapes import MovingShapes
from omniar.tokenizers.text import TextTokenizer
from omniar.train.ar import ARDataConfig, ARTrainConfig, ar_loss, collate, prepare_batch, train
from omniar.train.common import load_video_tokenizer, load_yaml
from omniar.train.engine import config_from_dict
from omniar.train.pretokenize import TokenizedDataset, pretokenize

ARMS = {"softmax_1e-4": ("softmax", 1e-4), "softmax_1e-3": ("softmax", 1e-3),
        "sigmoid_1e-4": ("sigmoid", 1e-4), "sigmoid_1e-3": ("sigmoid", 1e-3),
        "softmax_0": ("softmax", 0.0), "sigmoid_0": ("sigmoid", 0.0)}
HELDOUT_SEED = 1


def load_ratios(tb: Path, num_layers: int, num_experts: int) -> list[float]:
    """max-load / mean-load of every logged step, the mean over the MoE layers (mean load = 1 / E)."""
    acc = EventAccumulator(str(tb), size_guidance={"scalars": 0})
    acc.Reload()
    per_layer = [{e.step: e.value for e in acc.Scalars(f"router/{i}/max_load")} for i in range(num_layers)]
    steps = sorted(set.intersection(*(set(p) for p in per_layer)))
    return [sum(p[s] for p in per_layer) / num_layers * num_experts for s in steps]


def codes(args, config: dict, tok) -> tuple[Path, Path]:
    """The training cache (copied from --codes when complete, else made) and the held-out cache."""
    data_cfg = config_from_dict(ARDataConfig, config["data"], "data")
    train_dir, heldout_dir = Path(args.work, "codes"), Path(args.work, "heldout")
    if not train_dir.exists() and args.codes:
        try:
            TokenizedDataset(args.codes)
        except (ValueError, OSError) as err:
            print(f"--codes {args.codes} not used ({err}); pre-tokenizing into {train_dir}")
        else:
            shutil.copytree(args.codes, train_dir)
    settings = {"dataset": "shapes", "path": None, "num_frames": data_cfg.num_frames, "size": tok.resolution}
    heldout = MovingShapes("train", args.eval_clips, tok.resolution, data_cfg.num_frames, HELDOUT_SEED)
    pretokenize(tok, heldout, heldout_dir, args.eval_clips, settings | {"seed": HELDOUT_SEED}, progress=False)
    return train_dir, heldout_dir


@torch.no_grad()
def evaluate(model: OmniARModel, batch: dict, tok, config: dict) -> dict:
    """The AR loss on the held-out batch (no dropout, CFEC or frame mask), the share of valid tokens the bias
    reroutes in each MoE layer, and each layer's max/mean load on that batch."""
    eval_cfg = ARTrainConfig(caption_dropout=0.0, cfec_max_rate=0.0, frame_mask_prob=0.0,
                             **{k: config["train"][k] for k in ("text_weight", "mtp_weight", "scale_weighting")
                                if k in config["train"]})
    data_cfg = config_from_dict(ARDataConfig, config["data"], "data")
    text, inputs, targets, visibility = prepare_batch(batch, tok, TextTokenizer(), eval_cfg, data_cfg,
                                                      torch.Generator().manual_seed(0), torch.device("cpu"))
    rerouted = {}

    def hook(module, args, _output):
        h, valid, _is_text, num_experts, top_k, layer = args
        moved = module.rerouted(h, num_experts, top_k)
        rerouted[layer] = float(moved[valid].float().mean() if valid is not None else moved.float().mean())

    model.eval()
    handles = [b.ffn.register_forward_hook(hook) for b in model.layers if isinstance(b.ffn, MoELayer)]
    try:
        out = model(visual_inputs=inputs, frame_visibility=visibility, **text)
    finally:
        for h in handles:
            h.remove()
    loss, parts = ar_loss(out, targets, text["text_ids"], text["text_mask"], tok.scales, eval_cfg)
    shares = [rerouted[k] for k in sorted(rerouted)]
    loads = [float(s.load.max() * s.load.numel()) for s in out.router_stats]
    return {"eval_loss": float(loss), "eval_visual_ce": parts["visual_ce"], "eval_text_ce": parts["text_ce"],
            "rerouted_share": sum(shares) / len(shares), "rerouted_share_per_layer": shares,
            "eval_max_over_mean_load": sum(loads) / max(len(loads), 1) if loads else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/ar_ablation.yaml")
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--experts", type=int, default=8, help="routed experts (the shipped model's 8)")
    parser.add_argument("--codes", default="runs/ablation_codes", help="a complete pre-tokenized cache to copy")
    parser.add_argument("--work", default="runs/balancer")
    parser.add_argument("--eval-clips", type=int, default=32)
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {list(ARMS)}")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--out", default="benchmarks/results/balancer.json")
    args = parser.parse_args()
    arms = args.arms.split(",")
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        parser.error(f"--arms: unknown {unknown}; choose from {list(ARMS)}")
    runs = {name: Path(args.work, name) for name in arms}
    for run in runs.values():
        if run.is_dir() and any(run.iterdir()) and not args.resume:
            parser.error(f"--work: {run} holds an earlier run; pass --resume or choose another --work")

    base = load_yaml(args.config)
    base["model"]["num_experts"] = args.experts
    tok = load_video_tokenizer(base["train"]["tokenizer"])
    train_dir, heldout_dir = codes(args, base, tok)
    heldout = TokenizedDataset(heldout_dir)
    batch = collate([heldout[i] for i in range(len(heldout))])
    out_path = Path(args.out)
    result = json.loads(out_path.read_text()) if args.resume and out_path.exists() else {}
    result.update({"config": args.config, "steps": args.steps, "num_experts": args.experts,
                   "eval_clips": args.eval_clips, "heldout": f"Moving Shapes train split, data seed {HELDOUT_SEED}",
                   "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, CPU"})
    result.setdefault("arms", {})
    for name in arms:
        if name in result["arms"] and args.resume:
            print(name, "kept from", out_path)
            continue
        gating, rate = ARMS[name]
        config = load_yaml(args.config)
        config["model"].update(num_experts=args.experts, gating=gating, bias_update_step=rate)
        config["data"]["cache_dir"] = str(train_dir)
        config["train"].update(steps=args.steps, out_dir=str(runs[name]), log_every=1, save_every=args.steps,
                               sample_every=0, warmup_steps=min(config["train"].get("warmup_steps", 0),
                                                                args.steps // 10))
        start = time.perf_counter()
        final = train(config, progress=False)
        wall = time.perf_counter() - start
        model = OmniARModel.from_pretrained(str(final / "model"))
        layers = sum(isinstance(b.ffn, MoELayer) for b in model.layers)
        ratios = load_ratios(runs[name] / "tb", layers, args.experts)
        late = ratios[len(ratios) - len(ratios) // 3:]
        bias = torch.stack([b.ffn.selection_bias for b in model.layers if isinstance(b.ffn, MoELayer)])
        arm = {"gating": gating, "bias_update_step": rate, "train_s": wall,
               "max_over_mean_load": sum(ratios) / len(ratios), "late_max_over_mean_load": sum(late) / len(late),
               "late_steps_over_1.5x": sum(r > 1.5 for r in late) / len(late),
               "max_abs_bias": float(bias.abs().max()), "logged_steps": len(ratios),
               **evaluate(model, batch, tok, config)}
        result["arms"][name] = arm
        print(name, json.dumps(arm), flush=True)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        if args.resume and out_path.exists():  # arms another invocation wrote meanwhile (arms run in parallel)
            result["arms"] = json.loads(out_path.read_text()).get("arms", {}) | result["arms"]
        out_path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
