"""Token sampling: classifier-free guidance, temperature, top-k and nucleus (top-p) filtering."""

from __future__ import annotations

import torch

from .._checks import check_choice, check_float, check_int

GUIDANCE_SCHEDULES = ("constant", "linear")


def guided_logits(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance on logits: ``uncond + scale * (cond - uncond)`` (scale 1 = no guidance)."""
    return uncond + scale * (cond - uncond)


def guidance_for_scale(guidance_scale: float, scale_index: int, num_scales: int, schedule: str) -> float:
    """Guidance strength at scale ``scale_index``: ``constant``, or ``linear`` from 1 at the
    coarsest to ``guidance_scale`` at the finest scale (VAR's ramp)."""
    check_choice(schedule, "schedule", GUIDANCE_SCHEDULES)
    check_int(num_scales, "num_scales", 1)
    check_int(scale_index, "scale_index", 0, num_scales - 1)
    if schedule == "constant" or num_scales == 1:
        return guidance_scale
    return 1.0 + (guidance_scale - 1.0) * scale_index / (num_scales - 1)


def check_filters(top_k: int, top_p: float) -> None:
    """Validate the filter arguments of :func:`filter_logits` (shared with the pipeline's checks)."""
    check_int(top_k, "top_k", 0)
    check_float(top_p, "top_p", 0.0, 1.0, low_inclusive=False)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set logits outside the top-k and outside the smallest nucleus of mass top_p to -inf.

    ``top_k=0`` and ``top_p=1`` disable each filter. The most likely token always survives.
    """
    check_filters(top_k, top_p)
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass strictly before it already reaches top_p; never the first (a top_p
        # below float32's range compares as 0, and 0 >= 0 would drop it too)
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one token per row of ``logits`` (..., V); ``temperature=0`` is greedy.

    Sampling runs on the CPU in float32 with ``generator``, so a seed gives the same
    tokens on every device; the result is a CPU LongTensor.
    """
    check_float(temperature, "temperature", 0.0)
    check_filters(top_k, top_p)  # before the greedy return, which does not use them
    logits = logits.float().cpu()
    # temperature -> 0 is greedy (below float32's range it would divide by 0)
    if temperature < torch.finfo(torch.float32).tiny:
        return logits.argmax(-1)
    # so is a row pushed past float32 by a huge guidance_scale (+inf); the other rows are still sampled
    greedy = logits.isposinf().any(-1)
    best = logits.argmax(-1)
    logits = logits.masked_fill(greedy[..., None], 0.0)
    # max first: a tiny temperature then sends the rest to -inf instead of overflowing (inf - inf = nan)
    logits = filter_logits((logits - logits.amax(-1, keepdim=True)) / temperature, top_k, top_p)
    flat = draw(logits.softmax(-1).reshape(-1, logits.shape[-1]), generator)
    return torch.where(greedy, best, flat.view(logits.shape[:-1]))


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One index per row of ``probs`` (N, V) by inverse CDF: one uniform number a row, where ``torch.multinomial``
    draws one exponential a token (V of them a row, a measurable share of a generation call). The target is in
    (0, total], and the first index whose running sum reaches it has a positive probability: a zero-probability
    (filtered) token is never drawn. float64 running sums keep every token's share exact to float32's rounding."""
    cdf = probs.double().cumsum(-1)
    target = (1.0 - torch.rand(probs.shape[0], 1, dtype=torch.float64, generator=generator)) * cdf[:, -1:]
    return torch.searchsorted(cdf, target).squeeze(-1)
