"""Text-to-video with the embedded default model: writes an mp4 and a gif.

    python demos/text_to_video.py "a red circle moves right on a black background" --out outputs/demo
"""

import argparse
from pathlib import Path

from omniar.data.video_io import write_video
from omniar.generation import TextToVideoPipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompt", nargs="?", default="a red circle moves right on a black background")
    parser.add_argument("--out", default="outputs/demo", help="output path without extension")
    parser.add_argument("--num-frames", type=int, default=17)
    parser.add_argument("--guidance-scale", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    pipe = TextToVideoPipeline.from_pretrained()
    out = pipe(args.prompt, num_frames=args.num_frames, guidance_scale=args.guidance_scale, seed=args.seed,
               progress=True)
    for ext in (".mp4", ".gif"):
        print("wrote", write_video(Path(args.out + ext), out.frames[0], fps=8))


if __name__ == "__main__":
    main()
