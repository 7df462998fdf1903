"""Where an AR training step's CPU time goes, and what precision buys: fp32, bf16 autocast, bf16 autocast with
attention kept in fp32.

One batch of real Moving Shapes clips encoded by the config's tokenizer, the config's model (random init) and
losses (CFEC, frame masks, text and multi-token heads; no elastic sub-model), AdamW. Rounds alternate the
settings, each time is the step's process CPU time, and the figure is the median over rounds, so load from
other jobs hits all settings alike. ``--profile`` adds the top operators of two fp32 steps (torch.profiler).

    OMP_NUM_THREADS=1 python benchmarks/ar_train_step.py [--config configs/ar_shapes_cpu.yaml] [--batch 16]
        [--rounds 3] [--profile] [--out benchmarks/results/ar_train_step.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from contextlib import nullcontext
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F
import yaml

from omniar.backbone import OmniARModel
from omniar.data.shapes import MovingShapes
from omniar.train.ar import ar_loss, prepare_batch, run_parts

SETTINGS = ("fp32", "bf16", "bf16, fp32 attention")
SDPA = F.scaled_dot_product_attention


def fp32_attention(q, k, v, **kwargs):
    """SDPA outside autocast, in fp32: the CPU flash kernel is slower in bf16 than in fp32."""
    with torch.autocast("cpu", enabled=False):
        return SDPA(q.float(), k.float(), v.float(), **kwargs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/ar_shapes_cpu.yaml")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--out", default="benchmarks/results/ar_train_step.json")
    args = parser.parse_args()
    data_cfg, _, train_cfg, tok, text_tok, _, model_cfg = run_parts(yaml.safe_load(Path(args.config).read_text()))
    clips = MovingShapes("train", args.batch, tok.resolution, data_cfg.num_frames, seed=0)
    video = torch.stack([clips[i]["video"] for i in range(args.batch)])
    with torch.no_grad():
        latent = tok.eval().encode_latent(video)
        batch = {"latent": latent, "codes": tok.quantize_latent(latent).codes,
                 "caption": [clips[i]["caption"] for i in range(args.batch)]}
    torch.manual_seed(0)
    model = OmniARModel.from_config_obj(model_cfg).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)

    def step(setting: str) -> float:
        start = time.process_time()
        patch = (mock.patch.object(F, "scaled_dot_product_attention", fp32_attention)
                 if setting == "bf16, fp32 attention" else nullcontext())
        text, inputs, targets, visibility = prepare_batch(batch, tok, text_tok, train_cfg, data_cfg, g,
                                                          torch.device("cpu"))
        with patch, torch.autocast("cpu", torch.bfloat16, enabled=setting != "fp32"):
            out = model(visual_inputs=inputs, frame_visibility=visibility, **text)
            loss, _ = ar_loss(out, targets, text["text_ids"], text["text_mask"], tok.scales, train_cfg)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return time.process_time() - start

    for setting in SETTINGS:  # warm-up
        step(setting)
    times = {s: [] for s in SETTINGS}
    for _ in range(args.rounds):
        for setting in SETTINGS:
            times[setting].append(step(setting))
    fp32 = statistics.median(times["fp32"])
    rows = {s: {"cpu_s_per_step": statistics.median(t), "rounds": t,
                "speedup_vs_fp32": fp32 / statistics.median(t)} for s, t in times.items()}
    for s, row in rows.items():
        print(f"{s:22s} {row['cpu_s_per_step']:.2f} CPU s a step ({row['speedup_vs_fp32']:.2f}x fp32)", flush=True)
    result = {"benchmark": "ar_train_step", "config": args.config, "batch": args.batch,
              "visual_tokens_per_clip": sum(c[0].numel() for c in batch["codes"]), "settings": rows,
              "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.machine()}
    if args.profile:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(2):
                step("fp32")
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in events)
        result["profile_fp32_self_cpu_share"] = {e.key: round(e.self_cpu_time_total / total, 4) for e in events[:12]}
        print(json.dumps(result["profile_fp32_self_cpu_share"], indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
