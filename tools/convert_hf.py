"""Convert a Hugging Face Llama checkpoint to a pyguard file (same as `pyguard convert`).

    python tools/convert_hf.py HF_DIR OUT_FILE [--group 32|64|128|256] [--head full|guard]
        [--family auto|llama-guard-3-1b|llama-guard-3-8b|llama-guard-2] [--threads N]
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from pyguard.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
