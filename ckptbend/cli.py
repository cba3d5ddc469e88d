"""The `ckptbend` command line: parse arguments, call the library, print, map errors to exit codes."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import click

from . import __version__, profile
from .errors import CkptbendError, broken_install_message
from .synth import catalog as synth_catalog

EXISTING = click.Path(path_type=Path)   # existence is checked by the library, with ckptbend's own messages


class _Group(click.Group):
    """Every failure a user can cause ends as one line on stderr and a non-zero exit, never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except CkptbendError as e:
            click.echo(f"error: {e.message}", err=True)
            ctx.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("error: interrupted; no output was written", err=True)
            ctx.exit(130)
        except BrokenPipeError:
            _end_as_sigpipe()
        except OSError as e:
            click.echo(f"error: {e.filename or ''}: {e.strerror or e}".replace(": : ", ": "), err=True)
            ctx.exit(2)
        except (ImportError, RuntimeError) as e:
            if (message := broken_install_message(e)) is None:
                raise
            click.echo(f"error: {message}", err=True)
            ctx.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ckptbend")
def cli():
    """Bake ComfyUI-style attention multipliers into checkpoint files.

    \b
    Typical use:
      ckptbend recipe validate recipes/sharper-details.toml
      ckptbend bake recipes/sharper-details.toml model.safetensors -o model-sharp.safetensors
      ckptbend inspect model-sharp.safetensors
      ckptbend verify model-sharp.safetensors --source model.safetensors
    """


def _load(recipe_path: Path, allow_out_of_range: bool):
    from .recipe import load_recipe

    recipe = load_recipe(recipe_path, allow_out_of_range=allow_out_of_range)
    for w in recipe.warnings:
        click.echo(f"warning: {w}", err=True)
    return recipe


@cli.command()
@click.argument("paths", nargs=-1, required=True, type=EXISTING, metavar="RECIPE... INPUT")
@click.option("-o", "--output", type=click.Path(), required=True,
              help="Output file (a folder for a diffusers input). With several recipes, --grid, or a trailing "
                   "slash (DIR/): a folder that receives INPUT-STEM.RECIPE-NAME outputs.")
@click.option("--grid", multiple=True, metavar="SECTION.KEY=V1,V2,...",
              help="Sweep: bake every combination of these values into copies of the recipe "
                   "(repeatable, e.g. --grid unet.self.q=1.0,1.1 --grid unet.self.k=1.0,1.1).")
@click.option("--dry-run", is_flag=True, help="Print the plan (every tensor, rows and factor) and write nothing.")
@click.option("--force", is_flag=True, help="Replace outputs that exist.")
@click.option("--allow-missing", is_flag=True,
              help="Bake even if a recipe value or selector matches nothing in this checkpoint.")
@click.option("--allow-out-of-range", is_flag=True, help="Accept multipliers outside ComfyUI's 0–10 range.")
@click.option("--allow-pickle", is_flag=True,
              help="Accept a pickled .ckpt input, loaded with torch.load(weights_only=True) only.")
@click.option("--no-fsync", is_flag=True,
              help="Skip flushing the output to disk before it is renamed into place (faster, like plain cp; "
                   "a power cut right after may lose the output).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or summary.")
def bake(paths, output, grid, dry_run, force, allow_missing, allow_out_of_range, allow_pickle, no_fsync, quiet):
    """Bake each RECIPE into the checkpoint INPUT.

    INPUT is a .safetensors file (single-file SD 1.x/2.x/XL/SVD, Flux, SD3/3.5, Wan, Qwen-Image,
    HunyuanVideo or LTX-Video; UNet-, transformer- or text-encoder-only), a diffusers model folder, or a
    GGUF file of a UNet or transformer (ComfyUI-GGUF's; the output is GGUF too).
    The input is never modified; an output appears only when complete.

    \b
      ckptbend bake recipes/sharper-details.toml model.safetensors -o sharp.safetensors
      ckptbend bake a.toml b.toml model.safetensors -o variants/
      ckptbend bake base.toml model.safetensors -o grid/ --grid unet.self.q=1.0,1.1 --grid unet.self.k=1.0,1.1

    \b
    Environment:
      CKPTBEND_HASH_CACHE=0   hash the source again (its SHA-256 is otherwise remembered per file)
      CKPTBEND_CACHE_DIR      where that memory lives (default ~/.cache/ckptbend)
      CKPTBEND_PROFILE=1      print the time of each phase to stderr (bin/bench --profile)
    """
    from .bake import jobs_for, targets_of
    from .output import check_targets
    from .pickle_input import readable, require_consent
    from .sweep import expand, parse_grid

    if len(paths) < 2:
        raise click.UsageError("give at least one RECIPE and then the INPUT checkpoint")
    *recipe_paths, input = paths
    recipes = [_load(p, allow_out_of_range) for p in recipe_paths]
    if grid:
        recipes = [v for r in recipes for v in expand(r, [parse_grid(g) for g in grid],
                                                       allow_out_of_range=allow_out_of_range)]
    many = len(recipes) > 1 or bool(grid)
    names = [r.name for r in recipes]
    if many and len(set(names)) != len(names):
        raise CkptbendError(f"two recipes share the name {next(n for n in names if names.count(n) > 1)!r}; "
                            "outputs are named after recipes")
    jobs, into_folder = jobs_for(recipes, input, output, many)
    output = Path(output)
    options = dict(force=force, allow_missing=allow_missing, quiet=quiet, durable=not no_fsync,
                   inputs=recipe_paths)
    require_consent(input, allow_pickle)
    if dry_run:
        with readable(input, jobs[0][1] if jobs[0][1].parent.is_dir() else None) as (source, _, _):
            _dry_run(jobs, source, allow_missing)
        return
    check_targets(targets_of(jobs, input.is_dir()), [input, *recipe_paths], force, output if into_folder else None)
    new_folder = output if into_folder and not output.exists() else None
    if new_folder is not None:
        output.mkdir(parents=True)
    try:
        with readable(input, jobs[0][1]) as (source, source_name, source_sha256):
            _bake_all(jobs, source, source_name=source_name, source_sha256=source_sha256, **options)
    except BaseException:
        if new_folder is not None and not any(output.iterdir()):
            output.rmdir()
        raise


def _dry_run(jobs, input, allow_missing):
    from .companion import folder_for
    from .layouts import detect
    from .plan import labels_read_for, make_plan

    ckpt = detect(input)
    _note_left_alone(ckpt)
    for r, out in jobs:
        plan = make_plan(r, ckpt, allow_missing=allow_missing)
        for w in plan.warnings:
            click.echo(f"warning: {w}", err=True)
        if len(jobs) > 1:
            click.echo(f"# {r.name} → {out}")
        click.echo(f"block labels read for {labels_read_for(r, ckpt)}", err=True)
        for line in plan.describe():
            click.echo(line)
        if r.has_dynamic:
            click.echo(f"# companion for the sampling-time sections: {folder_for(out)}/")
        click.echo(f"{plan.summary()} would be scaled; nothing written (dry run)", err=True)


def _note_workflow(folder):
    note = json.loads((Path(folder) / "companion.json").read_text(encoding="utf-8")).get("no_workflow")
    if note:
        click.echo(f"note: {note}", err=True)


def _note_left_alone(ckpt):
    for part in ckpt.left_alone:
        click.echo(f"note: left alone (no section reaches it): {part}", err=True)


def _bake_all(jobs, input, *, force, allow_missing, quiet, durable, source_name, source_sha256, inputs):
    from .bake import bake as run_bake
    from .layouts import detect
    from .plan import make_plan

    ckpt = detect(input)
    plans = [make_plan(r, ckpt, allow_missing=allow_missing) for r, _ in jobs]   # all valid before any write
    if not quiet:
        _note_left_alone(ckpt)
    for plan in plans:
        for w in plan.warnings:
            click.echo(f"warning: {w}", err=True)
    for r, out in jobs:
        result = run_bake(r, input, out, force=force, allow_missing=allow_missing,
                          progress=False if quiet else None, source_name=source_name,
                          source_sha256=source_sha256, durable=durable, inputs=inputs)
        for p in result.removed_stale:
            click.echo(f"note: removed {p.name}, left by an interrupted run of ckptbend", err=True)
        if not quiet:
            click.echo(f"baked {r.name} ({r.sha256[:12]}) into {out}: "
                       f"{result.plan.summary()} scaled, the rest copied unchanged", err=True)
            if result.companion is not None:
                click.echo(f"wrote the companion {result.companion}/ for the recipe's sampling-time part "
                           f"(diffusers: import it and call apply(pipe); ComfyUI: copy it into custom_nodes/)",
                           err=True)
                _note_workflow(result.companion)


@cli.command()
@click.argument("file", type=EXISTING)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def inspect(file, as_json):
    """Show FILE's architecture, layout, attention sites, dtypes, metadata and baked recipe."""
    from .layouts import detect
    from .report import describe, format_text

    info = describe(detect(file))
    click.echo(json.dumps(info, indent=2) if as_json else format_text(info))


@cli.group()
def recipe():
    """Check, print and import recipes."""


@recipe.command("validate")
@click.argument("file", type=EXISTING)
@click.option("--allow-out-of-range", is_flag=True, help="Accept multipliers outside ComfyUI's 0–10 range.")
def recipe_validate(file, allow_out_of_range):
    """Check FILE against the recipe schema."""
    r = _load(file, allow_out_of_range)
    click.echo(f"{file}: ok ({r.name}, sha256 {r.sha256[:16]})")


@recipe.command("show")
@click.argument("file", type=EXISTING)
@click.option("--allow-out-of-range", is_flag=True, help="Accept multipliers outside ComfyUI's 0–10 range.")
def recipe_show(file, allow_out_of_range):
    """Print FILE's canonical form and content hash."""
    r = _load(file, allow_out_of_range)
    click.echo(r.canonical(), nl=False)
    click.echo(f"# sha256 {r.sha256}")


@recipe.command("import")
@click.argument("source", type=EXISTING)
@click.option("-o", "--output", type=click.Path(path_type=Path), help="The recipe file to write (default: print it).")
@click.option("--name", help="The recipe's name (default: the companion's recipe, or the source's file name).")
@click.option("--sampler", metavar="ID", help="The sampler node to follow, when samplers use different chains.")
@click.option("--ignore-other-patches", is_flag=True,
              help="Import even if LoRAs, model merges or other patches sit on the path; they are listed as comments.")
@click.option("--companion", "companions", multiple=True, type=EXISTING, metavar="DIR",
              help="A companion folder (or a folder holding some) for ckptbend companion nodes; the source's "
                   "folder is searched too. Repeatable.")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
@click.option("--allow-out-of-range", is_flag=True, help="Accept multipliers outside ComfyUI's 0–10 range.")
def recipe_import(source, output, name, sampler, ignore_other_patches, companions, force, allow_out_of_range):
    """Write the recipe that reproduces SOURCE's attention settings.

    \b
    SOURCE is one of:
      a ComfyUI workflow (.json, API or UI format) or an image ComfyUI saved (.png, .webp):
        from the sampler, the MODEL and CLIP inputs are followed back to the loader; the
        Attention Multiply, Self-Attention Guidance, Slothful Attention and ckptbend companion
        nodes on the way become the recipe (chained nodes multiply, as the bake does);
      an Attention Bending config (.yaml: attention_bending: {enabled, configs: [...]});
      a checkpoint baked by ckptbend (.safetensors or a diffusers folder): its recorded recipe.

    \b
      ckptbend recipe import ComfyUI_00042_.png -o recipes/tuned.toml
      ckptbend recipe import workflow.json --sampler 12 --name refiner-pass
      ckptbend recipe import model-sharp.safetensors
    """
    from .importers import Options, import_recipe, write_output

    imported = import_recipe(source, Options(name, sampler, ignore_other_patches, tuple(companions), allow_out_of_range))
    for w in imported.warnings:
        click.echo(f"warning: {w}", err=True)
    if output is None:
        click.echo(imported.text, nl=False)
        return
    write_output(imported.text, output, source, force)
    click.echo(f"wrote {output} ({imported.recipe.name}, sha256 {imported.recipe.sha256[:16]})", err=True)


@cli.command()
@click.argument("output", type=EXISTING)
@click.option("--source", type=EXISTING, required=True, help="The checkpoint OUTPUT was baked from.")
@click.option("--allow-pickle", is_flag=True,
              help="Accept a pickled .ckpt source, loaded with torch.load(weights_only=True) only.")
def verify(output, source, allow_pickle):
    """Recompute the bake recorded in OUTPUT from SOURCE and confirm OUTPUT matches byte for byte."""
    from .pickle_input import readable, require_consent
    from .verify import verify as run_verify

    require_consent(source, allow_pickle)
    with readable(source, None, cached=False) as (converted, _, pickle_sha256):
        problems = run_verify(output, converted, pickle_sha256)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CkptbendError(f"{output}: does not match the recorded bake of {source}: {problems[0]}{more}",
                            exit_code=1)
    click.echo(f"{output}: ok, identical to the recorded bake of {source}")


@cli.command()
@click.argument("a", type=EXISTING)
@click.argument("b", type=EXISTING)
def diff(a, b):
    """Show what differs between two checkpoints (per-tensor ratios) or two recipes (values)."""
    from .diff import diff_checkpoints, diff_recipes
    from .layouts import detect

    if a.suffix == ".toml" or b.suffix == ".toml":
        lines = diff_recipes(_load(a, True), _load(b, True))
    else:
        lines = diff_checkpoints(detect(a), detect(b))
    for line in lines:
        click.echo(line)
    if not lines:
        click.echo("no differences", err=True)


@cli.command()
@click.argument("recipe_path", metavar="RECIPE", type=EXISTING)
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="The companion folder to write (its name must be a Python identifier to `import` it).")
@click.option("--checkpoint", type=EXISTING,
              help="Record this baked checkpoint as the one the companion belongs to.")
@click.option("--force", is_flag=True, help="Replace the folder if it exists.")
@click.option("--allow-out-of-range", is_flag=True, help="Accept multipliers outside ComfyUI's 0–10 range.")
def emit(recipe_path, output, checkpoint, force, allow_out_of_range):
    """Write the companion folder for RECIPE's sampling-time part ([sag], [slothful], [[bending]])
    without baking. (`bake` writes one beside its output by itself.)

    \b
      ckptbend emit recipes/sag-and-bending.toml -o sag_and_bending
      python -c "import sag_and_bending as c; c.apply(pipe)"      # diffusers
      cp -r sag_and_bending ComfyUI/custom_nodes/                  # ComfyUI node
    """
    from .companion import emit as write

    r = _load(recipe_path, allow_out_of_range)
    record = None
    if checkpoint is not None:
        from .layouts import detect
        from .verify import recorded_recipe

        found = detect(checkpoint)
        baked = recorded_recipe(found)
        if baked is not None and baked.sha256 != r.sha256:
            raise CkptbendError(f"{checkpoint}: was baked from recipe {baked.name!r} ({baked.sha256[:12]}), "
                                f"not {r.name!r} ({r.sha256[:12]})")
        record = {"file": checkpoint.name, "architecture": found.architecture, "kind": found.kind}
    if not output.name.isidentifier():
        click.echo(f"warning: {output.name!r} is not a Python identifier: ComfyUI loads it, "
                   "but `import` needs importlib", err=True)
    write(r, output, force=force, checkpoint=record, inputs=[recipe_path, *([checkpoint] if checkpoint else [])])
    click.echo(f"wrote the companion of {r.name} ({r.sha256[:12]}) to {output}/")
    _note_workflow(output)


@cli.command()
@click.argument("maps_file", metavar="MAPS", type=EXISTING)
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Folder for the PNG files.")
@click.option("--force", is_flag=True, help="Replace PNG files that exist.")
def maps(maps_file, output, force):
    """Render attention-bending maps saved by a companion (`companion.save_maps(session, MAPS)`) as
    PNG heatmaps: one grid per token, a row per step, a column per layer, original beside bent.

    \b
      ckptbend maps maps.safetensors -o maps/
    """
    from .maps_render import render_file

    for path in render_file(maps_file, output, force):
        click.echo(f"wrote {path}")


@cli.command()
@click.argument("arch", type=click.Choice(synth_catalog.ARCHES))
@click.argument("output", type=click.Path(path_type=Path))
@click.option("--layout", default="single", show_default=True, type=click.Choice(synth_catalog.LAYOUTS),
              help="File form; not every architecture has every layout.")
@click.option("--dtype", default="fp16", show_default=True, type=click.Choice(synth_catalog.DTYPE_NAMES),
              help="Floating dtype, or one of ComfyUI's quantised forms (diffusion transformers; single-file "
                   "layouts such as single and comfy): " + ", ".join(synth_catalog.QUANTISED) + "; or a GGUF file "
                   "of the model alone, as ComfyUI-GGUF writes it: " + ", ".join(synth_catalog.GGUF) + ".")
@click.option("--seed", default=0, show_default=True)
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
def synth(arch, output, layout, dtype, seed, force):
    """Write a tiny random checkpoint with real key names (for trying ckptbend offline)."""
    import torch

    from .output import Target, atomic_output, check_targets
    from .synth import write_checkpoint

    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
                   "fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}.get(dtype, dtype)
    target = Target(output, layout == "diffusers")
    check_targets([target], [], force)
    with atomic_output(target, force) as tmp:
        write_checkpoint(tmp, arch, layout=layout, size="tiny", dtype=torch_dtype, seed=seed)
    click.echo(f"wrote {output} ({arch}, {layout}, {dtype})")


def _end_as_sigpipe():
    """The reader of our output went away (`ckptbend diff A B | head`): end quietly, as the default
    SIGPIPE action ends coreutils or git (a shell shows status 141). Python ignores SIGPIPE so that
    the write raised instead; by now the command has unwound and removed its temporaries."""
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGPIPE)
    os._exit(128 + signal.SIGPIPE)                          # not reached: the signal ends the process


def _terminate(signum, frame):
    # Turn SIGTERM into the same clean unwinding as Ctrl-C: temporaries are removed, nothing half-written stays.
    raise KeyboardInterrupt


def main():
    signal.signal(signal.SIGTERM, _terminate)
    started = time.perf_counter()
    try:
        cli(prog_name="ckptbend")
    finally:
        profile.report(time.perf_counter() - started)   # CKPTBEND_PROFILE=1 only


if __name__ == "__main__":
    main()
