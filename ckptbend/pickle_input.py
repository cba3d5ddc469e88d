"""Pickled `.ckpt` input: refused by default; with explicit consent, loaded weights-only into safetensors.

A pickle can run arbitrary code when loaded. `torch.load(weights_only=True)` refuses every global not
on an allow-list; ckptbend adds only the few harmless names old SD checkpoints reference.
"""

from __future__ import annotations

import re
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

from .errors import CkptbendError

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
MIN_TORCH = (2, 10)   # CVE-2025-32434 (weights_only bypass) and CVE-2026-24747 are fixed from here


def is_pickle(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in PICKLE_SUFFIXES


def require_consent(path: Path, allow_pickle: bool) -> None:
    if is_pickle(path) and not allow_pickle:
        raise CkptbendError(f"{path}: pickled checkpoints can run code when loaded; refusing. "
                            "Convert it to .safetensors, or pass --allow-pickle to load it weights-only")


class _LightningModelCheckpoint:
    """Stand-in for pytorch_lightning's ModelCheckpoint callback state: never executed, only named."""

    def __setstate__(self, state):
        self.__dict__.update(state if isinstance(state, dict) else {})


def _allowed_globals():
    import numpy as np

    return [
        (_LightningModelCheckpoint, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"),
        (np._core.multiarray.scalar, "numpy.core.multiarray.scalar"),
        np._core.multiarray.scalar,
        np.dtype,
        type(np.dtype("float64")),
        type(np.dtype("int64")),
    ]


def _why(e: Exception) -> str:
    """The useful line of torch's refusal, without its advice to load with weights_only=False."""
    text = str(e)
    if m := re.search(r"unsupported (?:global: )?GLOBAL ([^\s]+)", text, re.IGNORECASE):
        return f"it references {m.group(1)}, which is not an allowed global (loading it could run code)"
    if m := re.search(r"WeightsUnpickler error: ([^\n]+)", text):
        return m.group(1).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip() and "weights_only" not in line]
    return lines[0] if lines else type(e).__name__


def pickle_to_safetensors(src: Path, dst: Path) -> None:
    """Load `src` weights-only and write its tensors as safetensors to `dst`."""
    import torch
    from safetensors.torch import save_file

    version = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
    if version < MIN_TORCH:
        raise CkptbendError(f"loading pickles needs torch >= {'.'.join(map(str, MIN_TORCH))} "
                            f"(weights-only loader fixes); this is {torch.__version__}")
    try:
        with torch.serialization.safe_globals(_allowed_globals()), warnings.catch_warnings():
            warnings.simplefilter("ignore")      # torch's UserWarnings are not for ckptbend's users
            obj = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError… for hostile/broken files
        raise CkptbendError(f"{src}: refused to load this pickle weights-only: {_why(e)}") from None
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        raise CkptbendError(f"{src}: no state dict inside this pickle")
    # clone: pickles may share storage between tensors, which safetensors refuses
    tensors = {k: v.detach().clone().contiguous() for k, v in state.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise CkptbendError(f"{src}: no tensors inside this pickle")
    save_file(tensors, str(dst), metadata={"format": "pt"})


@contextmanager
def readable(input: Path, beside: Path | None, cached: bool = True):
    """(safetensors path, source name, source SHA-256) for an input: itself (None, None), or a pickle
    converted weights-only into a temporary beside `beside` (the system's temporary folder if None),
    recorded under the pickle's own name and hash (`cached`: the hash may come from the cache)."""
    from .hash_cache import sha256_file
    from .output import temporary_folder

    if not is_pickle(input):
        yield input, None, None
        return
    scratch = temporary_folder(beside) if beside is not None else tempfile.TemporaryDirectory()
    with scratch as tmp:
        converted = Path(tmp) / (input.stem + ".safetensors")
        pickle_to_safetensors(input, converted)
        yield converted, input.name, sha256_file(input, cached=cached)
