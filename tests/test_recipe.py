"""Recipe parsing, validation messages, defaults, canonical form and hash."""

from dataclasses import fields
from pathlib import Path

import pytest

from ckptbend.errors import CkptbendError
from ckptbend.recipe import (
    BEND_COMMON,
    BEND_PARAMS,
    MULTIPLIER_SECTIONS,
    SAG_PARAMS,
    SLOTHFUL_PARAMS,
    BendEntry,
    FrozenDict,
    MultiplyEntry,
    Recipe,
    SAGParams,
    SlothfulParams,
    load_recipe,
    parse_recipe,
)

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
HEAD = 'schema = 1\nname = "t"\n'


def parse(body: str, **kw) -> Recipe:
    return parse_recipe(HEAD + body, "recipe.toml", **kw)


def error_of(text: str, **kw) -> str:
    with pytest.raises(CkptbendError) as info:
        parse_recipe(text, "recipe.toml", **kw)
    message = str(info.value)
    assert "\n" not in message, "errors are one line"
    assert message.startswith("recipe.toml: ")
    return message


# --- every validation error --------------------------------------------------------------------

HEADER_ERRORS = [
    ('schema = 1\nname = "t"\n[unet.self\n', "invalid TOML: "),
    ('name = "t"\n', "missing 'schema = 1'"),
    ('schema = 2\nname = "t"\n', "unsupported schema 2"),
    ('schema = "1"\nname = "t"\n', "schema must be the integer 1, not a string"),
    ('schema = true\nname = "t"\n', "schema must be the integer 1, not a boolean"),
    ('schema = 1.0\nname = "t"\n', "schema must be the integer 1, not a float"),
    ("schema = 1\n", "missing 'name'"),
    ("schema = 1\nname = 3\n", "name must be a string, not an integer"),
    ('schema = 1\nname = ""\n', "filename-safe slug"),
    ('schema = 1\nname = "my recipe"\n', "filename-safe slug"),
    ('schema = 1\nname = "-dash-first"\n', "filename-safe slug"),
    ('schema = 1\nname = "a/b"\n', "filename-safe slug"),
    ('schema = 1\nname = "t"\ndescription = 1\n', "description must be a string"),
    ('schema = 1\nname = "t"\nnmae = "x"\n', "unknown top-level key 'nmae' (did you mean 'name'?)"),
    ('schema = 1\nname = "t"\ncolour = "red"\n', "unknown top-level key 'colour' (expected one of:"),
    ('schema = 1\nname = "t"\n[sga]\n', "unknown section [sga] (did you mean [sag]?)"),
    ('schema = 1\nname = "t"\n[self]\nq = 1.1\n', "unknown section [self] (did you mean [unet.self] or [dit.self]?)"),
    ('schema = 1\nname = "t"\n[unet.slef]\nq = 1.1\n', "unknown section [unet.slef] (did you mean [unet.self]?)"),
    ('schema = 1\nname = "t"\nunet = 1\n', "unet must hold the sections [unet.self]"),
    ('schema = 1\nname = "t"\n[unet]\nq = 1.1\n', "[unet] unknown key 'q': factors go in [unet.self]"),
    ('schema = 1\nname = "t"\nclip = 1\n', "[clip] must be a table or an array of tables, not an integer"),
    ('schema = 1\nname = "t"\n[[sag]]\n', "[sag] must be a table, not an array"),
    ('schema = 1\nname = "t"\n[[slothful]]\n', "[slothful] must be a table, not an array"),
    ('schema = 1\nname = "t"\nbending = "x"\n', "[bending] must be a table or an array of tables"),
]

MULTIPLY_ERRORS = [
    ("[unet.self]\nqq = 1.1\n", "[unet.self] unknown key 'qq' (did you mean 'q'?)"),
    ("[unet.cross]\nvalu = 1.1\n", "[unet.cross] unknown key 'valu' (expected one of:"),
    ("[unet.self]\nzzz = 1.1\n", "unknown key 'zzz' (expected one of: 'blocks', 'depth', 'q', 'k', 'v', 'out')"),
    ("[unet.temporal]\nself_temproal = 1.1\n", "unknown key 'self_temproal' (did you mean 'self_temporal'?)"),
    ("[clip]\noutt = 0.9\n", "[clip] unknown key 'outt' (did you mean 'out'?)"),
    ("[[unet.self]]\nq = 1.1\n[[unet.self]]\nkk = 1.1\n", "[[unet.self]] entry 2 unknown key 'kk'"),
    ('[unet.self]\nq = "1.1"\n', 'q must be a number, not a string ("1.1")'),
    ("[unet.self]\nq = true\n", "q must be a number, not a boolean (true)"),
    ("[unet.self]\nq = [1.1]\n", "q must be a number, not an array"),
    ("[unet.self]\nq = {a = 1}\n", "q must be a number, not a table"),
    ("[unet.self]\nq = 1979-05-27\n", "q must be a number, not a date/time"),
    ("[unet.self]\nq = nan\n", "q = nan is not a finite number"),
    ("[unet.self]\nq = inf\n", "q = inf is not a finite number"),
    ("[unet.self]\nq = -inf\n", "q = -inf is not a finite number"),
    ("[unet.self]\nq = -0.5\n", "[unet.self] q = -0.5 must be >= 0"),
    ("[unet.self]\nq = 12.0\n", "q = 12.0 is outside ComfyUI's range 0 to 10 (pass --allow-out-of-range"),
    ("[unet.temporal]\nself_temporal = 10.5\n", "self_temporal = 10.5 is outside ComfyUI's range"),
    ("[clip]\nblocks = [\"IN01\"]\nq = 1.1\n", "[clip] 'blocks' is not a selector of [clip] (its selectors: encoders)"),
    ("[clip]\ndepth = [0]\n", "'depth' is not a selector of [clip]"),
    ('[unet.self]\nencoders = ["clip_l"]\n', "'encoders' is not a selector of [unet.self] (its selectors: blocks, depth)"),
    ('[unet.self]\nblocks = "IN01"\n', "blocks must be an array of block labels, not a string"),
    ("[unet.self]\nblocks = []\n", "blocks = [] selects nothing; leave blocks out to select all"),
    ('[unet.self]\nblocks = ["IN1"]\n', 'blocks: "IN1" is not a block label'),
    ('[unet.self]\nblocks = ["M01"]\n', 'blocks: "M01" is not a block label'),
    ('[unet.self]\nblocks = ["IN07 "]\n', 'blocks: "IN07 " is not a block label'),
    ('[dit.joint]\nblocks = ["X05"]\n', 'blocks: "X05" is not a transformer block label (D00, S12, J05, B07, ...) or group (double, single, vace)'),
    ('[dit.self]\nblocks = ["doubel"]\n', "(did you mean 'double'?)"),
    ('[dit.cross]\nblocks = ["b03"]\n', "(did you mean 'B03'?)"),
    ('[unet.self]\nblocks = ["in07"]\n', "(did you mean 'IN07'?)"),
    ('[unet.self]\nblocks = ["midle"]\n', "(did you mean 'middle'?)"),
    ("[unet.self]\nblocks = [7]\n", "blocks must hold block labels (strings), not 7"),
    ('[unet.self]\nblocks = ["IN07", "IN07"]\n', 'blocks lists "IN07" twice'),
    ("[unet.self]\ndepth = 1\n", "depth must be an array of integers >= 0, not an integer"),
    ("[unet.self]\ndepth = [-1]\n", "depth must hold integers >= 0, not -1"),
    ("[unet.self]\ndepth = [1.0]\n", "depth must hold integers >= 0, not 1.0"),
    ("[unet.self]\ndepth = [true]\n", "depth must hold integers >= 0, not true"),
    ("[unet.self]\ndepth = [0, 0]\n", "depth lists 0 twice"),
    ("[unet.self]\ndepth = []\n", "depth = [] selects nothing"),
    ('[clip]\nencoders = ["clip_x"]\n', 'encoders: "clip_x" is not a text encoder (did you mean "clip_'),
    ('[clip]\nencoders = ["t5"]\n', 'encoders: "t5" is not a text encoder (expected one of: "clip_l", "clip_g", "clip_h", "all")'),
    ('[clip]\nencoders = ["all", "clip_l"]\n', 'encoders: "all" cannot be combined with other encoders'),
    ('[clip]\nencoders = "clip_l"\n', "encoders must be an array of text encoder names"),
    ("[clip]\nencoders = []\n", "encoders = [] selects nothing"),
]

SAG_ERRORS = [
    ("[sag]\nblur_sigma = 0\n", "[sag] blur_sigma = 0 must be > 0; ComfyUI's SAG produces NaN at blur_sigma 0; "
                                "use a tiny positive value such as 0.01, or leave [sag] out"),
    ("[sag]\nblur_sigma = 0.0\n", "blur_sigma = 0.0 must be > 0; ComfyUI's SAG produces NaN"),
    ("[sag]\nblur_sigma = -1.0\n", "blur_sigma = -1.0 must be > 0"),
    ("[sag]\nblur_sigma = 10.5\n", "blur_sigma = 10.5 is outside ComfyUI's range 0 to 10"),
    ("[sag]\nscale = 5.5\n", "[sag] scale = 5.5 is outside ComfyUI's range -2 to 5"),
    ("[sag]\nscale = -2.5\n", "scale = -2.5 is outside ComfyUI's range -2 to 5"),
    ('[sag]\nscale = "high"\n', "scale must be a number, not a string"),
    ("[sag]\nsclae = 0.5\n", "[sag] unknown key 'sclae' (did you mean 'scale'?)"),
]

SLOTHFUL_ERRORS = [
    ('[slothful]\nin_mode = "2d_avg"\n', '[slothful] in_mode = "2d_avg" is not valid (did you mean "2D_AVG"?)'),
    ('[slothful]\nout_mode = "median"\n', 'out_mode = "median" is not valid (expected one of: "1D_AVG", "1D_MAX", "2D_AVG", "2D_MAX")'),
    ("[slothful]\nin_mode = 2\n", "in_mode must be a string, not an integer"),
    ('[slothful]\nkeep_middle = "yes"\n', "keep_middle must be true or false, not a string"),
    ("[slothful]\ntime_decay = 5.0\n", "time_decay = 5.0 is outside the node's range 0 to 4"),
    ("[slothful]\ntime_decay = -0.5\n", "time_decay = -0.5 must be >= 0"),
    ("[slothful]\nin_depth_decay = -3.0\n", "in_depth_decay = -3.0 is outside the node's range -2 to 4"),
    ("[slothful]\nin_strength = 51\n", "in_strength = 51 is outside the node's range 0 to 50"),
    ("[slothful]\nout_strength = -1\n", "out_strength = -1 must be >= 0"),
    ("[slothful]\nin_k_blend = 1.5\n", "in_k_blend = 1.5 is outside the node's range 0 to 1"),
    ("[slothful]\ntime_decy = 1.0\n", "[slothful] unknown key 'time_decy' (did you mean 'time_decay'?)"),
    ("[slothful]\ndepth_decay = 1.5\n", "'depth_decay' is a parameter of Slothful Attention Simple; add simple = true, "
                                        "or use in_depth_decay and out_depth_decay"),
    ("[slothful]\nin_blend = 0.5\n", "'in_blend' is a parameter of Slothful Attention Simple; add simple = true, "
                                     "or use in_k_blend and in_v_blend"),
    ("[slothful]\nsimple = true\nin_k_blend = 0.5\n", "'in_k_blend' is not a parameter of Slothful Attention Simple "
                                                      "(simple = true); use 'in_blend', or remove simple = true"),
    ("[slothful]\nsimple = true\nout_depth_decay = 0.5\n", "use 'depth_decay', or remove simple = true"),
    ("[slothful]\nsimple = true\nkeep_middle = false\n", "'keep_middle' is fixed to true in Slothful Attention Simple"),
    ("[slothful]\nsimple = true\ndepth_decay = 9.0\n", "depth_decay = 9.0 is outside the node's range -2 to 4"),
    ('[slothful]\nsimple = "yes"\n', "simple must be true or false, not a string"),
]

BEND = '[[bending]]\ntoken = "cat"\n'
BENDING_ERRORS = [
    ('[[bending]]\nmode = "scale"\n', "[[bending]] entry 1 missing required key 'token'"),
    ('[[bending]]\ntoken = ""\nmode = "scale"\n', "token must not be empty"),
    ('[[bending]]\ntoken = "  "\nmode = "scale"\n', "token must not be empty"),
    ('[[bending]]\ntoken = 5\nmode = "scale"\n', "token must be a string, not an integer"),
    (BEND, "missing required key 'mode' (one of: scale, spatial_scale, rotate, translate, flip, blur, sharpen, "
           "regional_mask, frequency_filter)"),
    (BEND + 'mode = "rotat"\n', 'mode = "rotat" is not valid (did you mean "rotate"?)'),
    (BEND + 'mode = "zoom"\n', 'mode = "zoom" is not valid (expected one of: "scale"'),
    (BEND + "mode = 1\n", "mode must be a string, not an integer"),
    (BEND + 'mode = "blur"\nangle = 10.0\n', "mode \"blur\" has no parameter 'angle' (it takes kernel_size, sigma)"),
    (BEND + 'mode = "scale"\nregion = [0, 0, 1, 1]\n', "mode \"scale\" has no parameter 'region' (it takes scale_factor)"),
    (BEND + 'mode = "flip"\nsigma = 1.0\n', "mode \"flip\" has no parameter 'sigma'"),
    (BEND + 'mode = "scale"\nstrenght = 0.5\n', "unknown key 'strenght' (did you mean 'strength'?)"),
    (BEND + 'mode = "rotate"\nangel = 5.0\n', "unknown key 'angel' (did you mean 'angle'?)"),
    (BEND + 'mode = "scale"\nstrength = "x"\n', "strength must be a number, not a string"),
    (BEND + 'mode = "scale"\nscale_factor = nan\n', "scale_factor = nan is not a finite number"),
    (BEND + 'mode = "scale"\napply_to_timesteps = [5, 4]\n', "apply_to_timesteps must be [start, end]: step indices with 0 <= start <= end, not [5, 4]"),
    (BEND + 'mode = "scale"\napply_to_timesteps = [-1, 5]\n', "apply_to_timesteps must be [start, end]"),
    (BEND + 'mode = "scale"\napply_to_timesteps = [0, 5, 9]\n', "apply_to_timesteps must be [start, end]"),
    (BEND + 'mode = "scale"\napply_to_timesteps = [0.0, 5]\n', "apply_to_timesteps must be [start, end]"),
    (BEND + 'mode = "scale"\napply_to_timesteps = 5\n', "apply_to_timesteps must be [start, end]"),
    (BEND + 'mode = "scale"\napply_to_layers = [-1]\n', "apply_to_layers must hold integers >= 0, not -1"),
    (BEND + 'mode = "scale"\napply_to_layers = []\n', "apply_to_layers = [] selects nothing"),
    (BEND + 'mode = "scale"\napply_to_layers = [2, 2]\n', "apply_to_layers lists 2 twice"),
    (BEND + 'mode = "scale"\nrenormalize = "both"\n', 'renormalize must be true, false, "row", "column" or "none", not "both"'),
    (BEND + 'mode = "scale"\nrenormalize = 1\n', "renormalize must be true, false"),
    (BEND + 'mode = "spatial_scale"\nzoom_factor = 0.0\n', "zoom_factor = 0.0 must be > 0"),
    (BEND + 'mode = "translate"\ntranslate_x = 1.5\n', "translate_x = 1.5 is outside the documented range -1 to 1"),
    (BEND + 'mode = "flip"\nflip_horizontal = 1\n', "flip_horizontal must be true or false, not an integer"),
    (BEND + 'mode = "blur"\nkernel_size = 0\n', "kernel_size = 0 must be >= 1"),
    (BEND + 'mode = "blur"\nkernel_size = 3.0\n', "kernel_size must be an integer, not a float (3.0)"),
    (BEND + 'mode = "blur"\nsigma = 0\n', "sigma = 0 must be > 0"),
    (BEND + 'mode = "sharpen"\nsharpen_amount = "lots"\n', "sharpen_amount must be a number"),
    (BEND + 'mode = "regional_mask"\nregion = [0, 0, 1]\n', "region must be [x1, y1, x2, y2], not [0, 0, 1]"),
    (BEND + 'mode = "regional_mask"\nregion = "top"\n', "region must be [x1, y1, x2, y2]"),
    (BEND + 'mode = "regional_mask"\nregion = [0, 0, 1.5, 1]\n', "region x2 = 1.5 must be in [0, 1]"),
    (BEND + 'mode = "regional_mask"\nregion = ["a", 0, 1, 1]\n', "region x1 must be a number, not a string"),
    (BEND + 'mode = "regional_mask"\nregion = [0.5, 0, 0.2, 1]\n', "needs x1 < x2 and y1 < y2"),
    (BEND + 'mode = "regional_mask"\nregion = [0, 0.5, 1, 0.5]\n', "needs x1 < x2 and y1 < y2"),
    (BEND + 'mode = "regional_mask"\nregion = [0, 0, 1, 1]\nregion_feather = -0.1\n', "region_feather = -0.1 must be >= 0"),
    (BEND + 'mode = "frequency_filter"\nsigma = 0.5\nfilter = "lowpass"\ncutoff = 0.5\n', "either sigma or filter + cutoff, not both"),
    (BEND + 'mode = "frequency_filter"\nfilter = "lowpass"\n', "filter and cutoff go together"),
    (BEND + 'mode = "frequency_filter"\ncutoff = 0.5\n', "filter and cutoff go together"),
    (BEND + 'mode = "frequency_filter"\nfilter = "lowpass"\ncutoff = 0\n', "cutoff = 0 must be in (0, 1]"),
    (BEND + 'mode = "frequency_filter"\nfilter = "lowpass"\ncutoff = 1.5\n', "cutoff = 1.5 must be in (0, 1]"),
    (BEND + 'mode = "frequency_filter"\nfilter = "bandpass"\ncutoff = 0.5\n', 'filter = "bandpass" is not valid'),
    (BEND + 'mode = "scale"\n' + BEND + 'mode = "scal"\n', '[[bending]] entry 2 mode = "scal" is not valid (did you mean "scale"?)'),
]


@pytest.mark.parametrize("text, fragment", HEADER_ERRORS)
def test_header_and_section_errors(text, fragment):
    assert fragment in error_of(text)


@pytest.mark.parametrize("body, fragment", MULTIPLY_ERRORS + SAG_ERRORS + SLOTHFUL_ERRORS + BENDING_ERRORS)
def test_section_errors(body, fragment):
    assert fragment in error_of(HEAD + body)


def test_error_names_file_and_path_exactly():
    assert error_of(HEAD + "[unet.self]\nqq = 1.1\n") == "recipe.toml: [unet.self] unknown key 'qq' (did you mean 'q'?)"


def test_default_source_name():
    with pytest.raises(CkptbendError, match=r"^<recipe>: missing 'schema = 1'"):
        parse_recipe("")


# --- allow_out_of_range: soft ranges give way, hard bounds do not ---------------------------------

@pytest.mark.parametrize("body, attr", [
    ("[unet.self]\nq = 12.0\n", lambda r: r.multipliers["unet.self"][0].factor("q")),
    ("[sag]\nscale = 7.0\n", lambda r: r.sag.scale),
    ("[sag]\nblur_sigma = 20.0\n", lambda r: r.sag.blur_sigma),
    ("[slothful]\nin_strength = 80.0\n", lambda r: r.slothful.in_strength),
    ('[[bending]]\ntoken = "a"\nmode = "translate"\ntranslate_y = -1.5\n', lambda r: r.bending[0].translate_y),
])
def test_allow_out_of_range_accepts_soft_range(body, attr):
    with pytest.raises(CkptbendError, match="--allow-out-of-range"):
        parse(body)
    assert attr(parse(body, allow_out_of_range=True)) == float(body.split("= ")[-1])


@pytest.mark.parametrize("body, fragment", [
    ("[unet.self]\nq = -1.0\n", "must be >= 0"),
    ("[unet.self]\nq = nan\n", "not a finite number"),
    ("[sag]\nblur_sigma = 0.0\n", "must be > 0"),
    ("[slothful]\ntime_decay = -1.0\n", "must be >= 0"),
    ('[[bending]]\ntoken = "a"\nmode = "regional_mask"\nregion = [0, 0, 2, 1]\n', "must be in [0, 1]"),
])
def test_allow_out_of_range_keeps_hard_bounds(body, fragment):
    assert fragment in error_of(HEAD + body, allow_out_of_range=True)


# --- warnings -----------------------------------------------------------------------------------

def test_large_qk_product_warns_per_entry():
    r = parse("[[unet.self]]\nq = 2.5\nk = 2.0\n[[unet.self]]\nblocks = [\"M00\"]\nq = 2.0\nk = 2.0\n"
              "[unet.cross]\nq = 3.0\nk = 1.5\n")
    assert len(r.warnings) == 2      # 2.0 x 2.0 = 4 is not above the threshold
    assert r.warnings[0].startswith("recipe.toml: [[unet.self]] entry 1 q x k = 2.5 x 2 = 5 (> 4)")
    assert "fp16" in r.warnings[0]
    assert r.warnings[1].startswith("recipe.toml: [unet.cross] q x k = 3 x 1.5 = 4.5")


def test_no_warnings_for_ordinary_recipe():
    assert parse("[unet.self]\nq = 1.5\nk = 1.5\n").warnings == ()


def test_even_kernel_size_warns():
    r = parse('[[bending]]\ntoken = "a"\nmode = "blur"\nkernel_size = 4\n')
    assert r.bending[0].kernel_size == 4     # kept as written
    assert r.warnings == ("recipe.toml: [[bending]] entry 1 kernel_size = 4 is even; the blur raises it to 5",)


def test_warnings_do_not_affect_equality_or_hash():
    a = parse("[unet.self]\nq = 2.5\nk = 2.5\n")
    b = Recipe(schema=1, name="t", multipliers={"unet.self": (MultiplyEntry((("q", 2.5), ("k", 2.5))),)})
    assert a.warnings and not b.warnings
    assert a == b and hash(a) == hash(b) and a.sha256 == b.sha256


# --- values and defaults ------------------------------------------------------------------------

def test_minimal_recipe():
    r = parse("")
    assert (r.schema, r.name, r.description) == (1, "t", "")
    assert r.multipliers == {} and r.sag is None and r.slothful is None and r.bending == ()
    assert not r.has_dynamic and r.warnings == ()


def test_multiplier_entry_keeps_non_default_factors_in_canonical_order():
    r = parse("[unet.self]\nout = 0.9\nk = 1\nq = 1.2\n[unet.temporal]\ncross_temporal = 2\nself_structural = 0.5\n")
    (entry,) = r.multipliers["unet.self"]
    assert entry.factors == (("q", 1.2), ("out", 0.9))
    assert entry.factor("q") == 1.2 and entry.factor("k") == 1.0 and entry.factor("v") == 1.0
    assert (entry.blocks, entry.depth, entry.encoders) == ((), (), ())
    assert r.multipliers["unet.temporal"][0].factors == (("self_structural", 0.5), ("cross_temporal", 2.0))
    assert isinstance(r.multipliers["unet.temporal"][0].factors[1][1], float)


def test_sections_come_in_canonical_order():
    r = parse("[clip]\nq = 0.9\n[unet.cross]\nv = 1.1\n[unet.self]\nq = 1.1\n")
    assert list(r.multipliers) == ["unet.self", "unet.cross", "clip"]
    assert set(r.multipliers) <= set(MULTIPLIER_SECTIONS)


def test_array_of_tables_keeps_file_order_and_selectors():
    r = parse('[[unet.self]]\nblocks = ["OUT05", "IN04", "middle", "M00"]\ndepth = [2, 0]\nq = 1.1\n'
              "[[unet.self]]\nk = 0.9\n")
    first, second = r.multipliers["unet.self"]
    assert first.blocks == ("IN04", "middle", "M00", "OUT05")    # sorted input → middle → output
    assert first.depth == (0, 2)
    assert second.factors == (("k", 0.9),) and not second.has_selector


def test_block_label_shape_is_checked_not_existence():
    r = parse('[unet.cross]\nblocks = ["IN11", "OUT11", "IN99", "input", "output"]\nv = 1.1\n')
    assert r.multipliers["unet.cross"][0].blocks == ("input", "IN11", "IN99", "output", "OUT11")


@pytest.mark.parametrize("encoders, expected", [
    ('"all"', ()), ('["all"]', ()), ('["clip_g"]', ("clip_g",)),
    ('["clip_h", "clip_l"]', ("clip_l", "clip_h")), ('["clip_g", "clip_l", "clip_h"]', ("clip_l", "clip_g", "clip_h")),
])
def test_clip_encoders(encoders, expected):
    assert parse(f"[clip]\nencoders = {encoders}\nout = 0.9\n").multipliers["clip"][0].encoders == expected


def test_no_op_entries_and_sections_are_dropped_but_selector_entries_kept():
    r = parse("[unet.self]\nq = 1.0\nk = 1\n[[unet.cross]]\nv = 1.0\n[[unet.cross]]\nv = 1.1\n"
              '[[unet.temporal]]\nblocks = ["M00"]\n')
    assert list(r.multipliers) == ["unet.cross", "unet.temporal"]
    assert r.multipliers["unet.cross"] == (MultiplyEntry((("v", 1.1),)),)
    assert r.multipliers["unet.temporal"] == (MultiplyEntry((), blocks=("M00",)),)


def test_zero_is_a_valid_multiplier_and_negative_zero_is_normalised():
    entry = parse("[unet.cross]\nv = 0\nout = -0.0\n").multipliers["unet.cross"][0]
    assert entry.factors == (("v", 0.0), ("out", 0.0))
    assert str(entry.factor("out")) == "0.0"


def test_sag_defaults():
    assert parse("[sag]\n").sag == SAGParams(scale=0.5, blur_sigma=2.0)
    assert parse("[sag]\nscale = -1\nblur_sigma = 0.01\n").sag == SAGParams(-1.0, 0.01)
    assert parse("[sag]\n").has_dynamic


def test_slothful_defaults():
    s = parse("[slothful]\n").slothful
    assert s == SlothfulParams()
    assert (s.simple, s.time_decay, s.keep_middle, s.in_mode, s.out_mode) == (False, 1.0, True, "2D_AVG", "2D_AVG")
    assert (s.in_depth_decay, s.out_depth_decay, s.in_strength, s.out_strength) == (1.0, 1.0, 6.0, 4.0)
    assert (s.in_k_blend, s.in_v_blend, s.out_k_blend, s.out_v_blend) == (0.0, 0.0, 0.0, 0.0)


def test_slothful_simple_expands_to_full_set():
    s = parse('[slothful]\nsimple = true\ntime_decay = 2\ndepth_decay = -1.5\nin_mode = "1D_MAX"\n'
              "in_strength = 10\nin_blend = 0.25\nout_mode = \"2D_MAX\"\nout_strength = 3\nout_blend = 1\n").slothful
    assert s == SlothfulParams(simple=True, time_decay=2.0, keep_middle=True, in_mode="1D_MAX", out_mode="2D_MAX",
                               in_depth_decay=-1.5, out_depth_decay=-1.5, in_strength=10.0, out_strength=3.0,
                               in_k_blend=0.25, in_v_blend=0.25, out_k_blend=1.0, out_v_blend=1.0)
    assert s.simple_values()["depth_decay"] == -1.5


def test_slothful_simple_is_remembered_in_canonical_form():
    simple = parse("[slothful]\nsimple = true\nin_blend = 0.5\n")
    full = parse("[slothful]\nin_k_blend = 0.5\nin_v_blend = 0.5\n")
    assert simple.slothful.in_k_blend == full.slothful.in_k_blend == 0.5
    assert simple != full and simple.sha256 != full.sha256
    assert "[slothful]\nsimple = true\nin_blend = 0.5\n" in simple.canonical()
    assert "[slothful]\nin_k_blend = 0.5\nin_v_blend = 0.5\n" in full.canonical()
    assert parse("[slothful]\nsimple = false\nkeep_middle = true\n") == parse("[slothful]\n")


def test_slothful_simple_must_be_representable():
    with pytest.raises(ValueError):
        SlothfulParams(simple=True, in_k_blend=0.1)
    with pytest.raises(ValueError):
        SlothfulParams(simple=True, keep_middle=False)


def test_bending_defaults():
    (b,) = parse('[[bending]]\ntoken = "kiss"\nmode = "scale"\n').bending
    assert b == BendEntry(token="kiss", mode="scale")
    assert (b.strength, b.apply_to_timesteps, b.apply_to_layers, b.renormalize) == (1.0, None, None, "row")
    assert b.params == {"scale_factor": 1.0}


@pytest.mark.parametrize("mode, params", [
    ("scale", {"scale_factor": 1.0}),
    ("spatial_scale", {"zoom_factor": 1.0}),
    ("rotate", {"angle": 0.0}),
    ("translate", {"translate_x": 0.0, "translate_y": 0.0}),
    ("flip", {"flip_horizontal": False, "flip_vertical": False}),
    ("blur", {"kernel_size": 3, "sigma": 1.0}),
    ("sharpen", {"sharpen_amount": 1.0, "kernel_size": 3, "sigma": 1.0}),
    ("frequency_filter", {"sigma": 1.0, "filter": None, "cutoff": None}),
    ("regional_mask", {"region": None, "region_feather": 0.1}),       # no region: the map is left unchanged
])
def test_bending_mode_parameter_defaults(mode, params):
    assert parse(f'[[bending]]\ntoken = "a"\nmode = "{mode}"\n').bending[0].params == params


def test_bending_values():
    r = parse('[[bending]]\ntoken = "sunset"\nmode = "regional_mask"\nregion = [0, 0.25, 0.5, 1]\n'
              "apply_to_timesteps = [0, 15]\napply_to_layers = [3, 1]\nrenormalize = false\nstrength = 0.5\n"
              '[[bending]]\ntoken = "kiss"\nmode = "frequency_filter"\nfilter = "highpass"\ncutoff = 0.3\n'
              'renormalize = "column"\n'
              '[[bending]]\ntoken = "a b"\nmode = "rotate"\nangle = -30\nrenormalize = true\n')
    mask, freq, rot = r.bending
    assert mask.region == (0.0, 0.25, 0.5, 1.0) and mask.region_feather == 0.1
    assert mask.apply_to_timesteps == (0, 15) and mask.apply_to_layers == (1, 3)
    assert (mask.renormalize, freq.renormalize, rot.renormalize) == ("none", "column", "row")
    assert (freq.filter, freq.cutoff, freq.sigma) == ("highpass", 0.3, 1.0)
    assert rot.angle == -30.0 and r.has_dynamic
    # a one-step window (both ends inclusive) and the original's wildcard / comma-group tokens
    r = parse('[[bending]]\ntoken = "ALL"\nmode = "scale"\napply_to_timesteps = [4, 4]\n'
              '[[bending]]\ntoken = "kiss, rose"\nmode = "scale"\n')
    assert r.bending[0].apply_to_timesteps == (4, 4) and r.bending[1].token == "kiss, rose"


def test_single_bending_table_is_one_entry():
    assert parse('[bending]\ntoken = "a"\nmode = "flip"\nflip_vertical = true\n').bending == (
        BendEntry(token="a", mode="flip", flip_vertical=True),)


@pytest.mark.parametrize("dataclass_, params", [
    (SAGParams, SAG_PARAMS),
    (SlothfulParams, SLOTHFUL_PARAMS),
    (BendEntry, {**BEND_COMMON, **BEND_PARAMS}),
])
def test_dataclass_defaults_match_schema_tables(dataclass_, params):
    defaults = {f.name: f.default for f in fields(dataclass_)}
    for name, p in params.items():
        if not p.required:
            assert defaults[name] == p.default, name


# --- canonical form and hash --------------------------------------------------------------------

RICH = '''schema = 1
name = "rich.recipe_1"
description = "quotes \\" backslash \\\\ newline \\n tab \\t bell \\u0007 del \\u007F unicode é 漢 🙂"

[unet.self]
q = 1.1
k = 0.30000000000000004

[[unet.cross]]
blocks = ["OUT01", "IN07", "middle"]
depth = [3, 0]
v = 1.05
[[unet.cross]]
out = 2

[unet.temporal]
self_temporal = 1.2

[clip]
encoders = ["clip_g"]
out = 0.95

[sag]
scale = -0.5
blur_sigma = 1e-05

[slothful]
simple = true
depth_decay = -1
in_blend = 0.5

[[bending]]
token = "(kiss) \\"x\\""
mode = "regional_mask"
region = [0, 0, 0.5, 1]
region_feather = 0
apply_to_timesteps = [2, 10]
[[bending]]
token = "sunset"
mode = "sharpen"
sharpen_amount = 2
kernel_size = 5
renormalize = "column"
'''


def all_texts():
    return [RICH] + [p.read_text(encoding="utf-8") for p in sorted(RECIPES.glob("*.toml"))]


@pytest.mark.parametrize("text", all_texts())
def test_canonical_round_trips(text):
    recipe = parse_recipe(text)
    canonical = recipe.canonical()
    again = parse_recipe(canonical)
    assert again == recipe
    assert again.canonical() == canonical
    assert again.sha256 == recipe.sha256
    assert canonical.endswith("\n") and not canonical.endswith("\n\n")


def test_rich_recipe_canonical_text():
    r = parse_recipe(RICH)
    assert r.description == "quotes \" backslash \\ newline \n tab \t bell \x07 del \x7f unicode é 漢 🙂"
    assert r.bending[0].token == '(kiss) "x"'
    assert r.canonical() == '''schema = 1
name = "rich.recipe_1"
description = "quotes \\" backslash \\\\ newline \\n tab \\t bell \\u0007 del \\u007F unicode é 漢 🙂"

[unet.self]
q = 1.1
k = 0.30000000000000004

[[unet.cross]]
blocks = ["IN07", "middle", "OUT01"]
depth = [0, 3]
v = 1.05

[[unet.cross]]
out = 2.0

[unet.temporal]
self_temporal = 1.2

[clip]
encoders = ["clip_g"]
out = 0.95

[sag]
scale = -0.5
blur_sigma = 1e-05

[slothful]
simple = true
depth_decay = -1.0
in_blend = 0.5

[[bending]]
token = "(kiss) \\"x\\""
mode = "regional_mask"
apply_to_timesteps = [2, 10]
region = [0.0, 0.0, 0.5, 1.0]
region_feather = 0.0

[[bending]]
token = "sunset"
mode = "sharpen"
renormalize = "column"
sharpen_amount = 2.0
kernel_size = 5
'''


def test_hash_ignores_formatting_order_comments_int_float_and_defaults():
    plain = parse('[unet.self]\nq = 1.1\nk = 2\n[sag]\nscale = 0.7\n[[bending]]\ntoken = "a"\nmode = "blur"\nsigma = 2\n')
    noisy = parse_recipe('''
# a comment
name = "t"   # trailing comment
schema = 1
description = ""

[[bending]]
mode = "blur"
token = "a"
sigma = 2.0
kernel_size = 3
strength = 1.0
renormalize = true

[sag]
blur_sigma = 2.0
scale = 0.70

[unet]
self = { k = 2.0, q = 1.1, v = 1.0, out = 1 }
[unet.cross]
v = 1.0
''')
    assert noisy == plain
    assert noisy.canonical() == plain.canonical()
    assert noisy.sha256 == plain.sha256


@pytest.mark.parametrize("change", [
    ("q = 1.1", "q = 1.1000001"),
    ('name = "t"', 'name = "u"'),
    ("[unet.self]", "[unet.cross]"),
    ("scale = 0.7", "scale = 0.5"),
    ('mode = "blur"', 'mode = "sharpen"'),
])
def test_hash_changes_with_meaning(change):
    text = HEAD + '[unet.self]\nq = 1.1\n[sag]\nscale = 0.7\n[[bending]]\ntoken = "a"\nmode = "blur"\n'
    assert parse_recipe(text).sha256 != parse_recipe(text.replace(*change)).sha256


def test_sha256_is_hash_of_canonical_text():
    import hashlib
    r = parse("[unet.self]\nq = 1.1\n")
    assert r.sha256 == hashlib.sha256(r.canonical().encode("utf-8")).hexdigest()
    assert len(r.sha256) == 64


def test_canonical_floats_use_repr_and_ints_become_floats():
    canonical = parse("[unet.self]\nq = 2\nk = 0.1\n[unet.cross]\nv = 1.23456789012345678\n").canonical()
    assert "q = 2.0\nk = 0.1\n" in canonical
    assert f"v = {1.23456789012345678!r}\n" in canonical


def test_array_form_only_when_needed():
    one = parse("[[unet.self]]\nq = 1.1\n").canonical()
    assert "\n[unet.self]\nq = 1.1\n" in one and "[[" not in one
    selected = parse('[unet.self]\nblocks = ["M00"]\nq = 1.1\n').canonical()
    assert '\n[[unet.self]]\nblocks = ["M00"]\nq = 1.1\n' in selected
    two = parse("[[unet.self]]\nq = 1.1\n[[unet.self]]\nk = 1.1\n").canonical()
    assert two.count("[[unet.self]]") == 2


def test_canonical_drops_no_op_sections_and_empty_description():
    canonical = parse("[unet.self]\nq = 1.0\n[clip]\n").canonical()
    assert canonical == 'schema = 1\nname = "t"\n'


def test_canonical_writes_empty_dynamic_tables():
    assert parse("[sag]\n[slothful]\n").canonical() == 'schema = 1\nname = "t"\n\n[sag]\n\n[slothful]\n'


def test_canonical_of_directly_built_recipe():
    r = Recipe(schema=1, name="direct", multipliers={"unet.self": [MultiplyEntry((("q", 2),), blocks=("IN01",))]},
               sag=SAGParams(scale=1), bending=[BendEntry("cat", "rotate", angle=15)])
    assert r.canonical() == ('schema = 1\nname = "direct"\n\n[[unet.self]]\nblocks = ["IN01"]\nq = 2.0\n\n'
                             '[sag]\nscale = 1.0\n\n[[bending]]\ntoken = "cat"\nmode = "rotate"\nangle = 15.0\n')
    assert parse_recipe(r.canonical()) == r


def test_recipe_is_frozen_and_hashable():
    r = parse_recipe(RICH)
    assert isinstance(r.multipliers, FrozenDict)
    assert len({r, parse_recipe(r.canonical())}) == 1
    with pytest.raises(AttributeError):
        r.name = "x"
    with pytest.raises(TypeError):
        r.multipliers["clip"] = ()
    assert r.multipliers == dict(r.multipliers)


# --- files --------------------------------------------------------------------------------------

def test_load_recipe_reads_file_and_names_it_in_errors(tmp_path):
    path = tmp_path / "r.toml"
    path.write_bytes(b"\xef\xbb\xbf" + (HEAD + "[unet.self]\nq = 1.1\n").encode())    # with a BOM
    assert load_recipe(path).multipliers["unet.self"][0].factor("q") == 1.1
    path.write_text(HEAD + "[unet.self]\nqq = 1.1\n", encoding="utf-8")
    with pytest.raises(CkptbendError, match=r"r\.toml: \[unet\.self\] unknown key 'qq'"):
        load_recipe(str(path))
    path.write_text(HEAD + "[unet.self]\nq = 12.0\n", encoding="utf-8")
    assert load_recipe(path, allow_out_of_range=True).multipliers["unet.self"][0].factor("q") == 12.0


@pytest.mark.parametrize("make, fragment", [
    (lambda d: d / "missing.toml", "no such recipe file"),
    (lambda d: d, "is a directory"),
    (lambda d: (d / "latin1.toml").write_bytes(b'schema = 1\nname = "caf\xe9"\n') and d / "latin1.toml", "not UTF-8 text"),
])
def test_load_recipe_file_errors(tmp_path, make, fragment):
    path = make(tmp_path)
    with pytest.raises(CkptbendError) as info:
        load_recipe(path)
    assert fragment in str(info.value) and str(path) in str(info.value)


def test_example_recipes_all_validate():
    paths = sorted(RECIPES.glob("*.toml"))
    assert 5 <= len(paths) <= 9   # the SD examples, and one each for Flux and Wan (issue 11)
    for path in paths:
        recipe = load_recipe(path)
        assert recipe.name == path.stem
        assert recipe.description
        assert recipe.warnings == ()
        assert path.read_text(encoding="utf-8").lstrip().startswith("#"), f"{path.name} explains itself"
    kinds = {name: load_recipe(RECIPES / f"{name}.toml") for name in ("sag-and-bending", "sdxl-detail-per-block")}
    assert kinds["sag-and-bending"].has_dynamic
    assert any(e.blocks for e in kinds["sdxl-detail-per-block"].multipliers["unet.self"])


def test_an_unknown_architecture_is_one_short_line_that_points_to_the_list():
    """106 architecture names would make a 1,700-character error line: the count, a few names, where the rest are."""
    from ckptbend.recipe.schema import ARCHITECTURE

    with pytest.raises(CkptbendError) as err:
        parse_recipe('schema = 1\nname = "t"\narchitecture = "zzzz"\n[clip]\nq = 1.1\n', "r.toml")
    message = str(err.value)
    assert "\n" not in message and len(message) < 300
    assert f"expected one of {len(ARCHITECTURE.choices)} names" in message and "docs/recipes.md" in message
