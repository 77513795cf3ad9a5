"""Output of the report commands (``pyllm-kv eval``, ``pyllm-kv bench``): the
table on stdout, then the JSON and the PNG the user asked for, each announced
on stderr. One place, so both commands behave alike."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Union

PathLike = Union[str, Path]


def _json_default(o: Any) -> Any:
    """numpy scalars (eval's metrics) as plain JSON numbers."""
    item = getattr(o, "item", None)
    if callable(item) and type(o).__module__ == "numpy":
        return item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_json(result: Dict[str, Any], path: PathLike) -> Path:
    """``result`` as indented JSON at ``path`` (parent folders created; NaN refused).

    Written to a temporary file beside it and renamed over it, so a run killed
    while writing leaves the previous version, never half a file."""
    p = Path(path)
    if p.parent and not p.parent.exists():
        p.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=2, allow_nan=False, default=_json_default) + "\n"
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, p)
    finally:
        if tmp.exists():
            tmp.unlink()
    return p


def save_figure(fig: Any, path: PathLike) -> Path:
    """Write a matplotlib figure as PNG at ``path`` (parent folders created), close it."""
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig.tight_layout()
    p = Path(path)
    if p.parent and not p.parent.exists():
        p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, format="png")
    plt.close(fig)
    return p


def emit(result: Dict[str, Any], table: str, json_out: Optional[PathLike], plot_out: Optional[PathLike],
         plot: Callable[[Dict[str, Any], PathLike], Path], prog: str) -> None:
    """Print the table, then write the JSON and the plot if asked."""
    print(table)
    sys.stdout.flush()
    if json_out:
        print(f"wrote {write_json(result, json_out)}", file=sys.stderr)
    if plot_out:
        try:
            print(f"wrote {plot(result, plot_out)}", file=sys.stderr)
        except ImportError as exc:  # matplotlib is a dependency, but bare checkouts may lack it
            print(f"{prog}: no plot ({exc}); the JSON has every number", file=sys.stderr)
