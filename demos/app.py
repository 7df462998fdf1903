"""The Gradio demo: the same as ``omniar demo`` (127.0.0.1:7860 by default; --host, --port, --share, --model).

    python demos/app.py --port 7860
"""

import sys

from omniar.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
