"""The shapes every layout module fills in: a checkpoint, its files, and its attention sites."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..safetensors_io import Header

# The module of a qk-norm weight says so: query_norm, q_norm, norm_q, norm_added_k, norm_k_img, ln_q, q_rms_norm.
NORM_KEY = re.compile(r"(?:^|[._])(?:ln_[qk]|[A-Za-z0-9_]*norm[A-Za-z0-9_]*)\.(?:weight|scale)$")


@dataclass(frozen=True)
class Site:
    """One attention projection parameter (or a row range of a fused one)."""
    file: str
    key: str
    component: str               # unet | dit | a text encoder (clip_l, t5xxl, ...)
    attn: str                    # attn1 | attn2 (UNet) | joint | self | cross (DiT) | self (text encoder)
    proj: str                    # q | k | v | out
    rows: tuple[int, int] | None = None   # row range inside a fused tensor (qkv, in_proj, linear1)
    group: str | None = None     # input | middle | output (UNet); double | single | ... (DiT)
    block: str | None = None     # IN04, M00, OUT03 (UNet); D03, S12, J05, B07 (DiT)
    depth: int | None = None     # transformer index inside the block (UNet)
    temporal: bool = False       # video temporal transformer (SVD time_stack)
    cols: tuple[int, int] | None = None   # column range of a fused input (Flux single blocks' linear2)
    stream: str | None = None    # image | text: the token stream of a joint attention; None: both
    inert: str | None = None     # why a factor here cannot change the output (structurally dead), or None
    fused: int | None = None     # the length the fused axis must have (3·h rows for q|k|v): detection checks it
    offset: float = 0.0          # a norm weight w the model uses as (w + offset) (Gemma 3's qk-norm: 1): factors
                                 # scale (w + offset), so w becomes f·(w + offset) − offset
    softmax: str | None = None   # which attention of its block it feeds, where block and attn do not tell it
                                 # (LTX-2's audio→video and video→audio attentions: two softmaxes, both joint)

    @property
    def bias(self) -> bool:
        return self.key.endswith("bias")          # `….bias`, OpenCLIP's `in_proj_bias`

    @property
    def norm(self) -> bool:
        """A qk-norm weight (1-D), not a projection: every family names its module so."""
        return bool(NORM_KEY.search(self.key))


@dataclass(frozen=True)
class Identified:
    """What a family recognised in a single file."""
    kind: str                    # "single-file" | "unet" | "dit" | "text-encoder"
    architecture: str
    components: dict[str, str]   # tensor key → component, for the keys that belong to one

    @classmethod
    def model_file(cls, arch: str, components: dict[str, str]) -> "Identified":
        """A DiT file: "dit" where it holds the model alone, else "single-file" (encoders or VAE beside it)."""
        return cls("dit" if set(components.values()) == {"dit"} else "single-file", arch, components)


@dataclass(frozen=True)
class CheckpointFile:
    rel: str                     # path relative to the checkpoint (the file name for single files)
    header: Header
    components: dict[str, str]   # tensor key → component


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    kind: str                    # "single-file" | "diffusers-folder" | "unet" | "dit" | "text-encoder"
    architecture: str
    files: tuple[CheckpointFile, ...]
    sites: tuple[Site, ...]
    qk_norm: bool                # the model normalises q and k after projection (UNet, or DiT qk-norm weights)
    left_alone: tuple[str, ...] = ()   # parts of the files no section reaches (a T5 decoder, a vision tower)

    @property
    def components(self) -> list[str]:
        seen = []
        for f in self.files:
            for c in f.components.values():
                if c not in seen:
                    seen.append(c)
        return seen
