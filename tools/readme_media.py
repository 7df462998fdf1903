"""Remake the README's pictures from a pipeline folder (default: the embedded model), after it changes:

* ``docs/t2v_samples.gif``: the four README prompts, 17 frames, seed 0, side by side at twice the size;
* ``docs/long_video_strip.png``: every 16th frame of a 257-frame clip at half the full cache's budget, seed 0;
* ``docs/previews.gif``: ``omniar reconstruct`` of the folder's tokenizer (its coarse-to-fine previews).

    python tools/readme_media.py [--model FOLDER]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from omniar import assets
from omniar.data.video_io import write_video
from omniar.generation import TextToVideoPipeline

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red circle moves right on a black background", "a blue square moves up on a white background",
           "a green triangle moves left on a black background", "a yellow circle moves right on a black background"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="pipeline folder (default: the embedded shapes-t2v)")
    folder = Path(parser.parse_args().model or assets.path("shapes-t2v"))
    pipe = TextToVideoPipeline.from_pretrained(folder)
    clips = pipe(PROMPTS, num_frames=17, seed=0).frames  # (4, 17, H, W, 3) uint8
    tiled = np.concatenate(list(clips.repeat(2, axis=2).repeat(2, axis=3)), axis=2)
    write_video(ROOT / "docs/t2v_samples.gif", tiled, fps=8)
    long = pipe(PROMPTS[0], num_frames=257, kv_budget=pipe.cache_tokens() // 2, seed=0).frames[0]
    Image.fromarray(np.concatenate(list(long[::16]), axis=1)).save(ROOT / "docs/long_video_strip.png")
    subprocess.run([sys.executable, "-m", "omniar.cli", "reconstruct", "--out", str(ROOT / "docs/previews.gif"),
                    "--model", str(folder / "video_tokenizer")], check=True)


if __name__ == "__main__":
    main()
