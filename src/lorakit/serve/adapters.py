"""The adapter cache: which adapters sit on the compute device, which wait on CPU, and
where the rest are found on disk.

Three tiers, each with least-recently-used eviction:

    device  at most `max_on_device` adapters attached to the model; the order they are
            attached in is the `slots` tuple given to `lorakit.mixed_batch`, so the layers'
            stacked weights survive from step to step and a swap rewrites one slot.
    cpu     at most `max_on_cpu` adapters read into memory (`AdapterFiles`), ready to attach.
    disk    every registered adapter's directory.

A live adapter is one already attached to the model (the adapter being trained) that the
engine serves as it stands: it has no files and never leaves the device, takes a device
slot of its own, and its weights are read where they are (`add_live`, `refresh_live`).

Reading from disk runs on a background thread so a decode loop never waits on a file;
attaching (a copy of a few MB) runs on the engine's thread between steps. An adapter in
use by a running request is never evicted from the device.

Every file the server reads from an adapter directory (`ADAPTER_FILES`: config, weights,
chat template, tokenizer files) must really lie inside it: one that is a link leaving the
directory is refused (`links_out`, `confined_file`), so an adapter cannot make the server
read, show or use a file from elsewhere.
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Collection
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from torch import nn

from lorakit.adapters.files import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    AdapterFiles,
    load_adapter,
    read_adapter,
)
from lorakit.adapters.inject import delete_adapter

TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json", "tokenizer_config.json")
"""Where a chat template saved beside an adapter is found, in the order they are tried."""
ADAPTER_FILES = (
    CONFIG_NAME, WEIGHTS_NAME, *TEMPLATE_FILES,
    "tokenizer.json", "tokenizer.model", "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
)
"""The files of an adapter directory the server may read (`lorakit train` writes them)."""


class AdapterMismatch(ValueError):
    """The adapter's files are fine but it does not fit this base model or this server."""


def check_servable(files: AdapterFiles) -> None:
    """Reject what the mixed-batch forward cannot run, before the model is touched."""
    config = files.config
    if config.use_dora:
        raise AdapterMismatch(f"{files.directory}: DoRA adapters cannot be served in mixed batches; merge it instead")
    if config.modules_to_save:
        raise AdapterMismatch(
            f"{files.directory}: adapters with modules_to_save ({config.modules_to_save}) cannot be served in mixed batches"
        )


class OutsideAdapter(ValueError):
    """A file of an adapter directory is a link to a file outside the directory."""


def links_out(directory: str | os.PathLike) -> list[str]:
    """The names in `ADAPTER_FILES` that exist in `directory` but whose real path (links
    followed) lies outside it. A link to another file inside the directory is fine."""
    real = os.path.realpath(directory)
    return [
        name for name in ADAPTER_FILES
        if os.path.lexists(os.path.join(real, name))
        and os.path.commonpath([real, os.path.realpath(os.path.join(real, name))]) != real
    ]


def check_inside(directory: str | os.PathLike, shown: str | None = None) -> None:
    """Raise OutsideAdapter, naming the files, when any file of the adapter links out of it."""
    outside = links_out(directory)
    if outside:
        raise OutsideAdapter(
            f"adapter directory {shown or str(directory)!r}: {', '.join(outside)} "
            f"{'is a link' if len(outside) == 1 else 'are links'} to a file outside it; every file of an "
            "adapter served here must lie inside its directory (copy the file in instead of linking it)"
        )


def confined_file(directory: str | os.PathLike, name: str) -> Path | None:
    """`directory/name` when it is a file really inside `directory`, None when there is no such
    file; OutsideAdapter when it is a link out of the directory."""
    real = os.path.realpath(directory)
    path = os.path.realpath(os.path.join(real, name))
    if not os.path.lexists(os.path.join(real, name)):
        return None
    if os.path.commonpath([real, path]) != real:
        raise OutsideAdapter(f"{name} of adapter directory {str(directory)!r} is a link to a file outside it; not read")
    return Path(path) if os.path.isfile(path) else None


def saved_template(directory: str | os.PathLike) -> str | None:
    """The chat template saved beside an adapter (chat_template.jinja, else the `chat_template`
    field of chat_template.json / tokenizer_config.json), read only from files inside the
    directory: OutsideAdapter when the one that would be read links out of it."""
    for name in TEMPLATE_FILES:
        path = confined_file(directory, name)
        if path is None:
            continue
        if name.endswith(".jinja"):
            return path.read_text(encoding="utf-8", errors="replace")
        try:
            template = json.loads(path.read_text(encoding="utf-8")).get("chat_template")
        except (ValueError, AttributeError):
            continue
        if isinstance(template, str):
            return template
    return None


class AdapterCache:
    """The three tiers. Every method but `prefetch` runs on the engine's thread."""

    def __init__(self, model: nn.Module, max_on_device: int, max_on_cpu: int, wake: Callable[[], None]) -> None:
        if max_on_device < 1:
            raise ValueError(f"max_adapters_on_device must be >= 1, got {max_on_device}")
        if max_on_cpu < 1:
            # An adapter read from disk waits in the CPU tier until a device slot takes it: with no
            # room there, it would be dropped as soon as it is read, and read again, forever.
            raise ValueError(f"max_adapters_on_cpu must be >= 1, got {max_on_cpu}")
        self.model = model
        self.max_on_device = max_on_device
        self.max_on_cpu = max_on_cpu
        self.paths: dict[str, Path] = {}
        self.on_device: OrderedDict[str, AdapterFiles] = OrderedDict()  # least recently used first
        self.on_cpu: OrderedDict[str, AdapterFiles] = OrderedDict()
        self.slots: tuple[str, ...] = ()
        self.live: dict[str, object] = {}  # name -> a token that `refresh_live` replaces
        self._slot_list: list[str | None] = []  # positions in the stacks; None: a free slot
        self._unreadable: set[str] = set()
        self._inside: set[str] = set()  # adapters whose files all lay inside their directory when loaded
        self.hits = self.misses = self.evictions = 0
        self._lock = threading.Lock()
        self._reading: dict[str, Future] = {}
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorakit-adapter-reader")
        self._wake = wake

    def close(self) -> None:
        self._reader.shutdown(wait=False, cancel_futures=True)

    @property
    def names(self) -> list[str]:
        return list(self.paths)

    def known(self, name: str) -> bool:
        return name in self.paths or name in self.live

    @property
    def resident(self) -> dict[str, object]:
        """Every adapter on the device, live ones included: name -> what its weights came
        from (a live adapter's refresh token, a loaded one's files). The fast decode path
        rewrites a slot whose source changed."""
        return {**self.live, **self.on_device}

    # live adapters -------------------------------------------------------------------

    def add_live(self, name: str, busy: Collection[str]) -> None:
        """Serve `name`, already attached to the model, as it is (see the module docstring)."""
        if name in self.paths or name in self.live:
            raise ValueError(f"an adapter named {name!r} is already served; pick another name")
        if not self._make_room(busy):
            raise ValueError(f"every device slot ({self.max_on_device}) is in use; no room for adapter {name!r}")
        self.live[name] = object()

    def refresh_live(self, name: str) -> None:
        """Mark live adapter `name` as changed in place (a decode path that copies it copies it again)."""
        self.live[name] = object()

    def remove_live(self, name: str) -> None:
        self.live.pop(name, None)

    # registration --------------------------------------------------------------------

    def register(self, name: str, files: AdapterFiles, busy: Collection[str]) -> None:
        """Attach a freshly read adapter (which checks it against the model) and keep it.

        Raises AdapterMismatch, leaving everything as it was, when it does not fit.
        """
        check_servable(files)
        if self.known(name):
            raise ValueError(f"an adapter named {name!r} is already loaded; delete it first or pick another name")
        self._make_room(busy)
        try:
            load_adapter(self.model, files, name)
        except (ValueError, KeyError) as err:
            raise AdapterMismatch(str(err)) from None
        self.paths[name] = files.directory
        if not links_out(files.directory):
            self._inside.add(name)
        self._placed(name, files)
        if len(self.on_device) + len(self.live) > self.max_on_device:
            # Every other resident adapter is busy: keep this one on CPU until a slot frees up.
            self._evict(name)

    def unregister(self, name: str) -> None:
        """Forget the adapter; it leaves the device now (callers make sure it is not busy)."""
        self.paths.pop(name, None)
        self._inside.discard(name)
        with self._lock:
            self.on_cpu.pop(name, None)
        if name in self.on_device:
            del self.on_device[name]
            delete_adapter(self.model, name)
            self._free_slot(name)

    # residency -----------------------------------------------------------------------

    def ready(self, name: str, busy: Collection[str]) -> bool:
        """Make `name` resident if it can be now; False while it is being read or no slot is free."""
        if name in self.on_device:
            self.on_device.move_to_end(name)
            return True
        with self._lock:
            files = self.on_cpu.pop(name, None)
        if files is None:
            self.prefetch(name)
            return False
        if not self._make_room(busy):
            with self._lock:
                self.on_cpu[name] = files
            return False
        load_adapter(self.model, files, name)
        self._placed(name, files)
        return True

    def count_hit(self, name: str) -> None:
        if name in self.on_device:
            self.hits += 1
        else:
            self.misses += 1

    def prefetch(self, name: str) -> None:
        """Start reading `name` from disk on the background thread (once)."""
        with self._lock:
            if name in self.on_cpu or name in self._reading or name not in self.paths:
                return
            self._reading[name] = self._reader.submit(self._read, name, self.paths[name])

    def _read(self, name: str, path: Path) -> None:
        try:
            if name in self._inside:
                check_inside(path)  # a file swapped for a link out since it was loaded is not read
            files = read_adapter(path)
        except (OSError, ValueError):
            files = None  # the directory changed since it was registered; its requests fail in `failed`
        with self._lock:
            del self._reading[name]
            if files is not None:
                self.on_cpu[name] = files
                self._trim_cpu()
            else:
                self._unreadable.add(name)
        self._wake()

    def failed(self, name: str) -> bool:
        """True once, when reading `name` back from disk failed."""
        with self._lock:
            if name in self._unreadable:
                self._unreadable.discard(name)
                return True
        return False

    def _placed(self, name: str, files: AdapterFiles) -> None:
        self.on_device[name] = files
        # Take the slot of an adapter that left, so the layers rewrite one stacked slot.
        if None in self._slot_list:
            self._slot_list[self._slot_list.index(None)] = name
        else:
            self._slot_list.append(name)
        self._publish()

    def _free_slot(self, name: str) -> None:
        self._slot_list = [None if n == name else n for n in self._slot_list]
        self._publish()

    def _publish(self) -> None:
        # A new tuple only when the slots change: the layers recognise an unchanged one by identity.
        self.slots = tuple(n for n in self._slot_list if n is not None)

    def _make_room(self, busy: Collection[str]) -> bool:
        """Evict idle adapters until one more fits on the device (live ones take slots too)."""
        while len(self.on_device) + len(self.live) >= self.max_on_device:
            idle = next((n for n in self.on_device if n not in busy), None)
            if idle is None:
                return False
            self._evict(idle)
        return True

    def _evict(self, name: str) -> None:
        files = self.on_device.pop(name)
        delete_adapter(self.model, name)
        self._free_slot(name)
        self.evictions += 1
        with self._lock:
            self.on_cpu[name] = files
            self._trim_cpu()

    def _trim_cpu(self) -> None:
        while len(self.on_cpu) > self.max_on_cpu:
            self.on_cpu.popitem(last=False)
