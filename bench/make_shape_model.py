#!/usr/bin/env python3
"""Write a random-weight llama GGUF of a given shape, for speed runs.

Thin wrapper around :mod:`pyllm_kv.shape_model` that also works from a bare
checkout (no install): it puts the repository root on ``sys.path``. gguf-py
must be importable: installed (``pip install gguf``), or llama.cpp's own copy
on PYTHONPATH (``PYTHONPATH=LLAMA_CPP/gguf-py``), as on the device machine.

    python bench/make_shape_model.py --preset llama8b --out /tmp/llama8b.gguf
    python bench/make_shape_model.py --preset tiny --n-layer 4 --type f16 --out /tmp/t.gguf
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

try:
    import gguf  # noqa: F401
except ImportError:
    sys.exit("make_shape_model: the gguf package is missing: `pip install gguf`, or put llama.cpp's "
             "gguf-py folder on PYTHONPATH")

from pyllm_kv.shape_model import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
