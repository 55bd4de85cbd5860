"""Minimal context managers over PyTorch forward hooks.

``Trace`` reads (and optionally edits) one module's input/output; ``TraceDict``
does the same for several; ``stop=True`` raises :class:`StopForward` after the
module so a caller pays only for the partial forward it needs (statistics,
keys). ``swap_modules`` temporarily replaces sub-modules; ``known_blocks`` uses it
to skip the lowest blocks when the state they would produce is already known
(:class:`KnownOutput` stubs return it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from factedit.models.architectures import ArchSpec, get_module
from factedit.models.placement import module_device


class StopForward(Exception):
    """Raised from a hook to cut the forward pass once the needed activation is read."""


def _first_tensor(value: Any) -> torch.Tensor:
    return value[0] if isinstance(value, (tuple, list)) else value


def _replace_first(value: Any, tensor: torch.Tensor) -> Any:
    if isinstance(value, tuple):
        return (tensor, *value[1:])
    if isinstance(value, list):
        return [tensor, *value[1:]]
    return tensor


EditFn = Callable[[torch.Tensor, str], torch.Tensor]


class Trace(contextlib.AbstractContextManager):
    """Hook one named module for the duration of a ``with`` block.

    After the forward, ``.input`` / ``.output`` hold the module's first positional
    input and its (first) output. ``edit_output(output, name)`` may return a
    replacement; ``edit_input`` likewise for the input. A replacement is put on the
    device of what it replaces (with a device map, modules sit on different devices),
    so an edit should build it there. With accelerate's hooks, ``.input`` is the input as
    it arrived, before accelerate moves it to the module's device; ``.output`` is on the
    module's device.
    """

    def __init__(
        self,
        model: nn.Module,
        name: str,
        *,
        retain_input: bool = False,
        retain_output: bool = True,
        edit_input: EditFn | None = None,
        edit_output: EditFn | None = None,
        stop: bool = False,
        detach: bool = True,
    ) -> None:
        self.name = name
        self.input: torch.Tensor | None = None
        self.output: torch.Tensor | None = None
        module = get_module(model, name)
        self._handles = []

        if retain_input or edit_input is not None:

            def pre_hook(mod: nn.Module, args: tuple, kwargs: dict) -> Any:
                x = args[0] if args else next(iter(kwargs.values()))
                if edit_input is not None:
                    x = edit_input(x, name).to(x.device)
                if retain_input:
                    self.input = x.detach() if detach else x
                if edit_input is not None:
                    if args:
                        return (x, *args[1:]), kwargs
                    first = next(iter(kwargs))
                    return args, {**kwargs, first: x}
                return None

            self._handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))

        def hook(mod: nn.Module, args: tuple, output: Any) -> Any:
            result = None
            if edit_output is not None:
                out = _first_tensor(output)
                new = edit_output(out, name).to(out.device)  # the rest of the forward expects it there
                result = _replace_first(output, new)
                output = result
            if retain_output:
                out = _first_tensor(output)
                self.output = out.detach() if detach else out
            if stop:
                raise StopForward(name)
            return result

        if retain_output or edit_output is not None or stop:
            self._handles.append(module.register_forward_hook(hook))

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.close()
        return exc_type is StopForward


class TraceDict(dict, contextlib.AbstractContextManager):
    """Several :class:`Trace` objects, keyed by module name.

    With ``stop=True`` the forward stops after the *last* name in ``names``
    (pass names in execution order, e.g. by increasing layer).
    """

    def __init__(
        self,
        model: nn.Module,
        names: Iterable[str],
        *,
        retain_input: bool = False,
        retain_output: bool = True,
        edit_input: EditFn | None = None,
        edit_output: EditFn | None = None,
        stop: bool = False,
        detach: bool = True,
    ) -> None:
        super().__init__()
        names = list(dict.fromkeys(names))
        for i, name in enumerate(names):
            self[name] = Trace(
                model,
                name,
                retain_input=retain_input,
                retain_output=retain_output,
                edit_input=edit_input,
                edit_output=edit_output,
                stop=stop and i == len(names) - 1,
                detach=detach,
            )

    def close(self) -> None:
        for trace in self.values():
            trace.close()

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.close()
        return exc_type is StopForward


@contextlib.contextmanager
def swap_modules(model: nn.Module, replacements: dict[str, nn.Module]) -> Iterator[None]:
    """Temporarily put other modules at the given dotted names (restored on exit)."""
    originals: dict[str, nn.Module] = {}
    try:
        for name, new in replacements.items():
            parent_name, _, child = name.rpartition(".")
            parent = get_module(model, parent_name) if parent_name else model
            originals[name] = getattr(parent, child) if not child.isdigit() else parent[int(child)]
            if child.isdigit():
                parent[int(child)] = new
            else:
                setattr(parent, child, new)
        yield
    finally:
        for name, old in originals.items():
            parent_name, _, child = name.rpartition(".")
            parent = get_module(model, parent_name) if parent_name else model
            if child.isdigit():
                parent[int(child)] = old
            else:
                setattr(parent, child, old)


class KnownOutput(nn.Module):
    """Stands in for a block whose output is already known; other attributes come from the block.

    Attribute look-ups fall through to the replaced block so that model code reading
    per-layer settings (attention type, layer index) from it keeps working.
    """

    def __init__(self, block: nn.Module, value: torch.Tensor) -> None:
        super().__init__()
        object.__setattr__(self, "_block", block)
        self.value = value

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.value

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_block"), name)


@contextlib.contextmanager
def known_blocks(model: nn.Module, arch: ArchSpec, count: int, output: torch.Tensor | None) -> Iterator[None]:
    """Skip blocks ``0 .. count-1``: each returns ``output``, the known input of block ``count``.

    Why: a forward whose changes start at block ``count`` recomputes nothing below it
    (the fast value optimisation and causal tracing). ``count == 0`` changes nothing.
    ``output`` is moved to the device of block ``count`` (of the final norm when every block is skipped).
    """
    blocks = get_module(model, arch.blocks)
    if count and output is not None:
        output = output.to(module_device(model, arch.block(count) if count < len(blocks) else arch.final_norm))
    with swap_modules(model, {arch.block(i): KnownOutput(blocks[i], output) for i in range(count)}):
        yield


def run_until(model: nn.Module, stop_after: str, **inputs: Any) -> None:
    """Run ``model(**inputs)`` but stop right after module ``stop_after`` (use inside Traces)."""
    with Trace(model, stop_after, retain_output=False, stop=True):
        model(**inputs)


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """Disable parameter gradients for the block, restoring each flag afterwards."""
    flags = {p: p.requires_grad for p in model.parameters()}
    try:
        for p in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
