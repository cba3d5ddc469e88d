"""A recipe as a value: frozen dataclasses the reader fills in (defaults included)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from .canonical import recipe_text, text_sha256
from .schema import BEND_MODE_PARAMS, SIMPLE_EXPANDS, SIMPLE_FIXED


class FrozenDict(Mapping):
    """A read-only, hashable mapping that keeps insertion order."""

    def __init__(self, items: Mapping | tuple = ()):
        self._data = {k: tuple(v) if isinstance(v, list) else v for k, v in dict(items).items()}

    def __getitem__(self, key):
        return self._data[key]

    def __iter__(self) -> Iterator:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        return hash(tuple(self._data.items()))

    def __repr__(self) -> str:
        return f"FrozenDict({self._data!r})"


@dataclass(frozen=True)
class MultiplyEntry:
    """One table of a multiplier section: its factors and which attentions it selects."""
    factors: tuple[tuple[str, float], ...]   # only values other than 1.0, in the section's key order
    blocks: tuple[str, ...] = ()             # block labels or groups; () = all
    depth: tuple[int, ...] = ()              # transformer depth inside a block; () = all
    encoders: tuple[str, ...] = ()           # clip / text only; () = all
    stream: str | None = None                # dit.joint only: "image" | "text"; None = both (and single blocks)

    def factor(self, key: str) -> float:
        return dict(self.factors).get(key, 1.0)

    @property
    def has_selector(self) -> bool:
        return bool(self.blocks or self.depth or self.encoders or self.stream)

    def values(self) -> dict[str, Any]:
        return {"blocks": self.blocks, "depth": self.depth, "encoders": self.encoders, "stream": self.stream,
                **dict(self.factors)}


@dataclass(frozen=True)
class SAGParams:
    scale: float = 0.5
    blur_sigma: float = 2.0


@dataclass(frozen=True)
class SlothfulParams:
    """Always the full node's parameter set; `simple` records that the recipe used the Simple node."""
    simple: bool = False
    time_decay: float = 1.0
    keep_middle: bool = True
    in_mode: str = "2D_AVG"
    out_mode: str = "2D_AVG"
    in_depth_decay: float = 1.0
    out_depth_decay: float = 1.0
    in_strength: float = 6.0
    out_strength: float = 4.0
    in_k_blend: float = 0.0
    in_v_blend: float = 0.0
    out_k_blend: float = 0.0
    out_v_blend: float = 0.0

    def __post_init__(self):
        if self.simple and not self._simple_representable():
            raise ValueError("SlothfulParams(simple=True) needs keep_middle=True and equal in/out "
                             "depth decays, equal in k/v blends and equal out k/v blends")

    def _simple_representable(self) -> bool:
        values = asdict(self)
        return (all(values[k] == v for k, v in SIMPLE_FIXED.items())
                and all(len({values[f] for f in full}) == 1 for full in SIMPLE_EXPANDS.values()))

    def simple_values(self) -> dict[str, Any]:
        """The Simple node's parameters (meaningful when `simple`)."""
        return {name: getattr(self, full[0]) for name, full in SIMPLE_EXPANDS.items()}


@dataclass(frozen=True)
class BendEntry:
    """One [[bending]] entry; only the fields of its mode are meaningful (see `params`).

    Its defaults are written again in runtime/bending.py's BendSpec on purpose: the runtime is copied
    verbatim into companions and may not import ckptbend."""
    token: str
    mode: str
    strength: float = 1.0
    apply_to_timesteps: tuple[int, int] | None = None   # [start, end] scheduler step indices, inclusive
    apply_to_layers: tuple[int, ...] | None = None      # cross-attention site indices
    renormalize: str = "row"                            # "row" | "column" | "none"
    scale_factor: float = 1.0
    zoom_factor: float = 1.0
    angle: float = 0.0
    translate_x: float = 0.0
    translate_y: float = 0.0
    flip_horizontal: bool = False
    flip_vertical: bool = False
    sharpen_amount: float = 1.0
    kernel_size: int = 3
    sigma: float = 1.0
    region: tuple[float, float, float, float] | None = None
    region_feather: float = 0.1
    filter: str | None = None       # frequency_filter: "lowpass" | "highpass" (with cutoff) ...
    cutoff: float | None = None     # ... or None: the original's sigma placeholder

    @property
    def params(self) -> dict[str, Any]:
        """This entry's mode parameters, defaults filled in."""
        return {name: getattr(self, name) for name in BEND_MODE_PARAMS[self.mode]}


@dataclass(frozen=True)
class Recipe:
    schema: int
    name: str
    description: str = ""
    architecture: tuple[str, ...] = ()      # the architectures its block labels are written for; () = any
    multipliers: Mapping[str, tuple[MultiplyEntry, ...]] = field(default_factory=FrozenDict)
    sag: SAGParams | None = None
    slothful: SlothfulParams | None = None
    bending: tuple[BendEntry, ...] = ()
    warnings: tuple[str, ...] = field(default=(), compare=False, hash=False)

    def __post_init__(self):
        if not isinstance(self.multipliers, FrozenDict):
            object.__setattr__(self, "multipliers", FrozenDict(self.multipliers))
        object.__setattr__(self, "bending", tuple(self.bending))
        object.__setattr__(self, "architecture", tuple(self.architecture))
        object.__setattr__(self, "warnings", tuple(self.warnings))

    @property
    def has_dynamic(self) -> bool:
        """Whether part of the recipe only works at sampling time (SAG, Slothful, Bending)."""
        return self.sag is not None or self.slothful is not None or bool(self.bending)

    def canonical(self) -> str:
        """Deterministic TOML text that `parse_recipe` reads back to an equal Recipe."""
        return recipe_text(self)

    @property
    def sha256(self) -> str:
        return text_sha256(self.canonical())
