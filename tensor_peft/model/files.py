"""Saving an adapter to a directory (tensor_peft's format or peft's LoRA format) and
loading it back, each save replacing the files in one step."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import safetensors
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .. import __version__, peft_format
from ..config import AdapterConfig, check_choice
from ..nn.base import Adapter
from .injection import METHODS, _inject, set_adapter
from .targeting import _original_modules, adapter_layers

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
CURRENT_LINK = ".tensor_peft_adapter"  # in a saved adapter's directory: the link to the current files' directory
VERSION_PREFIX = ".tensor_peft_adapter-"  # the name of each such directory (and of links being renamed into place)


def _module_tensors(model: nn.Module, names: list[str] | None) -> dict[str, torch.Tensor]:
    """The state of the modules ``names`` (modules_to_save), keyed ``<module>.<key>``."""
    return {
        f"{name}.{key}": value.detach().cpu().contiguous()
        for name in names or ()
        for key, value in model.get_submodule(name).state_dict().items()
    }


def save_adapter(model: nn.Module, path: str | Path, adapter_name: str = "default", format: str = "tensor_peft") -> None:
    """Write adapter ``adapter_name`` to directory ``path``: its config as JSON and its
    tensors as safetensors (keys ``<module name>.<parameter>``, and
    ``modules_to_save.<module>.<key>``). ``format="peft"`` writes peft's LoRA format
    instead (``peft.PeftModel.from_pretrained`` loads it), for the methods whose update is
    exactly a low-rank product; the others raise saying why. The adapter in ``path`` is
    replaced in one step: interrupted anywhere, ``path`` holds the old adapter or the new
    one, never a mix (``_replace_adapter_files``)."""
    configs = getattr(model, "tensor_peft_configs", {})
    if adapter_name not in configs:
        raise ValueError(f"the model has no adapter named {adapter_name!r}")
    check_choice(format, "format", ("tensor_peft", "peft"))
    config = configs[adapter_name]
    layers = {name: layer for name, layer in adapter_layers(model).items() if adapter_name in layer.adapters}
    module_tensors = _module_tensors(model, config.modules_to_save)
    if format == "peft":
        fields, tensors = peft_format.export_tensors(model, layers, adapter_name, config.modules_to_save, module_tensors)
    else:
        fields = {"tensor_peft_version": __version__, "method": config.method, "config": dataclasses.asdict(config)}
        tensors = {f"{peft_format.MODULES_TO_SAVE}.{key}": value for key, value in module_tensors.items()}
        for name, layer in layers.items():
            for key, value in layer.adapters[adapter_name].state_dict().items():
                tensors[f"{name}.{key}"] = value.detach().cpu().contiguous()
    config_text = json.dumps(fields, indent=2)
    _replace_adapter_files(Path(path), {WEIGHTS_FILE: lambda file: save_file(tensors, str(file)),
                                        CONFIG_FILE: lambda file: file.write_text(config_text)})  # fmt: skip


def _replace_adapter_files(path: Path, writers: dict[str, Callable[[Path], None]]) -> None:
    """Replace the adapter files in directory ``path`` in one step, wherever the save is
    interrupted: a reader finds the old adapter or the new one, never a mix.

    The files are written into a new directory beside the current one (``VERSION_PREFIX``
    + a random suffix), and the link ``CURRENT_LINK`` is renamed over to name it: that
    rename is the swap. The files' own names in ``path`` are links through
    ``CURRENT_LINK``, for peft and every other reader. Files that are not such links yet
    (peft's, an earlier tensor_peft's, a file an editor replaced) are first copied into
    a directory of their own that ``CURRENT_LINK`` names, so that every step of putting
    the links in place shows the old adapter. Other files of ``path`` are left alone;
    the replaced directories are removed."""
    path.mkdir(parents=True, exist_ok=True)
    for name in writers:
        if (path / name).is_dir():
            raise ValueError(f"path: {path / name} is a directory; cannot save the adapter there")
    if not _links_in_place(path):
        _swap_in(path, {name: lambda file, source=path / name: _copy_if_present(source, file) for name in writers})
        for name in writers:
            _replace_with_link(path / name, f"{CURRENT_LINK}/{name}")
    _swap_in(path, writers)
    current = os.readlink(path / CURRENT_LINK)  # ours, unless another save swapped in since
    for entry in path.iterdir():
        if entry.name.startswith(VERSION_PREFIX) and entry.name != current:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()


def _links_in_place(path: Path) -> bool:
    """Whether the adapter's files in ``path`` are links through ``CURRENT_LINK``."""
    return all(os.path.islink(path / name) and os.readlink(path / name) == f"{CURRENT_LINK}/{name}"
               for name in (CONFIG_FILE, WEIGHTS_FILE))  # fmt: skip


def _swap_in(path: Path, writers: dict[str, Callable[[Path], None]]) -> str:
    """Write a new directory of files in ``path`` (``writers``: file name -> the call that
    writes it) and rename ``CURRENT_LINK`` over to it; returns its name. Nothing that
    readers see changes unless it all succeeds."""
    version = f"{VERSION_PREFIX}{uuid.uuid4().hex}"
    staged_link = path / f"{version}.link"
    try:
        (path / version).mkdir()
        for name, write in writers.items():
            write(path / version / name)
        os.symlink(version, staged_link)
        os.replace(staged_link, path / CURRENT_LINK)
    except BaseException:
        staged_link.unlink(missing_ok=True)
        shutil.rmtree(path / version, ignore_errors=True)
        raise
    return version


def _copy_if_present(source: Path, destination: Path) -> None:
    if source.exists():
        shutil.copyfile(source, destination)


def _replace_with_link(file: Path, target: str) -> None:
    """Make ``file`` a link to ``target`` in one rename."""
    staged = file.with_name(f"{VERSION_PREFIX}{uuid.uuid4().hex}.link")
    os.symlink(target, staged)
    os.replace(staged, file)


def _adapter_directory(path: Path) -> Path:
    """The directory to read an adapter's files from: the one ``CURRENT_LINK`` names,
    read once so that both files come from one save, while the files in ``path`` are
    links through it; else ``path`` itself (peft's files, a file replaced by hand)."""
    link = path / CURRENT_LINK
    return path / os.readlink(link) if _links_in_place(path) and link.is_symlink() else path


def _read_adapter(path: Path, model: nn.Module) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    """The config and tensors saved in ``path`` (tensor_peft's format or peft's LoRA), or a
    ValueError naming the file and what is wrong (or the module of ``model`` whose peft
    update is not what tensor_peft would compute)."""
    file, directory = path / CONFIG_FILE, _adapter_directory(path)
    try:
        saved = json.loads((directory / CONFIG_FILE).read_text())
        tensors = load_file(str(directory / WEIGHTS_FILE))
    except (OSError, ValueError, safetensors.SafetensorError) as error:
        raise ValueError(f"{path} holds no readable adapter: {type(error).__name__}: {error}") from None
    if isinstance(saved, dict) and peft_format.is_peft_config(saved):
        config, tensors = peft_format.import_config(saved, tensors, str(file), str(path / WEIGHTS_FILE))
        modules = _original_modules(model)
        for name in config.target_modules:
            if name in modules:
                peft_format.check_peft_computes_alike(name, modules[name])
        return config, tensors
    try:
        method, fields = saved["method"], dict(saved["config"])
        names = fields["target_modules"]
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{file} is not a tensor_peft adapter config: {type(error).__name__}: {error}") from None
    if method not in METHODS:
        raise ValueError(f"{file} holds an unknown method {method!r}")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{file}: target_modules must be a list of module names, got {names!r}")
    try:
        return METHODS[method][0].from_saved({**fields, "target_modules": names}), tensors
    except TypeError as error:
        raise ValueError(f"{file} does not fit {METHODS[method][0].__name__}: {error}") from None


def load_adapter(model: nn.Module, path: str | Path, adapter_name: str = "default") -> nn.Module:
    """Add the adapter saved in ``path`` (by ``save_adapter``, or a peft LoRA adapter) to
    ``model`` as ``adapter_name`` and make it active. Raises, naming the module, where the
    model's modules do not fit the file (missing module, other method, other shapes); the
    model is then left as it was."""
    path = Path(path)
    config, tensors = _read_adapter(path, model)
    modules = _original_modules(model)
    for name in [*config.target_modules, *(config.modules_to_save or ())]:
        if name not in modules:
            raise ValueError(f"the saved adapter has module {name!r}, which the model lacks")
    config = dataclasses.replace(config, target_modules="|".join(map(re.escape, config.target_modules)))
    take_back = _inject(model, config, adapter_name)
    try:
        _load_tensors(model, adapter_name, tensors)
        set_adapter(model, adapter_name)
    except BaseException:
        take_back()
        raise
    return model


def load_adapter_weights(model: nn.Module, path: str | Path, adapter_name: str = "default") -> None:
    """Copy the tensors saved in ``path`` into the model's existing adapter
    ``adapter_name`` (and its modules_to_save), all checked before any is written."""
    configs = getattr(model, "tensor_peft_configs", {})
    if adapter_name not in configs:
        raise ValueError(f"the model has no adapter named {adapter_name!r}")
    config, tensors = _read_adapter(Path(path), model)
    if config.method != configs[adapter_name].method:
        raise ValueError(f"{path} holds a {config.method} adapter; adapter {adapter_name!r} is {configs[adapter_name].method}")
    _load_tensors(model, adapter_name, tensors)


def _load_tensors(model: nn.Module, adapter_name: str, tensors: dict[str, torch.Tensor]) -> None:
    """Load the saved tensors into the adapter's modules and its modules_to_save, every
    key and shape checked before anything is written."""
    destinations = {
        name: layer.adapters[adapter_name] for name, layer in adapter_layers(model).items() if adapter_name in layer.adapters
    }
    for name in model.tensor_peft_configs[adapter_name].modules_to_save or ():
        destinations[f"{peft_format.MODULES_TO_SAVE}.{name}"] = model.get_submodule(name)
    tensors = dict(tensors)
    for name, module in destinations.items():
        if isinstance(module, Adapter):
            module.upgrade_saved(tensors, f"{name}.")
    expected = {
        f"{name}.{key}": (name, key, value)
        for name, module in destinations.items()
        for key, value in module.state_dict().items()
    }
    if set(expected) != set(tensors):
        missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        raise ValueError(f"saved adapter does not fit the model: missing {missing}, unexpected {unexpected}")
    for key, (name, param_key, value) in expected.items():
        if tuple(tensors[key].shape) != tuple(value.shape):
            raise ValueError(
                f"module {name!r}: saved {param_key} has shape "
                f"{tuple(tensors[key].shape)}, the model's has {tuple(value.shape)}"
            )
    for name, module in destinations.items():  # load_state_dict: also the adapters' extra state
        module.load_state_dict({key: tensors[f"{name}.{key}"] for key in module.state_dict()})
