"""Train the Moving Shapes attribute classifier (:class:`~omniar.eval.shapes_classifier.ShapesClassifier`), the
judge of prompt adherence: ``omniar train classifier``. It trains in one process, without DeepSpeed: it is
small and trained once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .._checks import check_int
from ..data.shapes import MovingShapes, render, to_tensor
from ..eval.shapes_classifier import ATTRIBUTES, ShapesClassifier
from .engine import cosine_lr


def key_frame_set(num_clips: int, size: int = 64, num_frames: int = 17, seed: int = 0, motion: str = "exit"
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Real clips of every combination, rendered at the three frames the classifier looks at only."""
    data = MovingShapes("all", num_clips, size, num_frames, seed=seed, motion=motion)
    videos, labels = [], {k: [] for k in ATTRIBUTES}
    for i in range(num_clips):
        clip, _ = data.clip(i)
        videos.append(to_tensor(render(clip, size, num_frames, [0, num_frames // 2, num_frames - 1])))
        for k, names in ATTRIBUTES.items():
            labels[k].append(names.index(clip.attributes[k]))
    return torch.stack(videos), {k: torch.tensor(v) for k, v in labels.items()}


def train_classifier(steps: int = 1500, batch_size: int = 64, num_clips: int = 8000, seed: int = 0,
                     device: str = "cpu", progress: bool = True, motion: str = "exit") -> ShapesClassifier:
    """Train on real clips of every combination (the judge must know held-out combinations too). ``motion``
    ``"wrap"`` trains a judge of long clips, whose objects cross the canvas edge (``MovingShapes(motion=...)``);
    its clips also show objects well inside the canvas, as ``"exit"`` clips do."""
    check_int(steps, "steps", 1)
    check_int(batch_size, "batch_size", 1)
    check_int(num_clips, "num_clips", 1)
    torch.manual_seed(seed)
    videos, labels = key_frame_set(num_clips, seed=10_000 + seed, motion=motion)
    model = ShapesClassifier().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_lr(steps, warmup_steps=steps // 10))
    gen = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(steps), disable=not progress, desc="classifier"):
        idx = torch.randint(0, num_clips, (batch_size,), generator=gen)
        video = videos[idx].to(device)
        video = video + 0.05 * torch.randn_like(video)  # robustness to the small artefacts of generated clips
        logits = model(video)
        loss = sum(F.cross_entropy(logits[k], labels[k][idx].to(device)) for k in ATTRIBUTES)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()
