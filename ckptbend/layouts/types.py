"""The shapes every layout module fills in: a checkpoint, its files, and its attention sites."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..safetensors_io import Header


@dataclass(frozen=True)
class Site:
    """One attention projection parameter (or a row range of a fused one)."""
    file: str
    key: str
    component: str
    attn: str                    # attn1 | attn2 (UNet) | self (text encoder)
    proj: str                    # q | k | v | out
    rows: tuple[int, int] | None = None   # row range inside a fused in_proj tensor
    group: str | None = None     # input | middle | output (UNet)
    block: str | None = None     # IN04, M00, OUT03 (UNet)
    depth: int | None = None     # transformer index inside the block (UNet)
    temporal: bool = False       # video temporal transformer (SVD time_stack)


@dataclass(frozen=True)
class CheckpointFile:
    rel: str                     # path relative to the checkpoint (the file name for single files)
    header: Header
    components: dict[str, str]   # tensor key → component


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    kind: str                    # "single-file" | "diffusers-folder" | "unet" | "text-encoder"
    architecture: str
    files: tuple[CheckpointFile, ...]
    sites: tuple[Site, ...]
    qk_norm: bool                # the UNet normalises q and k after projection

    @property
    def components(self) -> list[str]:
        seen = []
        for f in self.files:
            for c in f.components.values():
                if c not in seen:
                    seen.append(c)
        return seen
