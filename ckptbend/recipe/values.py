"""A recipe as a value: frozen dataclasses the reader fills in (defaults included)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from .canonical import recipe_text, text_sha256
from ..runtime.defaults import BEND_DEFAULTS as BEND, SAG_DEFAULTS as SAG, SLOTHFUL_DEFAULTS as SLOTHFUL
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
    stream: str | None = None                # dit.joint, dit.self: "image" | "text" | "reference"; None = all

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
    scale: float = SAG["scale"]
    blur_sigma: float = SAG["blur_sigma"]


@dataclass(frozen=True)
class SlothfulParams:
    """Always the full node's parameter set; `simple` records that the recipe used the Simple node."""
    simple: bool = False
    time_decay: float = SLOTHFUL["time_decay"]
    keep_middle: bool = SLOTHFUL["keep_middle"]
    in_mode: str = SLOTHFUL["in_mode"]
    out_mode: str = SLOTHFUL["out_mode"]
    in_depth_decay: float = SLOTHFUL["in_depth_decay"]
    out_depth_decay: float = SLOTHFUL["out_depth_decay"]
    in_strength: float = SLOTHFUL["in_strength"]
    out_strength: float = SLOTHFUL["out_strength"]
    in_k_blend: float = SLOTHFUL["in_k_blend"]
    in_v_blend: float = SLOTHFUL["in_v_blend"]
    out_k_blend: float = SLOTHFUL["out_k_blend"]
    out_v_blend: float = SLOTHFUL["out_v_blend"]

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
    """One [[bending]] entry; only the fields of its mode are meaningful (see `params`). Its defaults are the
    runtime's (runtime/defaults.py, shared with the companion's BendSpec), except cutoff: unset in a recipe."""
    token: str
    mode: str
    strength: float = BEND["strength"]
    apply_to_timesteps: tuple[int, int] | None = BEND["apply_to_timesteps"]   # [start, end] step indices, inclusive
    apply_to_layers: tuple[int, ...] | None = BEND["apply_to_layers"]         # text-attention site indices
    renormalize: str = BEND["renormalize"]                                    # "row" | "column" | "none"
    scale_factor: float = BEND["scale_factor"]
    zoom_factor: float = BEND["zoom_factor"]
    angle: float = BEND["angle"]
    translate_x: float = BEND["translate_x"]
    translate_y: float = BEND["translate_y"]
    flip_horizontal: bool = BEND["flip_horizontal"]
    flip_vertical: bool = BEND["flip_vertical"]
    sharpen_amount: float = BEND["sharpen_amount"]
    kernel_size: int = BEND["kernel_size"]
    sigma: float = BEND["sigma"]
    region: tuple[float, float, float, float] | None = BEND["region"]
    region_feather: float = BEND["region_feather"]
    filter: str | None = BEND["filter"]   # frequency_filter: "lowpass" | "highpass" (with cutoff) ...
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
