"""Resumable runs: the merged statistics and the position in the corpus, checkpointed atomically.

A state directory holds `run.json` (what the run is: model, revision, weights, corpus, samples,
settings, world size; written once) and, per pass and process, `<pass>-rank<r>.pt` (the batch
plan, how many of this process's batches are merged, and every accumulator's state on the host).
A checkpoint is written to a temporary file and renamed, so a run killed at any instant leaves
either the previous checkpoint or the new one, never half of one. Resuming loads the state into
fresh accumulators and skips the batches it covers; statistics are monoids, so the result equals
an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from maxact_card.documents import atomic_write_text
from maxact_card.errors import UsageError

STATE_FORMAT = 1
RUN_FILE = "run.json"


@dataclass
class PassState:
    """One pass's checkpoint: its batch plan, how many of this process's batches are in, the state."""

    plan: list[list[int]]
    done: int
    accumulators: dict[str, dict[str, torch.Tensor]]
    unreadable: dict[str, str]
    wall_time_s: float


def fingerprint_digest(values: list[Any]) -> str:
    """A short stable digest of JSON-able values (e.g. the selected sample ids)."""
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


class StateDir:
    """A run's state directory; refuses one that belongs to a different run."""

    def __init__(self, directory: Path, fingerprint: dict[str, Any], *, resume: bool, rank: int = 0) -> None:
        self.directory = directory
        self.fingerprint = _flatten(dict(fingerprint, state_format=STATE_FORMAT))
        self.rank = rank
        self.resume = resume
        self._check_or_create()

    def _check_or_create(self) -> None:
        run_file = self.directory / RUN_FILE
        if self.directory.exists() and not self.directory.is_dir():
            raise UsageError(f"--state-dir {self.directory} is a file", hint="pass a directory path")
        if run_file.exists():
            try:
                saved = json.loads(run_file.read_text(encoding="utf-8"))
            except (OSError, ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                saved = None
            if not isinstance(saved, dict):
                raise UsageError(f"{run_file} is not a maxact-card state file",
                                 hint="pass an empty or new --state-dir") from None
            if not self.resume:
                raise UsageError(f"--state-dir {self.directory} already holds a run",
                                 hint="pass --resume to continue it, or choose a new --state-dir")
            # in the fingerprint's own order: model before corpus before settings
            keys = list(self.fingerprint) + [k for k in saved if k not in self.fingerprint]
            differ = [k for k in keys if saved.get(k) != self.fingerprint.get(k)]
            if differ:
                key = differ[0]
                raise UsageError(
                    f"--state-dir {self.directory} holds a run with a different {key} "
                    f"({_short(saved.get(key))}, now {_short(self.fingerprint.get(key))})",
                    hint="resume with the same model, revision, corpus and settings, or choose a new --state-dir",
                )
            return
        if self.directory.exists() and any(self.directory.iterdir()) and self.rank == 0:
            raise UsageError(f"--state-dir {self.directory} is not empty and holds no maxact-card run",
                             hint="pass an empty or new directory")
        if self.rank == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            atomic_write_text(run_file, json.dumps(self.fingerprint, indent=1) + "\n")

    def _path(self, name: str) -> Path:
        return self.directory / f"{name}-rank{self.rank}.pt"

    def load(self, name: str) -> PassState | None:
        """The last checkpoint of pass `name` for this process, or None when there is none."""
        if not self.resume:
            return None
        path = self._path(name)
        if not path.exists():
            return None
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same answer
            raise UsageError(f"cannot read the checkpoint {path}: {type(exc).__name__}",
                             hint="remove it to restart that pass, or choose a new --state-dir") from None
        return PassState(raw["plan"], int(raw["done"]), raw["accumulators"], dict(raw["unreadable"]),
                         float(raw["wall_time_s"]))

    def save(self, name: str, state: PassState) -> None:
        """Write pass `name`'s checkpoint atomically (temporary file, fsync, rename)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self._path(name)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=self.directory)
        try:
            with os.fdopen(fd, "wb") as fh:
                torch.save({"plan": state.plan, "done": state.done, "accumulators": state.accumulators,
                            "unreadable": state.unreadable, "wall_time_s": state.wall_time_s}, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as dotted keys, so a refusal names the one setting that differs."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."
