"""``factedit patch show|apply|revert``: inspect patch files, write an edited model folder, restore it.

``patch apply`` writes the edited model plus ``factedit-replaced.safetensors`` (the weights the
patch replaced, :func:`factedit.editing.patch.save_replaced`); ``patch revert`` needs only that
folder and the patch file, and loads the folder in the dtype it was saved in.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Annotated

import typer

from factedit.cli.options import DeviceOpt, ModelChoice, ThreadsOpt, console, fail, load, with_model_options
from factedit.errors import FactEditError

patch_app = typer.Typer(no_args_is_help=True, help="Apply, revert or inspect patch files.")


def _check_out(out: Path) -> None:
    """Refuse an output that is a file, inside a file, a non-empty folder or not writable, before any work
    is done (the model folder is written beside ``out`` and renamed into place)."""
    from factedit.paths import check_output_path

    check_output_path(out, "--out", empty=True)
    check_output_path(out.parent, "--out's parent folder")


def _write_folder(out: Path, write) -> None:
    """Write a model folder beside ``out`` and move it into place, so a failure leaves no half folder."""
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        write(partial)
        if out.is_dir():
            out.rmdir()  # empty, checked before any work
        partial.rename(out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def _saved_dtype(folder: Path) -> str:
    """The dtype a model folder was saved in (its config.json), float32 when it does not say."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return "float32"
    dtype = (config.get("dtype") or config.get("torch_dtype")) if isinstance(config, dict) else None
    return dtype if isinstance(dtype, str) else "float32"


@patch_app.command("show")
def patch_show(
    path: Annotated[Path, typer.Argument(help="patch file or folder", metavar="PATCH")],
    as_json: Annotated[bool, typer.Option("--json", help="print the file's metadata as JSON (header only)")] = False,
) -> None:
    """Print a patch's metadata and the size of each weight change."""
    from factedit.editing.patch import Patch, read_patch_metadata

    try:
        if as_json:
            sys.stdout.write(json.dumps(read_patch_metadata(path), indent=2) + "\n")
            return
        console.print(Patch.load(path).summary(), markup=False)
    except FactEditError as exc:
        fail(exc)


@patch_app.command("apply")
@with_model_options
def patch_apply(
    path: Annotated[Path, typer.Argument(help="patch file or folder", metavar="PATCH")],
    out: Annotated[Path, typer.Option(help="folder to write the edited model to (new or empty)", metavar="DIR")],
    force: Annotated[bool, typer.Option(help="apply even if the weights differ from the patch's base")] = False,
    choice: ModelChoice = ModelChoice(),
) -> None:
    """Apply a patch and save the edited model, with the weights it replaced for an exact revert."""
    from factedit.editing.patch import REPLACED_FILE, Patch, save_replaced

    try:
        _check_out(out)
        patch = Patch.load(path)
        mdl, tok = choice.load()
        handle = patch.apply(mdl, force=force)
    except FactEditError as exc:
        fail(exc)

    def write(folder: Path) -> None:
        mdl.save_pretrained(folder)
        tok.save_pretrained(folder)
        save_replaced(handle, folder / REPLACED_FILE)

    _write_folder(out, write)
    console.print(f"edited model written to {out}", markup=False)


@patch_app.command("revert")
def patch_revert(
    path: Annotated[Path, typer.Argument(help="patch file or folder", metavar="PATCH")],
    model: Annotated[Path, typer.Option("--model", "-m", help="folder written by 'patch apply'", metavar="DIR")],
    out: Annotated[Path, typer.Option(help="folder to write the restored model to (new or empty)", metavar="DIR")],
    device: DeviceOpt = "cpu",
    dtype: Annotated[
        str | None,
        typer.Option(
            help="weights dtype: float32, bfloat16 or float16 (default: the one the folder was saved in)",
            metavar="DTYPE",
        ),
    ] = None,
    threads: ThreadsOpt = None,
) -> None:
    """Restore the pre-patch weights of a model folder written by ``patch apply`` (bit-exact)."""
    from factedit.editing.patch import REPLACED_FILE, Patch, restore_replaced
    from factedit.models import model_fingerprint

    try:
        _check_out(out)
        if not model.is_dir():
            raise FactEditError(f"--model {model} is not a folder written by 'factedit patch apply'")
        if not (model / REPLACED_FILE).is_file():
            raise FactEditError(f"{model} has no {REPLACED_FILE}: it was not written by 'factedit patch apply'")
        patch = Patch.load(path)
        mdl, tok = load(str(model), device, dtype or _saved_dtype(model), threads)
        restore_replaced(mdl, patch, model / REPLACED_FILE)
    except FactEditError as exc:
        fail(exc)
    if model_fingerprint(mdl) != patch.base_fingerprint:
        console.print("note: the restored weights are not the patch's base model (it was applied with --force)")

    def write(folder: Path) -> None:
        mdl.save_pretrained(folder)
        tok.save_pretrained(folder)

    _write_folder(out, write)
    console.print(f"restored model written to {out}", markup=False)


def register(app: typer.Typer) -> None:
    app.add_typer(patch_app, name="patch")
