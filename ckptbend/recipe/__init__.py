"""Recipes: the TOML file that says what to bake, and what to hand to run time.

    schema = 1
    name = "sharper-details"
    [unet.self]            # UNetSelfAttentionMultiply (attn1)
    q = 1.1
    [[unet.cross]]         # an array of tables: several entries, each with an optional selector
    blocks = ["IN07", "M00"]
    v = 1.05

The schema is data: every section is a table of `Param`s (kind, default, ranges), and one reader
and one writer walk those tables. Reading validates everything and fills in defaults; a recipe is
a frozen value whose canonical TOML text (and its sha256) does not depend on formatting, key
order, comments, `1` vs `1.0` or values written out at their default.

Ranges come in two strengths: *hard* bounds say where a value means something (a multiplier is
never negative, a blur sigma is positive) and always apply; *soft* ranges are the limits the
original node's widgets enforce (0-10 for ComfyUI's multipliers) and give way to
`allow_out_of_range=True` (the CLI's --allow-out-of-range).
"""

from .reader import load_recipe, parse_recipe, recipe_sections  # noqa: F401
from .schema import (BEND_COMMON, BEND_MODE_PARAMS, BEND_MODES, BEND_PARAMS, BLOCK_GROUPS, DYNAMIC_SECTIONS,  # noqa: F401
                     MULTIPLIER_SECTIONS, SAG_PARAMS, SCHEMA_VERSION, SECTIONS, SELECTORS, SLOTHFUL_MODES,
                     SLOTHFUL_PARAMS, Param, bend_params, multiply_params)
from .values import BendEntry, FrozenDict, MultiplyEntry, Recipe, SAGParams, SlothfulParams  # noqa: F401
