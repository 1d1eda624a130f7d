"""The run's output directory, local or an fsspec URL, and what gets written into it.

Everything is written to a local directory first (the output directory itself, or a staging
folder for URLs) and published file by file; checkpoints are complete before they become
visible: a local one is renamed into place, a remote one is uploaded and only then named in
the ``latest`` marker.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from typing import Optional

import torch

from .config import UsageError

FINISHED = "train_summary.json"  # written last: its presence means the run finished
LATEST = "latest"
_CKPT = re.compile(r"^checkpoint-(\d+)$")


class RunDir:
    def __init__(self, url: str, tmp_dir: Optional[str] = None):
        import fsspec

        self.url = url
        self.fs, self.root = fsspec.core.url_to_fs(url)
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        self.remote = "file" not in protocols and "local" not in protocols
        if self.remote:
            self.local = tempfile.mkdtemp(prefix="minilora-out-", dir=tmp_dir)
        else:
            self.local = os.path.abspath(self.root)
            try:
                os.makedirs(self.local, exist_ok=True)
                probe = os.path.join(self.local, ".minilora-write-test")
                with open(probe, "w") as f:
                    f.write("ok")
                os.remove(probe)
            except OSError as e:
                raise UsageError(f"--output_dir {url} is not writable ({e.strerror}); pick another directory") from None

    def path(self, *parts: str) -> str:
        return os.path.join(self.local, *parts)

    def exists(self, rel: str) -> bool:
        if self.remote:
            return self.fs.exists(f"{self.root.rstrip('/')}/{rel}")
        return os.path.exists(self.path(rel))

    def publish(self, rel: str) -> None:
        """Upload ``rel`` (file or folder) from the local side, when the output is remote."""
        if not self.remote:
            return
        source = self.path(rel)
        target = f"{self.root.rstrip('/')}/{rel}"
        if os.path.isdir(source):
            self.fs.put(source.rstrip("/") + "/", target + "/", recursive=True)
        else:
            self.fs.put(source, target)

    def write_json(self, rel: str, value) -> None:
        tmp = self.path(rel + ".tmp")
        with open(tmp, "w") as f:
            json.dump(value, f, indent=2, sort_keys=True, default=str)
            f.write("\n")
        os.replace(tmp, self.path(rel))
        self.publish(rel)

    # -- checkpoints ---------------------------------------------------------------------------

    def begin_checkpoint(self, update: int) -> str:
        """A fresh temporary folder to fill; ``commit_checkpoint`` makes it visible."""
        tmp = self.path(f".checkpoint-{update}.partial")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        return tmp

    def commit_checkpoint(self, tmp: str, update: int, keep: int) -> str:
        name = f"checkpoint-{update}"
        final = self.path(name)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)  # atomic: a checkpoint folder is complete or absent
        if self.remote:
            self.publish(name)
        self._write_latest(name)
        if keep > 0:
            for old in self.checkpoints()[:-keep]:
                self._remove(old)
        return final

    def _write_latest(self, name: str) -> None:
        tmp = self.path(LATEST + ".tmp")
        with open(tmp, "w") as f:
            f.write(name + "\n")
        os.replace(tmp, self.path(LATEST))
        self.publish(LATEST)

    def checkpoints(self) -> list[str]:
        """Complete checkpoint folder names, oldest first."""
        if self.remote:
            names = [os.path.basename(p.rstrip("/")) for p in self.fs.ls(self.root, detail=False)] if self.fs.exists(self.root) else []
        else:
            names = os.listdir(self.local)
        found = [(int(m.group(1)), n) for n in names if (m := _CKPT.match(n))]
        return [n for _, n in sorted(found)]

    def _remove(self, name: str) -> None:
        shutil.rmtree(self.path(name), ignore_errors=True)
        if self.remote and self.fs.exists(f"{self.root.rstrip('/')}/{name}"):
            self.fs.rm(f"{self.root.rstrip('/')}/{name}", recursive=True)

    def resolve_checkpoint(self, spec: str) -> str:
        """A local folder holding the checkpoint that ``--resume_from_checkpoint spec`` names."""
        if spec == "latest":
            names = self.checkpoints()
            if not names:
                raise UsageError(f"--resume_from_checkpoint latest: no checkpoint in {self.url}")
            spec = names[-1]
            if self.remote:
                return self._download(f"{self.root.rstrip('/')}/{spec}")
            return self.path(spec)
        import fsspec

        fs, root = fsspec.core.url_to_fs(spec)
        if not fs.exists(root) and not os.path.isabs(spec) and self.exists(spec):
            return self.path(spec) if not self.remote else self._download(f"{self.root.rstrip('/')}/{spec}")
        if not fs.exists(root):
            raise UsageError(f"--resume_from_checkpoint {spec}: no such checkpoint")
        if fs is self.fs and not self.remote or "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
            if not os.path.exists(os.path.join(root, "trainer_state.json")):
                raise UsageError(f"--resume_from_checkpoint {spec}: not a checkpoint folder (no trainer_state.json)")
            return root
        return self._download(spec)

    def _download(self, url: str) -> str:
        import fsspec

        fs, root = fsspec.core.url_to_fs(url)
        local = tempfile.mkdtemp(prefix="minilora-resume-")
        fs.get(root.rstrip("/") + "/", local + "/", recursive=True)
        return local


def save_tensors_safely(obj, path: str) -> None:
    """torch.save for state that only holds tensors and plain Python values, so it loads with
    ``torch.load(weights_only=True)``: no code can run when a checkpoint is read back."""
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_tensors_safely(path: str):
    return torch.load(path, map_location="cpu", weights_only=True)
