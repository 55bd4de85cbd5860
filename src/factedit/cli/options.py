"""What every ``factedit`` command shares: option definitions, threads, logging, data folder, output.

Imported before anything that imports torch, so nothing here may import torch (or transformers)
at module level: ``factedit --help`` must stay fast, and ``OMP_WAIT_POLICY`` only takes effect if
it is in the environment when torch's OpenMP runtime is loaded.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
import sys
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, NoReturn, Optional

import typer
from rich.console import Console, ConsoleDimensions

from factedit.errors import FactEditError
from factedit.progress import LogProgress, Progress, Stage, TqdmProgress

# Idle OpenMP threads sleep instead of spinning: with spinning threads (the default) a forward pass on
# a busy 2-core machine was several times slower than with one thread; passive waiting removes that.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

log = logging.getLogger("factedit.cli")

MAX_THREADS = 1024  # more torch threads than any machine has cores is a typo, not a setting
PIPE_WIDTH = 10_000  # columns when stdout is not a terminal: tables keep every column, lines are not wrapped


class PipeFriendlyConsole(Console):
    """A rich console that, when its stream is not a terminal (``> out.txt``, CI), renders as wide as the
    content needs instead of cropping to 80 columns (or to the width of the terminal stdin belongs to)."""

    @property
    def size(self) -> ConsoleDimensions:
        if not self.is_terminal:
            return ConsoleDimensions(PIPE_WIDTH, 25)
        return super().size

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        self._width, self._height = new_size


console = PipeFriendlyConsole(highlight=False)
err = PipeFriendlyConsole(stderr=True, highlight=False)


# -- errors ----------------------------------------------------------------------------------------------------
def one_line(message: object) -> str:
    """``message`` as one line: whitespace runs (newlines included) become one space and other control
    characters a ``?``, so no message can span lines or move a terminal's cursor."""
    text = " ".join(str(message).split())
    return "".join("?" if unicodedata.category(c) == "Cc" else c for c in text)


def error_line(message: object) -> None:
    """One line on stderr, ``error: ...`` (red prefix only on a terminal): scripts can grep it.

    Written to ``sys.stderr`` directly, never through a rich console: rich wraps at the console width
    (80 columns when stderr is not a terminal), and an uncaught exception drawn by rich's traceback
    panel was what turned errors into many lines; :class:`factedit.cli.group.FactEditGroup` catches
    those and prints them here too.
    """
    prefix = typer.style("error:", fg="red", bold=True) if sys.stderr.isatty() else "error:"
    sys.stderr.write(f"{prefix} {one_line(message)}\n")
    sys.stderr.flush()


def fail(exc: Exception | str) -> NoReturn:
    """Report bad input as one line on stderr and exit with status 2."""
    error_line(str(exc))
    raise typer.Exit(2)


def warn(message: str) -> None:
    """A one-line warning on stderr."""
    prefix = typer.style("warning:", fg="yellow") if sys.stderr.isatty() else "warning:"
    sys.stderr.write(f"{prefix} {one_line(message)}\n")


# -- logging and --verbose ---------------------------------------------------------------------------------------
_verbose = False


def setup_logging(verbose: bool) -> None:
    """factedit's messages at WARNING by default, INFO with ``-v`` (on stderr); the libraries' own
    chatter stays at ERROR. Only factedit's logger level changes, so embedding code keeps its setup."""
    global _verbose
    _verbose = verbose
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # NOTSET: inherit the root level (WARNING in the CLI; whatever an embedding program or pytest chose)
    logging.getLogger("factedit").setLevel(logging.INFO if verbose else logging.NOTSET)
    for noisy in ("transformers", "accelerate", "httpx", "urllib3", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


VERBOSE_FLAGS = ("-v", "--verbose")
VERBOSE_HELP = "log what is happening (INFO), progress details included; also accepted after the command"


def is_verbose() -> bool:
    return _verbose


# -- progress ------------------------------------------------------------------------------------------------------
class _Fanout(Progress):
    """Forwards every stage event to several adapters (bars and log lines together)."""

    def __init__(self, *targets: Progress) -> None:
        self.targets = targets

    def on_start(self, stage: Stage) -> None:
        for target in self.targets:
            target.on_start(stage)

    def on_advance(self, stage: Stage, info: dict[str, Any]) -> None:
        for target in self.targets:
            target.on_advance(stage, info)

    def on_end(self, stage: Stage) -> None:
        for target in self.targets:
            target.on_end(stage)


def progress() -> Progress:
    """Bars on stderr (stdout stays clean for ``--json`` and tables); with ``-v`` also log lines."""
    bars = TqdmProgress()
    return _Fanout(bars, LogProgress(log)) if _verbose else bars


# -- threads -------------------------------------------------------------------------------------------------------
def default_threads() -> int:
    """``$OMP_NUM_THREADS`` if set, else the cores this process may run on (``sched_getaffinity``)."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def use_threads(threads: int | None) -> int:
    """Set torch's intra-op thread count (``None``: :func:`default_threads`); returns the count used."""
    import torch

    count = threads or default_threads()
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
    log.info("torch CPU threads: %d (OMP_WAIT_POLICY=%s)", count, os.environ.get("OMP_WAIT_POLICY"))
    return count


def load(model: str | None, device: str, dtype: str, threads: int | None = None, device_map: str | None = None):
    """Set the thread count, then load ``(model, tokenizer)`` (placed by ``device_map`` when given)."""
    from factedit.models import load_model

    use_threads(threads)
    return load_model(model, device=device, dtype=dtype, device_map=device_map)


def model_name(model: str | None) -> str:
    """The name to record for ``--model`` (the registry default when it was not given)."""
    if model:
        return model
    from factedit.models.registry import DEFAULT_MODEL

    return DEFAULT_MODEL


# -- data folder ----------------------------------------------------------------------------------------------------
def data_dir_callback(ctx: typer.Context, value: Path | None) -> Path | None:
    """``--data-dir`` takes precedence over ``$FACTEDIT_DATA_DIR`` for everything the command reads."""
    if value is not None and not ctx.resilient_parsing:
        from factedit.paths import set_data_dir

        try:
            set_data_dir(value)
        except FactEditError as exc:
            raise typer.BadParameter(str(exc)) from None
    return value


def check_corpus(spec: str | None, option: str = "--corpus") -> None:
    """A corpus is a file, a folder or a Hugging Face dataset name: a typo fails before the model is loaded."""
    from factedit.stats.corpus import HF_DATASETS

    if spec is not None and spec not in HF_DATASETS and not Path(spec).expanduser().exists():
        raise FactEditError(
            f"{option} {spec!r} not found: give a text file, a folder or one of {', '.join(HF_DATASETS)}"
        )


# -- shared option definitions ---------------------------------------------------------------------------------
ModelOpt = Annotated[
    Optional[str],
    typer.Option(
        "--model",
        "-m",
        metavar="NAME",
        help="registry name (default smollm2-135m), .gguf file, model folder or Hugging Face hub id",
    ),
]
DeviceOpt = Annotated[str, typer.Option(help="torch device, e.g. cpu or cuda", metavar="DEVICE")]
DtypeOpt = Annotated[str, typer.Option(help="weights dtype: float32, bfloat16 or float16", metavar="DTYPE")]
DeviceMapOpt = Annotated[
    Optional[str],
    typer.Option(
        help="place the model across devices with accelerate: auto, or a JSON file {module: device} "
        "(devices cpu, cuda:N, mps, disk; docs/devices.md)",
        metavar="auto|FILE",
    ),
]
ThreadsOpt = Annotated[
    Optional[int],
    typer.Option(
        "--threads",
        min=1,
        max=MAX_THREADS,
        metavar="N",
        help="torch CPU threads (default: $OMP_NUM_THREADS, else the cores available to this process; "
        "idle threads wait passively unless OMP_WAIT_POLICY is set)",
    ),
]
DataDirOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--data-dir",
        metavar="DIR",
        callback=data_dir_callback,
        file_okay=False,
        help="folder to read evaluation data and corpora from (default: $FACTEDIT_DATA_DIR, else the "
        "development checkout's shared/data)",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="print one JSON object on stdout instead of tables")]
ChatOpt = Annotated[
    bool,
    typer.Option(
        "--chat",
        help="wrap prompts in the model's chat template as a user turn; the continuation is read after the "
        "assistant prefix",
    ),
]


def chat_or_raw(tok, chat: bool, label: str):
    """The tokenizer's chat format when ``--chat`` was given, else ``None`` (texts used as they are)."""
    from factedit.models.chat import chat_format

    return chat_format(tok, f"model {label}") if chat else None


@dataclass(frozen=True)
class ModelChoice:
    """What ``--model``, ``--device``, ``--dtype`` and ``--threads`` chose; :meth:`load` sets the threads
    and loads ``(model, tokenizer)``."""

    name: str | None = None
    device: str = "cpu"
    dtype: str = "float32"
    threads: int | None = None
    device_map: str | None = None

    def load(self, patch: Path | None = None, caches: Sequence[str] = ("models",)):
        """``(model, tokenizer)``, with the patch file ``patch`` applied when one is given.

        Before anything is loaded: the home folder and its cache sub-folders ``caches`` must be writable
        (the first load of a registry model converts it into ``models``), and the patch file is read and
        checked, so a bad one costs no model load.
        """
        from factedit.paths import check_home_writable

        check_home_writable(caches)
        parsed = None
        if patch is not None:
            from factedit.editing.patch import Patch

            parsed = Patch.load(patch)
        model, tok = load(self.name, self.device, self.dtype, self.threads, self.device_map)
        if parsed is not None:
            parsed.apply(model)
        return model, tok

    @property
    def label(self) -> str:
        """The name to record (the registry default when ``--model`` was not given)."""
        return model_name(self.name)


_MODEL_OPTIONS = (
    ("model", ModelOpt, None),
    ("device", DeviceOpt, "cpu"),
    ("dtype", DtypeOpt, "float32"),
    ("threads", ThreadsOpt, None),
    ("device_map", DeviceMapOpt, None),
)


def with_model_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Give a command the model options, defined once here: it declares ``choice: ModelChoice`` and
    receives them in it (typer reads the options from the wrapper's signature)."""
    signature = inspect.signature(command, eval_str=True)  # typer reads real annotations from it
    kept = [p for name, p in signature.parameters.items() if name != "choice"]
    added = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
        for name, annotation, default in _MODEL_OPTIONS
    ]

    @functools.wraps(command)
    def run(
        *args: Any,
        model: str | None = None,
        device: str = "cpu",
        dtype: str = "float32",
        threads: int | None = None,
        device_map: str | None = None,
        **kwargs: Any,
    ) -> Any:
        return command(*args, choice=ModelChoice(model, device, dtype, threads, device_map), **kwargs)

    run.__signature__ = signature.replace(parameters=kept + added)
    return run


def parse_overrides(pairs: list[str]) -> dict[str, object]:
    """``--set KEY=VALUE`` pairs as overrides (checked with the method's hyper-parameters before loading)."""
    out: dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise FactEditError(f"--set {pair!r}: expected KEY=VALUE, e.g. --set key_average=context_types")
        try:
            out[key.strip()] = json.loads(value)
        except ValueError:
            out[key.strip()] = value
    return out


def parse_counts(text: str | None, option: str) -> tuple[int, ...]:
    """``10,100,1000`` as whole numbers of at least 1, in increasing order (``()`` when not given)."""
    if not text:
        return ()
    try:
        values = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise FactEditError(
            f"{option} {text!r}: expected whole numbers separated by commas, e.g. 10,100,1000"
        ) from None
    if not values or values[0] < 1:
        raise FactEditError(f"{option} {text!r}: the numbers must be at least 1")
    return tuple(values)
