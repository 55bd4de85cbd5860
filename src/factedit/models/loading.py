"""Load a causal LM and its tokenizer from a registry name, a GGUF file, a folder or a hub id.

GGUF weights are dequantized by ``transformers`` (slow: tens of seconds), so the
first load writes a float32 safetensors copy under ``$FACTEDIT_HOME/models``;
later loads read that copy in about a second. Every cache write goes to a name of
its own (process id + random token) and is renamed into place, so processes that
convert the same model at once never see or delete each other's half-written files
(the chunks of a split GGUF model are joined the same way, with a ``.sha256`` sidecar written
before the rename; a joined file is reused only when it matches it).

Integrity. A converted folder gets a manifest of every file's size and SHA-256
(:func:`factedit.integrity.write_manifest`), written after the files and before the completion
marker; each load verifies it (a file already verified with the same inode, size, mtime and ctime
is not hashed again), so a truncated ``model.safetensors`` or a damaged ``config.json`` or
``tokenizer.json`` is refused, naming the file. A folder written before manifests existed is
converted again once.

Bad input is refused in one line *before* anything is read or any folder is created, in this
order: the dtype, the device map (its form and every device it names,
:mod:`factedit.models.placement`) and the device (:mod:`factedit.models.devices`); the model's
files (a GGUF file's header and tensor table; a folder's ``config.json``, weights headers and
tokenizer files); a device map's module names against the model built empty from its config; the
memory the weights need at that dtype against the memory available, per device of a device map
(RAM from ``/proc/meminfo`` and the cgroup limit, GPU memory from ``torch.cuda.mem_get_info``;
skipped where unknown).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import mmap
import os
import shutil
import struct
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from factedit.errors import FactEditError
from factedit.integrity import (
    first_line,
    has_manifest,
    matches_sidecar,
    verify_manifest,
    write_manifest,
    write_sidecar,
)
from factedit.models.architectures import arch_for
from factedit.models.devices import resolve_device
from factedit.models.placement import (
    DISK,
    DeviceMap,
    bytes_per_device,
    check_device_map,
    device_map_of,
    input_device,
    parse_device_map,
)
from factedit.models.registry import (
    CACHE_MARKER,
    DEFAULT_MODEL,
    NAME_ATTRIBUTE,
    REGISTRY,
    ModelSource,
    gguf_parts,
)
from factedit.models.tokens import add_document_start
from factedit.paths import cache_dir, compute_lock, factedit_home
from factedit.safetensors_meta import read_header

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_COMPLETE = CACHE_MARKER
_PUBLISH_ATTEMPTS = 3
_CPU = torch.device("cpu")
_ST_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``dtype`` as one of the supported weight dtypes (float32, bfloat16, float16); others are refused."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise FactEditError(f"unsupported dtype {dtype}: choose one of {', '.join(DTYPES)}")
        return dtype
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise FactEditError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_model(
    name_or_path: str | None = None,
    *,
    device: str | torch.device | None = "cpu",
    dtype: str | torch.dtype = "float32",
    document_start: bool = True,
    device_map: str | Path | Mapping[str, str | int] | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Return ``(model, tokenizer)`` in eval mode, on ``device`` (or spread by ``device_map``), in ``dtype``.

    ``name_or_path``: a registry name (default ``smollm2-135m``), a ``.gguf`` file,
    a local model folder, or a Hugging Face hub id (needs network). ``document_start``: a tokenizer
    that adds no BOS is made to prepend the model's document separator
    (:func:`~factedit.models.tokens.add_document_start`); ``False`` keeps it as published (the
    official ROME code's behaviour on GPT-2-style tokenizers).

    ``device_map``: ``"auto"`` (accelerate fills the GPUs, then the CPU), a ``{module name: device}``
    dict or the path of a JSON file holding one (devices: ``cpu``, ``cuda:N`` or an index ``N``,
    ``mps``, ``disk``); see ``docs/devices.md``. It replaces ``device``, which must then be left at
    ``cpu`` (or ``None``). The map and its devices are checked before anything is read, its module
    names against the model's config before any weight is read.
    """
    torch_dtype = resolve_dtype(dtype)
    placement = parse_device_map(device_map)  # devices that do not exist here: refused before any work
    target_device = resolve_device(device)
    if placement is not None and target_device.type != "cpu":
        raise FactEditError(
            f"give a device or a device map, not both (device {str(device)!r} with a device map): "
            "the device map places every module itself"
        )
    name = name_or_path or DEFAULT_MODEL
    started = time.perf_counter()
    if name in REGISTRY or name.endswith(".gguf"):
        if name in REGISTRY:
            folder = _cached_from_gguf(REGISTRY[name])
        else:
            path = Path(name).expanduser()
            if not path.is_file():
                raise FactEditError(f"GGUF file not found: {path}")
            folder = _cached_gguf_file(path)
        needed = check_model_folder(folder, torch_dtype, headers_only=True)
        _check_fit(folder, placement, needed, target_device, f"model {name}", torch_dtype)
        model, tok = _from_folder(folder, torch_dtype, label=f"the converted model {folder}", device_map=placement)
        if name in REGISTRY:
            setattr(model.config, NAME_ATTRIBUTE, name)  # registry_name(model): measured defaults, labels
    else:
        path = Path(name).expanduser()
        looks_local = path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1
        if looks_local and not path.is_dir():
            raise FactEditError(
                f"model path {name!r} does not exist; give a folder, a .gguf file, a hub id "
                f"or one of the registered names: {', '.join(REGISTRY)}"
            )
        if path.is_dir():
            needed = check_model_folder(path, torch_dtype)
            _check_fit(path, placement, needed, target_device, f"model {path}", torch_dtype)
            model, tok = _from_folder(path, torch_dtype, label=f"model folder {path}", device_map=placement)
        else:
            label = f"model {name!r} (registered names: {', '.join(REGISTRY)})"
            if isinstance(placement, dict):
                _check_placement(name, placement, torch_dtype, label, f"model {name}")
            model, tok = _from_folder(name, torch_dtype, label=label, device_map=placement)
            if placement is None and target_device.type != "cpu":  # a hub model's size is known only now
                check_memory(_model_bytes(model), target_device, f"model {name}", torch_dtype, ram=False)
    arch_for(model)  # refuse unsupported families at load time, with the list of supported ones
    if placement is None:
        model.to(target_device)
    else:
        log.info("device map: %s", json.dumps(device_map_of(model) or {"": str(input_device(model))}))
    model.eval()
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if document_start and (token := add_document_start(tok)):
        log.info("tokenizer prepends %s to every text (document start)", token)
    log.info("loaded %s in %.1fs", name, time.perf_counter() - started)
    return model, tok


def _check_fit(
    folder: Path,
    placement: str | DeviceMap | None,
    needed: int | None,
    device: torch.device,
    what: str,
    dtype: torch.dtype,
) -> None:
    """The memory check of a whole-model load, or the device map's checks against the folder's config."""
    if placement is None:
        check_memory(needed, device, what, dtype)
        return
    if isinstance(placement, dict):
        if DISK in placement.values() and not any(f.suffix == ".safetensors" for f in _weight_files(folder)):
            raise FactEditError(
                f"{what}: the device map offloads modules to disk, which needs safetensors weights "
                f"({folder} has a pickled checkpoint); map them to cpu or a GPU"
            )
        _check_placement(folder, placement, dtype, f"model folder {folder}", what)


def _check_placement(source: str | Path, placement: DeviceMap, dtype: torch.dtype, label: str, what: str) -> None:
    """Check a device map against the model built empty (on ``meta``) from its config, then the memory each
    device needs; no weight is read."""
    skeleton = _skeleton(source, label)
    arch_for(skeleton)
    check_device_map(placement, skeleton)
    for device_name, needed in bytes_per_device(placement, skeleton, dtype).items():
        if device_name != DISK:
            device = torch.device(device_name)
            check_memory(needed, device, f"{what} (its part on {device_name})", dtype, ram=device.type == "cpu")


def _skeleton(source: str | Path, label: str) -> PreTrainedModel:
    """The model of ``source``'s config with every tensor on ``meta`` (no memory, no weights read)."""
    from accelerate import init_empty_weights

    try:
        with _quiet_loading():
            config = AutoConfig.from_pretrained(source)
            with init_empty_weights():
                return AutoModelForCausalLM.from_config(config)
    except FactEditError:
        raise
    except Exception as exc:  # transformers raises many types for configs it cannot use
        raise FactEditError(
            f"could not read the config of {label}: {exc.__class__.__name__}: {first_line(exc)}"
        ) from exc


def _from_folder(
    folder: str | Path,
    dtype: torch.dtype,
    *,
    label: str,
    gguf_file: str | None = None,
    device_map: str | DeviceMap | None = None,
):
    """``from_pretrained`` of tokenizer and model; whatever they raise becomes one line naming ``label``."""
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    model_kwargs = {"device_map": device_map} if device_map is not None else {}
    try:
        with _quiet_loading():
            tok = AutoTokenizer.from_pretrained(folder, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs, **model_kwargs)
    except FactEditError:
        raise
    except Exception as exc:  # transformers, tokenizers, safetensors and json raise many types
        raise FactEditError(f"could not load {label}: {exc.__class__.__name__}: {first_line(exc)}") from exc
    return model, tok


@contextlib.contextmanager
def _quiet_loading():
    """No transformers progress bar while weights load (a second or so): stderr stays for factedit's own
    progress and for errors, which must be the only line there when a command fails."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _private_name(path: Path) -> Path:
    """A hidden sibling of ``path`` that no other process (or thread) will pick."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


# -- the converted-model cache ------------------------------------------------------------------------------------


def _is_complete(folder: Path) -> bool:
    """A converted folder is complete once its manifest and then its marker are written."""
    return (folder / _COMPLETE).is_file() and has_manifest(folder)


def _usable_cache(folder: Path) -> bool:
    """True if ``folder`` is a complete, verified converted model; False if it must be (re)built.
    A damaged one is refused, naming the file (never silently rebuilt: that would hide a failing disk)."""
    if not (folder / _COMPLETE).is_file():
        return False
    if not has_manifest(folder):
        log.warning("the converted model %s predates checksums: converting it again (once)", folder)
        return False
    label = f"converted model cache {folder}"
    manifest = verify_manifest(folder, label)
    try:
        marker = json.loads((folder / _COMPLETE).read_bytes())
    except (OSError, ValueError) as exc:
        marker = exc
    if marker != manifest.get("marker"):
        raise FactEditError(
            f"{label}: {folder / _COMPLETE} is corrupt; delete the folder {folder} and load the model again "
            "to rebuild it"
        )
    return True


def _converted_once(target: Path, what: str, convert: Callable[[], Path]) -> Path:
    """``convert()`` under the cache lock, called once the input is checked (a refused input leaves no
    lock file): a second process loading the same model meanwhile waits, then reads the first one's copy."""
    with compute_lock([target], what):
        if _usable_cache(target):
            return target
        return convert()


def _cached_from_gguf(source: ModelSource) -> Path:
    target = factedit_home() / "models" / source.name
    if _usable_cache(target):
        return target
    parts = gguf_parts(source)
    remedy = f"reinstall the weights of {source.name} with: {source.repair_hint()}"
    if len(parts) == 1:
        info = read_gguf_info(parts[0], remedy=remedy)
        check_memory(info.float32_bytes, _CPU, f"converting {source.name} (float32)", torch.float32)

        def convert() -> Path:
            return _convert_gguf(parts[0].parent, parts[0].name, target, source=source.name)

    else:
        label = f"the GGUF file of {source.name} (joined from {len(parts)} chunks)"
        info = read_chunked_gguf_info(parts, remedy=remedy, label=label)  # before anything is written
        check_memory(info.float32_bytes, _CPU, f"converting {source.name} (float32)", torch.float32)

        def convert() -> Path:
            joined = cache_dir("gguf") / source.name / source.gguf_name
            if not matches_sidecar(joined):  # a join is kept only with its digest, and reused only if it matches
                _join(parts, joined)
            return _convert_gguf(joined.parent, joined.name, target, source=source.name)

    return _converted_once(target, f"the float32 copy of {source.name}", convert)


def _join(parts: list[Path], joined: Path) -> None:
    """Concatenate ``parts`` into ``joined`` under a private name, record its SHA-256 beside it, then
    rename it into place (another process doing the same writes identical bytes)."""
    log.info("joining %d GGUF chunks into %s", len(parts), joined)
    joined.parent.mkdir(parents=True, exist_ok=True)
    tmp = _private_name(joined)
    digest = hashlib.sha256()
    try:
        with open(tmp, "wb") as out:
            for part in parts:
                with open(part, "rb") as chunk:
                    while block := chunk.read(16 << 20):
                        digest.update(block)
                        out.write(block)
        write_sidecar(joined, digest.hexdigest())
        os.replace(tmp, joined)
    finally:
        tmp.unlink(missing_ok=True)


def _cached_gguf_file(path: Path) -> Path:
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = factedit_home() / "models" / f"gguf-{path.stem}-{key}"
    if _usable_cache(target):
        return target
    info = read_gguf_info(path)  # before any folder is created
    check_memory(info.float32_bytes, _CPU, f"converting {path} (float32)", torch.float32)
    return _converted_once(
        target,
        f"the float32 copy of {path.name}",
        lambda: _convert_gguf(path.parent, path.name, target, source=str(path)),
    )


def _convert_gguf(folder: Path, gguf_file: str, target: Path, *, source: str) -> Path:
    """Dequantize a GGUF model once and store it as float32 safetensors, with its manifest."""
    log.info("dequantizing %s (first load only; later loads use %s)", gguf_file, target)
    model, tok = _from_folder(folder, torch.float32, label=f"GGUF file {folder / gguf_file}", gguf_file=gguf_file)
    # The GGUF quantizer marks the model as quantized, which blocks save_pretrained
    # and would make reloads look for the GGUF file again.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return store_converted(model, tok, target, {"source": source, "gguf_file": gguf_file})


def store_converted(model: PreTrainedModel, tok: PreTrainedTokenizerBase, target: Path, marker: dict) -> Path:
    """Write a converted model folder the way every load expects it: the files, then their manifest,
    then the completion marker, in a private folder renamed into place; then verify it once."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _private_name(target)
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        manifest = write_manifest(tmp, skip=[_COMPLETE], extra={"marker": marker})
        log.debug("manifest of %s: %d files", target, len(manifest["files"]))
        (tmp / _COMPLETE).write_text(json.dumps(marker))
        _publish_folder(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    verify_manifest(target, f"converted model cache {target}")  # hashes once now, remembered for later loads
    return target


def _publish_folder(tmp: Path, target: Path) -> None:
    """Rename a finished folder into place, atomically.

    If another process got there first with a complete copy, that copy stays and ours is dropped; an
    incomplete folder (or one from before manifests) left by an older version or a crash is first renamed
    away (atomic too), then removed.
    """
    error: OSError | None = None
    for _ in range(_PUBLISH_ATTEMPTS):
        try:
            tmp.rename(target)
            return
        except OSError as exc:
            error = exc
            if _is_complete(target):
                return  # someone else's complete copy; the caller removes ours
        stale = _private_name(target)
        try:
            target.rename(stale)
        except FileNotFoundError:
            continue  # gone meanwhile: try again
        except OSError as exc:
            raise FactEditError(f"cannot replace the incomplete cache folder {target}: {exc}") from exc
        shutil.rmtree(stale, ignore_errors=True)
    raise FactEditError(f"could not write the cache folder {target}: {error}")


# -- GGUF files ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GGUFInfo:
    """What the header of a GGUF file says: its version, architecture and tensor table totals."""

    version: int
    architecture: str
    n_tensors: int
    n_elements: int

    @property
    def float32_bytes(self) -> int:
        return self.n_elements * 4


_GGUF_SCALARS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING, _GGUF_ARRAY = 8, 9
_GGUF_MAX_DIMS = 4


class _NeedMore(Exception):
    """The header runs past the prefix read so far (chunked files are read a prefix at a time)."""


class _Reader:
    """Bounds-checked little-endian reads from the start of a file (``buf``, all of it or a prefix) whose
    whole size is ``size``; any read past the end is a clean refusal."""

    def __init__(self, buf, label: str, remedy: str, size: int | None = None):
        self.buf, self.pos, self.label, self.remedy = buf, 0, label, remedy
        self.size = len(buf) if size is None else size

    def fail(self, what: str) -> FactEditError:
        return FactEditError(
            f"{self.label} is not a valid GGUF file ({what} at byte {self.pos}); it is corrupt or truncated: "
            f"{self.remedy}"
        )

    def take(self, n: int) -> int:
        if n < 0 or self.pos + n > self.size:
            raise self.fail("unexpected end of file")
        if self.pos + n > len(self.buf):
            raise _NeedMore
        start = self.pos
        self.pos += n
        return start

    def u32(self) -> int:
        return struct.unpack_from("<I", self.buf, self.take(4))[0]

    def u64(self) -> int:
        return struct.unpack_from("<Q", self.buf, self.take(8))[0]

    def string(self) -> str:
        n = self.u64()
        start = self.take(n)
        try:
            return bytes(self.buf[start : start + n]).decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail("a string that is not UTF-8") from None

    def skip_value(self, vtype: int, depth: int = 0) -> None:
        if vtype in _GGUF_SCALARS:
            self.take(_GGUF_SCALARS[vtype])
        elif vtype == _GGUF_STRING:
            self.take(self.u64())
        elif vtype == _GGUF_ARRAY and depth < 4:
            etype, count = self.u32(), self.u64()
            if etype in _GGUF_SCALARS:
                self.take(count * _GGUF_SCALARS[etype])
            elif etype in (_GGUF_STRING, _GGUF_ARRAY):
                if count > self.size - self.pos:
                    raise self.fail(f"an array of {count} values")
                for _ in range(count):
                    self.skip_value(etype, depth + 1)
            else:
                raise self.fail(f"unknown array value type {etype}")
        else:
            raise self.fail(f"unknown value type {vtype}")


def read_gguf_info(path: Path, *, remedy: str = "download or copy it again", label: str | None = None) -> GGUFInfo:
    """Parse and check a GGUF file's header and tensor table without reading its tensors (milliseconds).

    Refused in one line: a file that is not GGUF (magic, version), counts or strings that run past
    the end, unknown value or tensor types, and tensors whose data would lie past the end of the file
    (a truncated download).
    """
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    label = label or f"GGUF file {path}"
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size < 24:
                raise FactEditError(f"{label} is not a valid GGUF file (only {size} bytes): {remedy}")
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _parse_gguf(_Reader(buf, label, remedy), GGML_QUANT_SIZES, GGMLQuantizationType)
    except OSError as exc:
        raise FactEditError(f"cannot read {label}: {exc.strerror or exc}") from exc


def read_chunked_gguf_info(parts: list[Path], *, remedy: str, label: str) -> GGUFInfo:
    """:func:`read_gguf_info` of the file the ``parts`` make once joined, without joining them: the header
    is read from a growing prefix of the concatenation (it is usually within the first chunk)."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        size = sum(p.stat().st_size for p in parts)
        if size < 24:
            raise FactEditError(f"{label} is not a valid GGUF file (only {size} bytes): {remedy}")
        prefix = 16 << 20
        while True:
            buf = _read_prefix(parts, min(prefix, size))
            try:
                return _parse_gguf(_Reader(buf, label, remedy, size), GGML_QUANT_SIZES, GGMLQuantizationType)
            except _NeedMore:
                prefix *= 4
    except OSError as exc:
        raise FactEditError(f"cannot read {label}: {exc.strerror or exc}; {remedy}") from exc


def _read_prefix(parts: list[Path], n: int) -> bytes:
    out = bytearray()
    for part in parts:
        if len(out) >= n:
            break
        with open(part, "rb") as fh:
            out += fh.read(n - len(out))
    return bytes(out)


def _parse_gguf(r: _Reader, quant_sizes, quant_type) -> GGUFInfo:
    if bytes(r.buf[0:4]) != b"GGUF":
        raise FactEditError(f"{r.label} is not a GGUF file (it does not start with 'GGUF'): {r.remedy}")
    r.take(4)
    version = r.u32()
    if version not in (2, 3):
        raise r.fail(f"unsupported GGUF version {version}")
    n_tensors, n_kv = r.u64(), r.u64()
    if n_tensors == 0 or n_tensors * 24 > r.size or n_kv * 13 > r.size:
        raise r.fail(f"impossible counts ({n_tensors} tensors, {n_kv} metadata entries)")
    alignment, architecture = 32, ""
    for _ in range(n_kv):
        key = r.string()
        vtype = r.u32()
        if key == "general.alignment" and vtype == 4:
            alignment = r.u32()
        elif key == "general.architecture" and vtype == _GGUF_STRING:
            architecture = r.string()
        else:
            r.skip_value(vtype)
    if alignment <= 0 or alignment & (alignment - 1):
        raise r.fail(f"alignment {alignment} is not a power of two")
    tensors = []
    for _ in range(n_tensors):
        name = r.string()
        n_dims = r.u32()
        if not 1 <= n_dims <= _GGUF_MAX_DIMS:
            raise r.fail(f"tensor {name!r} has {n_dims} dimensions")
        dims = [r.u64() for _ in range(n_dims)]
        ttype, offset = r.u32(), r.u64()
        try:
            block, type_size = quant_sizes[quant_type(ttype)]
        except (ValueError, KeyError):
            raise r.fail(f"tensor {name!r} has unknown type {ttype}") from None
        n = math.prod(dims)
        if n == 0 or n % block or offset % alignment:
            raise r.fail(f"tensor {name!r} has an impossible shape {dims} or offset {offset}")
        tensors.append((name, n, offset, n // block * type_size))
    data_start = -(-r.pos // alignment) * alignment
    n_elements = 0
    for name, n, offset, nbytes in tensors:
        if data_start + offset + nbytes > r.size:
            raise FactEditError(
                f"{r.label} is truncated: tensor {name!r} ends at byte {data_start + offset + nbytes}, the file has "
                f"{r.size}: {r.remedy}"
            )
        n_elements += n
    if not architecture:
        raise r.fail("no general.architecture entry")
    return GGUFInfo(version, architecture, len(tensors), n_elements)


# -- model folders ---------------------------------------------------------------------------------------------------


def check_model_folder(folder: Path, dtype: torch.dtype, *, headers_only: bool = False) -> int | None:
    """Check a model folder's files before ``from_pretrained`` reads them; return the bytes its weights
    take at ``dtype`` (``None`` when unknown).

    Refused in one line naming the file: no or unparsable ``config.json``; no weights; a safetensors
    header that is corrupt or describes more data than the file holds (truncated); a tokenizer file
    that is not JSON. ``headers_only``: only the weights (for a cache the manifest already verified).
    """
    if not headers_only:
        config = folder / "config.json"
        if not config.is_file():
            raise FactEditError(
                f"{folder} is not a model folder: it has no config.json (give a Hugging Face model folder, "
                f"a .gguf file, a hub id or one of the registered names: {', '.join(REGISTRY)})"
            )
        parsed = _json_file(config, "model config")
        if not isinstance(parsed, dict) or not isinstance(parsed.get("model_type"), str):
            raise FactEditError(f"{config} is not a model config (no 'model_type'); fix or replace the file")
        for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
            if (folder / name).is_file():
                _json_file(folder / name, "tokenizer file" if name.startswith("tokenizer") else "config file")
    shards = _weight_files(folder)
    if not shards:
        raise FactEditError(
            f"{folder} has no weights (model.safetensors, model.safetensors.index.json or pytorch_model.bin)"
        )
    total = 0
    for shard in shards:
        if shard.suffix != ".safetensors":
            total += shard.stat().st_size  # pickled checkpoints: their size is the best guess
            continue
        total += _safetensors_bytes(shard, dtype)
    return total


def _json_file(path: Path, what: str):
    try:
        return json.loads(path.read_bytes())
    except OSError as exc:
        raise FactEditError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FactEditError(f"{what} {path} is not valid JSON ({first_line(exc)}); fix or replace the file") from exc


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        data = _json_file(index, "weights index")
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise FactEditError(f"weights index {index} has no 'weight_map'; fix or replace the file")
        files = [folder / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise FactEditError(f"{f} is missing (listed in {index.name})")
        return files
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return [folder / name]
    return sorted(folder.glob("*.safetensors"))


def _safetensors_bytes(path: Path, dtype: torch.dtype) -> int:
    """Bytes of a safetensors file's tensors once loaded at ``dtype`` (floating tensors are cast), from
    its header; refuses a header that is corrupt or points past the end of the file."""
    label = f"weights file {path}"
    header = read_header(path, name=label)
    try:
        with open(path, "rb") as fh:
            length = int.from_bytes(fh.read(8), "little")
            size = os.fstat(fh.fileno()).st_size
    except OSError as exc:
        raise FactEditError(f"cannot read {label}: {exc.strerror or exc}") from exc
    itemsize = torch.tensor([], dtype=dtype).element_size()
    total, end = 0, 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            shape, kind, (_, stop) = info["shape"], info["dtype"], info["data_offsets"]
            n = math.prod(int(d) for d in shape)
            end = max(end, int(stop))
        except (KeyError, TypeError, ValueError):
            raise FactEditError(f"{label} has a malformed entry for {name!r}; replace the file") from None
        total += n * (itemsize if kind in ("F32", "F16", "BF16", "F64") else _ST_BYTES.get(kind, 1))
    if 8 + length + end > size:
        raise FactEditError(
            f"weights file {path} is truncated ({size} bytes, its header describes {8 + length + end}); "
            "replace the file (or, for a converted model, delete its folder)"
        )
    return total


def _model_bytes(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


# -- memory ---------------------------------------------------------------------------------------------------------


def available_ram() -> int | None:
    """Bytes of RAM this process can still use: ``MemAvailable`` and the cgroup limit, else ``sysconf``;
    ``None`` when neither is known."""
    found: list[int] = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
                break
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
            found.append(max(0, int(limit) - used))
    except (OSError, ValueError):
        pass
    if not found:
        try:
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            return None
    return min(found)


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.0f} MB"


def check_memory(needed: int | None, device: torch.device, what: str, dtype: torch.dtype, *, ram: bool = True) -> None:
    """Refuse, before loading, weights that cannot fit: ``needed`` bytes against free RAM (weights are
    always read into RAM first) and, for a GPU, its free memory. Unknown sizes skip the check."""
    if not needed:
        return
    dtype_name = str(dtype).removeprefix("torch.")
    if ram:
        free = available_ram()
        if free is not None and needed > free:
            raise FactEditError(
                f"{what} needs about {_gb(needed)} of memory for its weights in {dtype_name}, but only {_gb(free)} "
                "is available: free memory, or choose a smaller model or dtype"
            )
    if device.type == "cuda":
        try:
            free_gpu, _ = torch.cuda.mem_get_info(device)
        except RuntimeError:
            return
        if needed > free_gpu:
            raise FactEditError(
                f"{what} needs about {_gb(needed)} of GPU memory for its weights in {dtype_name}, but {device} has "
                f"only {_gb(free_gpu)} free: choose another device, a smaller model or dtype"
            )
