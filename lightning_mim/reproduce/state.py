"""`state.json`, the record of every stage's runs, and the fingerprints that decide whether a stage must run."""
from __future__ import annotations

import fcntl
import hashlib
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from lightning_mim.reproduce.plan import Stage
from lightning_mim.reproduce.presets import shown


class State:
    """`state.json`: per stage key and fingerprint, the status of its last attempt (running, done, failed), its log,
    its attempts and their summed wall-clock seconds. Every fingerprint keeps its own record, so a changed
    configuration that fails, or is reverted, leaves the record of the finished one as it was. Each change is read,
    made and written under a lock, so rows running at once, and a `reproduce` and a `compare` sharing the folder,
    keep each other's records."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def stages(self) -> dict[str, dict[str, dict]]:
        return json.loads(self.path.read_text()) if self.path.is_file() else {}

    @contextmanager
    def update(self) -> Iterator[dict[str, dict[str, dict]]]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # flock locks an open file: each update opens its own, so threads of this process wait for each other too
        with self.path.with_suffix(".lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            stages = self.stages
            yield stages
            partial = self.path.with_suffix(".json.partial")
            partial.write_text(json.dumps(stages, indent=1, sort_keys=True) + "\n")
            partial.replace(self.path)

    def get(self, key: str, fingerprint: str) -> dict | None:
        return self.stages.get(key, {}).get(fingerprint)

    def done(self, key: str, fingerprint: str) -> bool:
        record = self.get(key, fingerprint)
        return record is not None and record["status"] == "done"

    def start(self, stage: Stage) -> None:
        with self.update() as stages:
            previous = stages.get(stage.key, {}).get(stage.fingerprint) or {"attempts": 0, "seconds": 0.0}
            stages.setdefault(stage.key, {})[stage.fingerprint] = {
                "status": "running", "log": shown(stage.log), "attempts": previous["attempts"] + 1,
                "seconds": previous["seconds"]}

    def finish(self, stage: Stage, status: str, seconds: float) -> None:
        with self.update() as stages:
            record = stages[stage.key][stage.fingerprint]
            record["status"] = status
            record["seconds"] += seconds

    def record(self, key: str, fingerprint: str) -> None:
        """An in-process stage (logging to TensorBoard) as done."""
        with self.update() as stages:
            stages.setdefault(key, {})[fingerprint] = {"status": "done", "attempts": 1, "seconds": 0.0}

    def seconds(self, stage: Stage) -> float:
        return self.stages[stage.key][stage.fingerprint]["seconds"]


def fingerprint(words: Sequence[str], *upstream: str) -> str:
    """sha1 (10 hex digits) of a stage's arguments, a configuration file counted by its content (so the same
    stage launched from another folder keeps its fingerprint), and of the fingerprints it depends on."""
    parts = [f"file:{hashlib.sha1(Path(word).read_bytes()).hexdigest()}"
             if word.endswith(".yaml") and Path(word).is_file() else word for word in words]
    return hashlib.sha1(json.dumps([parts, list(upstream)]).encode()).hexdigest()[:10]
