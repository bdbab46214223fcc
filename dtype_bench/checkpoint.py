"""Checkpoints a run can resume from bit-exactly, written so that a kill at any moment loses nothing.

Layout, per run (`run_dir(output_dir, run_id)` = `<output_dir>/checkpoints/<run_id>/`):
    last/                the newest resume point (replaced at every evaluation and on SIGTERM/SIGINT)
        model.safetensors    the model's parameters and buffers
        state.pt             optimizer (8-bit states too), LR scheduler, GradScaler, every RNG (Python, NumPy,
                             torch CPU and CUDA) and the loop's `run_state.RunState` (step counters, data position,
                             validation results and the best so far, step-log offset, monitor state)
        manifest.json        format version, identity (run, config, setup, data, model signature), step, and
                             the SHA-256 and size of each file above
    best-step<k>/        the best-validation weights (model.safetensors + manifest.json with metrics); `last`
                         names the one it belongs to, others are removed after `last` is written
Each directory is built under a temporary name and renamed into place (temp + fsync + rename), so a
half-written checkpoint never has a name that is read. Loading never executes pickled code: tensors come
from safetensors and `torch.load(weights_only=True)`. Every file is checked against the manifest and the
identity against the current run *before* anything is applied; a corrupt or mismatched checkpoint raises
`CheckpointError` with one line saying what is wrong and what to do.

Throughput after a resume: the timer's windows are checkpointed, so `samples_per_second` of a resumed run is
measured over the timed steps of every process; a resumed process starts cold (allocator, compilation), so its
first `timing_warmup_steps` are excluded again. Peak memory is the maximum over the processes that trained (a
process resumed after the last checkpoint that only evaluates adds its evaluation peak). The row's `segments`
say which steps each process trained, with how many torch threads.
"""
from __future__ import annotations

import io
import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_model

from dtype_bench.io import (
    FolderRefused, atomic_directory, claim_folder, damaged_file, file_checksums, fingerprint, json_dumps,
)

FORMAT_VERSION = 3  # 3: RunState progress with the timer's windows, the training peaks and the segments
MODEL_FILE, STATE_FILE, MANIFEST = "model.safetensors", "state.pt", "manifest.json"
BEST_DIR = re.compile(r"best-step\d+")  # the only names `best_dir` may take: a folder inside the run's own


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used as is; the message is one line."""


def run_dir(output_dir: str | Path, run_id: str) -> Path:
    return Path(output_dir) / "checkpoints" / run_id


def model_signature(model: torch.nn.Module) -> str:
    """Names, shapes and dtypes of the model's tensors: another architecture or precision cannot load."""
    return fingerprint([(k, list(v.shape), str(v.dtype)) for k, v in model.state_dict().items()])


# ---------------------------------------------------------------- RNG


def rng_state() -> dict:
    """Every RNG the loop may draw from, as tensors and plain values (loadable with weights_only)."""
    version, mt, gauss = random.getstate()
    numpy = np.random.get_state(legacy=False)
    return {
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {"bit_generator": numpy["bit_generator"], "key": torch.from_numpy(numpy["state"]["key"].astype(np.int64)),
                  "pos": numpy["state"]["pos"], "has_gauss": numpy["has_gauss"], "gauss": numpy["gauss"]},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    np_state = state["numpy"]
    np.random.set_state({"bit_generator": np_state["bit_generator"],
                         "state": {"key": np_state["key"].numpy().astype(np.uint32), "pos": np_state["pos"]},
                         "has_gauss": np_state["has_gauss"], "gauss": np_state["gauss"]})
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        if len(state["cuda"]) != torch.cuda.device_count():
            raise CheckpointError(f"checkpoint holds RNG states of {len(state['cuda'])} CUDA devices, this "
                                  f"machine has {torch.cuda.device_count()}")
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------- one checkpoint directory


def _write(directory: Path, manifest: dict, files: dict[str, Any]) -> None:
    """Write `files` (name -> a function writing that path) and a manifest with their hashes, atomically."""
    with atomic_directory(directory, MANIFEST, "format_version") as tmp:
        for name, write in files.items():
            write(tmp / name)
        manifest = {**manifest, "format_version": FORMAT_VERSION, "files": file_checksums(tmp, files)}
        (tmp / MANIFEST).write_text(json_dumps(manifest, indent=2) + "\n")  # fsynced with the folder


def _verified_manifest(directory: Path, identity: dict) -> dict:
    """The manifest of `directory` once every file matches it and its identity matches ours. A checkpoint is
    read only from the run's own folder: a symbolic link in its place, or a manifest naming a file outside it,
    is refused."""
    if directory.is_symlink():
        raise CheckpointError(f"checkpoint {directory} is a symbolic link: refused (a checkpoint is read only from "
                              "the run's own folder); remove the link or pass --fresh")
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {directory} is unreadable ({type(e).__name__}: {e}); "
                              "delete it or pass --fresh") from e
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {directory} has format_version {manifest.get('format_version')}, "
                              f"expected {FORMAT_VERSION}; pass --fresh to start over")
    differing = [f"{k} (checkpoint {manifest.get('identity', {}).get(k)!r}, this run {v!r})"
                 for k, v in identity.items() if manifest.get("identity", {}).get(k) != v]
    if differing:
        raise CheckpointError(f"checkpoint {directory} belongs to another run: differs in {'; '.join(differing)}; "
                              "pass --fresh to start over")
    damaged = damaged_file(directory, files)
    if damaged:
        raise CheckpointError(f"checkpoint {directory} is corrupt: {damaged} does not match its manifest; "
                              "delete it or pass --fresh to start over")
    return manifest


def _read_model(directory: Path, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The saved tensors, checked against the model's names, shapes and dtypes (nothing applied yet)."""
    try:
        tensors = load_file(directory / MODEL_FILE)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"checkpoint {directory}: {MODEL_FILE} is unreadable ({e}); pass --fresh") from e
    expected = model.state_dict()
    misfits = [k for k, v in tensors.items()
               if k not in expected or expected[k].shape != v.shape or expected[k].dtype != v.dtype]
    # save_model stores a tensor shared by several names (tied weights) once, under one of them.
    saved_storage = {expected[k].data_ptr() for k in tensors if k in expected}
    missing = [k for k, v in expected.items() if k not in tensors and v.data_ptr() not in saved_storage]
    if misfits or missing:
        raise CheckpointError(f"checkpoint {directory}: {MODEL_FILE} does not fit the model "
                              f"(e.g. {(misfits or missing)[0]}); pass --fresh to start over")
    return tensors


def _check_optimizer_fits(optimizer: torch.optim.Optimizer, saved: dict, directory: Path) -> None:
    """The parameter-group structure must match before load_state_dict touches anything."""
    ours = [len(g["params"]) for g in optimizer.param_groups]
    theirs = [len(g["params"]) for g in saved["param_groups"]]
    if ours != theirs:
        raise CheckpointError(f"checkpoint {directory}: optimizer parameter groups {theirs} do not match this "
                              f"run's {ours}; pass --fresh to start over")


# ---------------------------------------------------------------- a run's checkpoints


class RunCheckpoints:
    """The `last` and `best` checkpoints of one run, and the identity a checkpoint must carry to be loaded.

    `identity`: JSON-ready values that must all match on load (run id, config, seed, setup and data
    fingerprints); the model signature is added here. `record`: written to the manifest for people (the
    resolved configs); not compared.
    """

    def __init__(self, directory: str | Path, model: torch.nn.Module, identity: dict, record: dict | None = None):
        self.directory = Path(directory)
        self.model = model
        self.identity = {**identity, "model_signature": model_signature(model)}
        self.record = record or {}

    @property
    def last_dir(self) -> Path:
        return self.directory / "last"

    def exists(self) -> bool:
        return (self.last_dir / MANIFEST).exists()

    # ---- best weights

    def save_best(self, step: int, metrics: dict) -> str:
        """Write this step's weights as the best so far; returns the directory name `progress` keeps."""
        name = f"best-step{step}"
        _write(self.directory / name, {"identity": self.identity, "step": step, "metrics": metrics},
               {MODEL_FILE: lambda path: save_model(self.model, str(path))})
        return name

    def load_best(self, name: str) -> None:
        """Load the best weights `name` (from `progress`) into the model, verified first."""
        if not BEST_DIR.fullmatch(name):
            raise CheckpointError(f"{name!r} is not a best-step folder of this run: refused")
        directory = self.directory / name
        _verified_manifest(directory, self.identity)
        self.model.load_state_dict(_read_model(directory, self.model), strict=False)

    # ---- resume point

    def save(self, optimizer: torch.optim.Optimizer, scheduler: Any, scaler: torch.amp.GradScaler,
             progress: dict, best_dir: str | None) -> None:
        """Replace `last` with the full training state and the loop's `progress` (plain values), then drop
        best-step dirs other than `best_dir` (the one `save_best` returned for the best so far)."""
        state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "scaler": scaler.state_dict(), "rng": rng_state(), "progress": progress, "best_dir": best_dir}
        buffer = io.BytesIO()
        torch.save(state, buffer)
        _write(self.last_dir, {"identity": self.identity, "step": progress["step"], "record": self.record},
               {MODEL_FILE: lambda path: save_model(self.model, str(path)),
                STATE_FILE: lambda path: path.write_bytes(buffer.getvalue())})
        self._remove_unreferenced_best(best_dir)

    def restore(self, optimizer: torch.optim.Optimizer, scheduler: Any, scaler: torch.amp.GradScaler) -> dict | None:
        """Load `last` into the model, optimizer, scheduler, scaler and RNGs and return its `progress`; None if
        there is no checkpoint. Everything is read and checked before the first object is changed."""
        if not self.exists():
            try:
                claim_folder(self.last_dir, MANIFEST, "format_version")  # a `last` that is not a checkpoint stays
            except FolderRefused as e:
                raise CheckpointError(f"{e} (it is where this run's checkpoint goes: move it away, or pass --fresh "
                                      "to discard this run's checkpoint folder)") from e
            return None
        directory = self.last_dir
        _verified_manifest(directory, self.identity)
        tensors = _read_model(directory, self.model)
        try:
            state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
        except Exception as e:  # weights_only refuses anything but tensors and plain containers
            raise CheckpointError(f"checkpoint {directory}: {STATE_FILE} is unreadable "
                                  f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); pass --fresh") from e
        _check_optimizer_fits(optimizer, state["optimizer"], directory)
        best_dir = state["best_dir"]
        if best_dir is not None:
            if not isinstance(best_dir, str) or not BEST_DIR.fullmatch(best_dir):
                raise CheckpointError(f"checkpoint {directory} names {best_dir!r} as its best weights, which is not "
                                      "a best-step folder of this run: refused; pass --fresh")
            _verified_manifest(self.directory / best_dir, self.identity)
        self.model.load_state_dict(tensors, strict=False)  # completeness checked in _read_model
        groups = optimizer.param_groups
        optimizer.load_state_dict(state["optimizer"])
        for kept, loaded in zip(groups, optimizer.param_groups):  # load_state_dict makes new group dicts;
            kept.update(loaded)  # keep the old ones, so whoever holds a group (diagnostics) sees restored values
        optimizer.param_groups = groups
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])  # a disabled scaler ignores it
        set_rng_state(state["rng"])
        self._remove_unreferenced_best(best_dir)
        return state["progress"]

    def _remove_unreferenced_best(self, keep: str | None) -> None:
        """A best-step dir newer than `last` (killed in between) or superseded is not part of any resume."""
        for path in self.directory.glob("best-step*"):
            if BEST_DIR.fullmatch(path.name) and path.name != keep and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
