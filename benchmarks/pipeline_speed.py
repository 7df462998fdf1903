"""Speed of the default text-to-video pipeline against a kept copy of an earlier revision.

For each (batch, frames) of the grid and each setting, one call per round: wall, generate and decode seconds, the
generate time of latent frames 1, middle and last (frame 0 also holds the prompt pass), (``--memory``, current path
only) the peak of live tensor memory, and (``--flops``, current path only) the transformer's FLOPs in a call
(attention and the grouped expert GEMMs included, which ``FlopCounterMode`` does not count on CPU by itself; counted
with the C kernel and oneDNN's linears off, whose calls it cannot see; also those of latent frames 1, middle and last)
over its generate CPU time, as a share of a matmul peak measured in the same worker (2048^3, the faster of torch's
and oneDNN's product, fp32, and bf16 for the ``bf16`` setting). Each time is also taken as the process's CPU time
(``*_cpu_s``): on a shared machine a niced benchmark waits for the CPU at random, which inflates wall times by
whole seconds but not the CPU time the call consumes (with one thread, CPU time is the wall time of an idle
machine). Settings: ``fp32`` (``pipe.to(decode_dtype=torch.float32)``, exact), ``bf16-decode``
(``decode_dtype=torch.bfloat16``, the CPU default: same codes, frames decoded under bf16 autocast) and ``bf16``
(model and decode in bf16); ``eager``: the default with the fused small steps off (``pipe.model.fused_steps =
False``). The baseline, ``--baseline REV`` (default: the pipeline before #29), is exported with
``git archive`` and runs in its own worker process, in fp32 unless ``--baseline-setting`` names another setting
(for a baseline that has it, e.g. an earlier default against today's); rounds interleave baseline and current calls
with the same seeds, and each ratio is the median over rounds of the per-round ratio (kept too, ``ratio_rounds``),
so load on a shared machine hits both sides alike. ``--kv-budget N``: the current path's calls bound their KV cache
to N visual tokens (the default policy), the baseline's stay unbounded.

    OMP_NUM_THREADS=1 python benchmarks/pipeline_speed.py [--device cuda] [--batches 1 4 16] [--frames 1 9 17 33]
        [--rounds 3] [--memory] [--flops] [--out benchmarks/results/pipeline_speed.json]
    python benchmarks/pipeline_speed.py --rule 64 [--settings bf16-decode] [--reference fp32]   # the precision rule
        (BENCHMARKS.md; fused steps: --reference eager --settings bf16-decode)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SETTINGS = ("fp32", "bf16-decode", "bf16", "eager")
BASELINE = "505d484"
PROMPTS = ["a red circle moves right on a black background", "a blue square moves up on a white background",
           "a green triangle moves left on a black background", "a yellow circle moves down on a white background"]
ROOT = Path(__file__).resolve().parents[1]


def load(setting: str, device: str = "cpu"):
    from omniar.generation import TextToVideoPipeline

    pipe = TextToVideoPipeline.from_pretrained().to(device)
    if hasattr(pipe, "decode_dtype"):
        pipe.to(dtype=torch.bfloat16 if setting == "bf16" else None,
                decode_dtype=torch.float32 if setting == "fp32" else torch.bfloat16)
    elif setting != "fp32":  # a baseline from before #29 decodes in fp32 only
        raise SystemExit(f"--baseline-setting {setting}: this baseline has no decode_dtype; use fp32")
    if setting == "eager":
        if not hasattr(pipe.model, "fused_steps"):
            raise SystemExit("the eager setting needs a pipeline with fused steps to turn off")
        pipe.model.fused_steps = False
    return pipe


def call(pipe, batch: int, frames: int, seed: int, memory: bool, kv_budget: int | None = None) -> dict:
    """One timed call; per-latent-frame generate times from the callback after each frame's last scale."""
    last, ends = len(pipe.video_tokenizer.scales) - 1, []
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    budget = {} if kv_budget is None else {"kv_budget": kv_budget}  # a baseline from before #27 has none

    def run(callback=None):
        return pipe(prompts, num_frames=frames, seed=seed, callback=callback, **budget)

    if pipe.device.type == "cuda":
        torch.cuda.synchronize(pipe.device)  # the frames come back on the CPU: the call ends synchronised
    start, start_cpu = time.perf_counter(), time.process_time()
    out = run(lambda d: ends.append((time.perf_counter(), time.process_time())) if d["scale"] == last else None)
    row = {"wall_s": time.perf_counter() - start, **{k: out.timings[k] for k in ("generate_s", "decode_s")},
           "cpu_s": time.process_time() - start_cpu, "generate_cpu_s": ends[-1][1] - start_cpu}
    row["decode_cpu_s"] = row["cpu_s"] - row["generate_cpu_s"]  # also the codes' assembly, a few ms
    for clock, suffix in ((0, "s"), (1, "cpu_s")):
        per_frame = [b[clock] - a[clock] for a, b in zip(ends, ends[1:])]  # latent frames 1 .. T-1
        if per_frame:
            row.update({f"frame_first_{suffix}": per_frame[0], f"frame_middle_{suffix}": per_frame[len(per_frame) // 2],
                        f"frame_last_{suffix}": per_frame[-1]})
    if memory:
        from generation_memory import tensor_peak_mib

        row["tensor_peak_mib"] = tensor_peak_mib(run)
    return row


def transformer_gflop(pipe, batch: int, frames: int, seed: int, kv_budget: int | None = None) -> dict:
    """GFLOP of the transformer's forwards in one call: in all (the text pass and every scale step) and of
    latent frames 1, middle and last (the frames the timed call reports), whose growth is the attention's."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    aten = torch.ops.aten
    formulas = {  # shape formulas (FlopCounterMode passes shapes); the CPU kernels have none built in
        aten._grouped_mm: lambda a, b, *args, out_shape=None, **kw: 2 * a[0] * a[-1] * out_shape[-1],
        aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *args, out_shape=None, **kw:
            sdpa_flop_count(q, k, v)}
    model, per_frame = pipe.model, {}  # latent frame (-1: the text pass) -> FLOPs

    def counted(forward, frame_of):
        def run(*args, **kwargs):
            with FlopCounterMode(display=False, custom_mapping=formulas) as counter:
                out = forward(*args, **kwargs)
            frame = frame_of(args)
            per_frame[frame] = per_frame.get(frame, 0) + counter.get_total_flops()
            return out
        return run

    model.forward_text = counted(model.forward_text, lambda args: -1)
    model.forward_scale = counted(model.forward_scale, lambda args: args[1])
    # the counter sees aten ops only, not the C kernel's calls (steps, attention, MoE layers) nor oneDNN's linears
    # (fused.dense): the count runs all in aten, the same arithmetic, as without them
    from omniar.backbone import fused

    real, fused.library = fused.library, lambda: None
    onednn, fused._ONEDNN_LINEAR = fused._ONEDNN_LINEAR, None
    try:
        call(pipe, batch, frames, seed, False, kv_budget)
    finally:
        del model.forward_text, model.forward_scale  # the instance attributes; the methods show again
        fused.library, fused._ONEDNN_LINEAR = real, onednn
    row = {"transformer_gflop": sum(per_frame.values()) / 1e9}
    frames_after_first = [per_frame[f] / 1e9 for f in sorted(per_frame) if f >= 1]
    if frames_after_first:
        row.update({"frame_first_gflop": frames_after_first[0],
                    "frame_middle_gflop": frames_after_first[len(frames_after_first) // 2],
                    "frame_last_gflop": frames_after_first[-1]})
    return row


def matmul_peak_gflops(dtype: torch.dtype, device: str, n: int = 2048, repeats: int = 5) -> float:
    """Best of ``repeats`` n^3 matmuls, in GFLOP/s of CPU time (of wall time on CUDA): torch's ``a @ b`` and, on
    the CPU, oneDNN's product that the pipeline's fp32 linears use (``fused.dense``; MKL's, behind ``a @ b`` in fp32,
    may run narrower vectors), whichever is faster."""
    from omniar.backbone import fused

    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    cuda, best = device.startswith("cuda"), float("inf")
    products = [lambda: a @ b]
    if not cuda and getattr(fused, "_ONEDNN_LINEAR", None) is not None:
        products.append(lambda: fused._ONEDNN_LINEAR(a, b, None, "none", [], ""))
    for product in products:
        for _ in range(repeats + 1):  # the first one warms up
            if cuda:
                torch.cuda.synchronize(device)
            start = time.perf_counter() if cuda else time.process_time()
            product()
            if cuda:
                torch.cuda.synchronize(device)
            best = min(best, (time.perf_counter() if cuda else time.process_time()) - start)
    return 2 * n**3 / best / 1e9


def worker() -> None:
    """Serve ``{"setting", "device", "batch", "frames", "seed", "memory"}`` requests (``"flops": true``: the
    transformer's GFLOP and the matmul peak instead of a timed call), one JSON line each way."""
    pipes = {}
    for line in sys.stdin:
        req = json.loads(line)
        if req["setting"] not in pipes:
            pipes[req["setting"]] = load(req["setting"], req["device"])
            call(pipes[req["setting"]], 1, 1, 0, False)  # warm-up
        pipe = pipes[req["setting"]]
        if req.get("flops"):
            dtype = torch.bfloat16 if req["setting"] == "bf16" else torch.float32
            row = {**transformer_gflop(pipe, req["batch"], req["frames"], req["seed"], req.get("kv_budget")),
                   "matmul_peak_gflops": matmul_peak_gflops(dtype, req["device"])}
        else:
            row = call(pipe, req["batch"], req["frames"], req["seed"], req["memory"], req.get("kv_budget"))
        print(json.dumps(row), flush=True)


class Worker:
    """A worker process on ``pythonpath``'s omniar; ``fixed`` fields go with every request."""

    def __init__(self, pythonpath: str, **fixed) -> None:
        self.fixed = fixed
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([pythonpath, str(ROOT / "benchmarks")])}
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)

    def __call__(self, **req) -> dict:
        self.proc.stdin.write(json.dumps({**self.fixed, **req}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker died on {req}")
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def median_row(rows: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def speed(args) -> dict:
    cuda = args.device.startswith("cuda")
    result = {"machine": torch.cuda.get_device_name(args.device) if cuda else
              f"CPU {platform.machine()}, {os.cpu_count()} cores, "
              f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}",
              "torch": torch.__version__, "baseline": args.baseline, "baseline_setting": args.baseline_setting,
              "rounds": args.rounds, "kv_budget": args.kv_budget, "grid": {}}
    with tempfile.TemporaryDirectory() as old:
        archive = subprocess.run(["git", "archive", args.baseline, "omniar"], cwd=ROOT, check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", old], input=archive, check=True)
        base, new = Worker(old), Worker(str(ROOT), kv_budget=args.kv_budget)  # a budget for the current path only
        try:
            for batch in args.batches:
                for frames in args.frames:
                    rounds = {s: [] for s in ("baseline",) + tuple(args.settings)}
                    for r in range(args.rounds):
                        req = dict(device=args.device, batch=batch, frames=frames, seed=r, memory=False)
                        rounds["baseline"].append(base(setting=args.baseline_setting, **req))
                        for s in args.settings:
                            rounds[s].append(new(setting=s, **req))
                    row = {s: median_row(rows) for s, rows in rounds.items()}
                    for s in args.settings:
                        # each round's ratios too, so that a later run's rounds can be pooled with these
                        row[s]["ratio_rounds"] = {}
                        for key in ("wall_s", "generate_s", "decode_s", "cpu_s", "generate_cpu_s", "decode_cpu_s"):
                            ratios = [b[key] / n[key] for b, n in zip(rounds["baseline"], rounds[s])]
                            row[s][f"{key}_ratio_vs_baseline"] = statistics.median(ratios)
                            row[s]["ratio_rounds"][key] = ratios
                        row[s]["decode_share_cpu"] = row[s]["decode_cpu_s"] / row[s]["cpu_s"]
                        row[s]["decode_share"] = row[s]["decode_s"] / row[s]["wall_s"]  # wall: several threads
                    if args.memory:  # current path only: the meter's module imports today's demo code
                        req = dict(device=args.device, batch=batch, frames=frames, seed=0, memory=True)
                        for s in args.settings:
                            row[s]["tensor_peak_mib"] = new(setting=s, **req)["tensor_peak_mib"]
                    if args.flops:  # the forwards' shapes, and so their FLOPs, do not depend on the seed
                        req = dict(device=args.device, batch=batch, frames=frames, seed=0, memory=False, flops=True)
                        for s in args.settings:
                            row[s].update(new(setting=s, **req))
                            row[s]["transformer_gflops"] = row[s]["transformer_gflop"] / row[s]["generate_cpu_s"]
                            row[s]["peak_share"] = row[s]["transformer_gflops"] / row[s]["matmul_peak_gflops"]
                    result["grid"][f"{batch}x{frames}"] = row
                    print(f"{batch} x {frames}: {json.dumps(row)}", flush=True)
        finally:
            base.close()
            new.close()
    return result


def rule(n: int, settings: list[str], device: str, reference: str = "fp32") -> dict:
    """The precision rule written in BENCHMARKS.md before the run: a setting may become the default if
    ``omniar eval t2v``'s full/seen adherence is inside the ``reference`` run's 95 % interval and its Frechet
    distance within 10 % of the reference's (fp32 for bf16 settings, eager for the fused steps)."""
    from omniar.eval.t2v import evaluate_split, load_classifier

    classifier = load_classifier()
    scores = {s: evaluate_split(load(s, device), classifier, "seen", n) for s in dict.fromkeys([reference, *settings])}
    ref = scores[reference]
    low, high = ref["all_ci95"]  # Wilson interval of the reference's adherence
    out = {"n": n, "scores": scores}
    for s in list(scores)[1:]:
        out[f"{s}_passes"] = bool(low <= scores[s]["all"] <= high
                                  and abs(scores[s]["frechet"] - ref["frechet"]) <= 0.1 * ref["frechet"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--frames", type=int, nargs="+", default=[1, 9, 17, 33])
    parser.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline", default=BASELINE, help="git revision of the kept baseline")
    parser.add_argument("--baseline-setting", choices=SETTINGS, default="fp32",
                        help="the baseline's setting (fp32: the pre-#29 pipeline has no other)")
    parser.add_argument("--memory", action="store_true", help="also the peak of live tensor memory")
    parser.add_argument("--flops", action="store_true", help="also the transformer's share of matmul peak")
    parser.add_argument("--kv-budget", type=int, help="the current path's calls bound their KV cache (kv_budget); "
                        "the baseline's do not")
    parser.add_argument("--rule", type=int, metavar="N", help="run the precision rule on N clips instead")
    parser.add_argument("--reference", choices=SETTINGS, default="fp32", help="the rule's reference setting")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="benchmarks/results/pipeline_speed.json")
    args = parser.parse_args()
    if args.worker:
        return worker()
    if min(args.batches) < 1 or args.rounds < 1:
        parser.error("--batches and --rounds must be >= 1")
    if args.kv_budget is not None and args.kv_budget < 1:
        parser.error("--kv-budget must be >= 1")
    if args.memory and args.device != "cpu":
        parser.error("--memory measures CPU tensors only")
    result = rule(args.rule, args.settings, args.device, args.reference) if args.rule else speed(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
