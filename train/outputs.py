"""The run's output directory, local or an fsspec URL, and what gets written into it.

Everything is written to a local directory first (the output directory itself, or a staging
folder for URLs) and published file by file; checkpoints are complete before they become
visible: a local one is renamed into place, a remote one is uploaded and only then named in
the ``latest`` marker.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import tempfile
from typing import Optional

import torch

from .config import UsageError

FINISHED = "train_summary.json"  # written last: its presence means the run finished
LATEST = "latest"
LOCK = ".minilora-train.lock"  # exists while a run writes into the directory (see RunDir.lock)
# What a run measured of its base before training, kept beside its checkpoints: a resumed run
# compares and trains against the same base answers, whatever the base has become since.
PROBE_FILE = "chat_probe.json"  # the base's own chat answers and its score of them (chat drift)
SELF_ANSWERS_FILE = "self_distillation.json"  # the base's answers the forgetting guard trains on
MC_BASE_FILE = "medical_mc_base.json"  # the base's medical multiple-choice answers
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
            self.created = self.local
        else:
            self.local = os.path.abspath(self.root)
            self.created = _first_missing(self.local)  # what discard_if_unused may remove again
            try:
                os.makedirs(self.local, exist_ok=True)
                probe = os.path.join(self.local, f".minilora-write-test-{os.getpid()}")  # one per process (torchrun)
                with open(probe, "w") as f:
                    f.write("ok")
                os.remove(probe)
            except OSError as e:
                self.discard_if_unused()
                raise UsageError(f"--output_dir {url} is not writable ({e.strerror}); pick another directory") from None

    def lock(self) -> None:
        """Hold the (local) output directory for this process until ``unlock`` or its exit; a
        second run into the same directory gets a UsageError instead of silently interleaving
        its checkpoints and results with this one's.

        An flock on ``.minilora-train.lock``: the kernel drops it when the holder dies, however
        it dies, so a lock file left by a killed run is taken over, never waited for. Remote
        (fsspec) outputs have no such lock; neither does a system without fcntl (Windows)."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return
        if self.remote or getattr(self, "_lock_fd", None) is not None:
            return
        path = self.path(LOCK)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise UsageError(f"--output_dir {self.url} is in use by another minilora-train run ({holder}); wait "
                                 "for it to finish or choose another directory") from None
            try:  # the holder may have released and removed the file between our open and flock
                current = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if current:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        self._lock_fd = fd

    def unlock(self) -> None:
        """Release ``lock`` (a no-op when not held); the lock file goes with it."""
        fd = getattr(self, "_lock_fd", None)
        if fd is None:
            return
        self._lock_fd = None
        try:
            os.remove(self.path(LOCK))  # removed while still locked: a waiting run re-checks the inode
        except FileNotFoundError:
            pass
        os.close(fd)

    def discard_if_unused(self) -> None:
        """Remove the folders this RunDir created if nothing was written into them: a run
        refused for bad input leaves no trace."""
        if self.created and not any(files for _, _, files in os.walk(self.created)):
            shutil.rmtree(self.created, ignore_errors=True)

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

    def read_json(self, rel: str, fits, holds: str):
        """What the run's first start wrote into ``rel`` for its resumes (the base's chat answers,
        its self-distillation answers), if ``fits(value)``; a file that is damaged or of another
        shape is a UsageError saying what it should hold (``holds``), not a traceback later."""
        path = self.path(rel)
        try:
            with open(path, encoding="utf-8") as f:
                value = json.load(f)
            problem = None if fits(value) else f"it does not hold {holds}"
        except (ValueError, RecursionError) as e:  # not JSON, or not UTF-8
            problem = f"not JSON: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        if problem:
            raise UsageError(f"{path} is damaged ({problem}); resuming needs it as the run's first start wrote it: "
                             "restore it, or start the run over with --overwrite_output_dir")
        return value

    def write_json(self, rel: str, value) -> None:
        _write_aside(self.path(rel), json.dumps(value, indent=2, sort_keys=True, default=str) + "\n")
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
        if os.path.exists(final):  # a resumed run saving the same update again
            shutil.rmtree(final)
        os.replace(tmp, final)  # atomic: a checkpoint folder is complete or absent
        if self.remote:  # an upload is not atomic: only a verified one gets named in `latest`
            self.publish(name)
            self._verify_upload(name)
        self._write_latest(name)
        if keep > 0:
            for old in self.checkpoints()[:-keep]:
                self._remove(old)
        return final

    def clear_previous_run(self) -> None:
        """Remove an earlier run's checkpoints, `latest` marker and finished marker (a run started
        over with --overwrite_output_dir), so a later resume can only find this run's."""
        for name in self.checkpoints():
            self._remove(name)
        for name in (LATEST, FINISHED):
            if os.path.exists(self.path(name)):
                os.remove(self.path(name))
            if self.remote and self.exists(name):
                self.fs.rm(f"{self.root.rstrip('/')}/{name}")

    def _verify_upload(self, name: str) -> None:
        """Every file of local folder ``name`` is in the remote copy at its full size."""
        for folder, _, files in os.walk(self.path(name)):
            for file in files:
                rel = os.path.relpath(os.path.join(folder, file), self.local).replace(os.sep, "/")
                remote = f"{self.root.rstrip('/')}/{rel}"
                if not self.fs.exists(remote) or self.fs.size(remote) != os.path.getsize(self.path(rel)):
                    raise OSError(f"uploading {rel} to {self.url} did not complete; `latest` still names the "
                                  "previous checkpoint")

    def _write_latest(self, name: str) -> None:
        _write_aside(self.path(LATEST), name + "\n")
        self.publish(LATEST)

    def listing(self) -> list[str]:
        """The names directly in the output directory."""
        if not self.remote:
            return os.listdir(self.local)
        if not self.fs.exists(self.root):
            return []
        return [os.path.basename(p.rstrip("/")) for p in self.fs.ls(self.root, detail=False)]

    def checkpoints(self) -> list[str]:
        """Complete checkpoint folder names, oldest first."""
        found = [(int(m.group(1)), n) for n in self.listing() if (m := _CKPT.match(n))]
        return [n for _, n in sorted(found)]

    def foreign_entries(self) -> list[str]:
        """What the directory holds when no minilora-train run wrote there (else nothing): the
        visible entries of a folder with none of the files a run writes before anything else
        (its settings, the base's chat answers kept for a resume, checkpoints)."""
        names = sorted(n for n in self.listing() if not n.startswith("."))
        ours = {"train_config.json", PROBE_FILE, SELF_ANSWERS_FILE, MC_BASE_FILE, LATEST, FINISHED}
        return [] if ours & set(names) or self.checkpoints() else names

    def _remove(self, name: str) -> None:
        shutil.rmtree(self.path(name), ignore_errors=True)
        if self.remote and self.fs.exists(f"{self.root.rstrip('/')}/{name}"):
            self.fs.rm(f"{self.root.rstrip('/')}/{name}", recursive=True)

    def resolve_checkpoint(self, spec: str) -> str:
        """A local folder holding the checkpoint that ``--resume_from_checkpoint spec`` names."""
        if spec == "latest":
            # Locally a checkpoint folder exists only once complete (renamed into place); remotely
            # a folder may be a cut-off upload, so only the one the `latest` marker names counts.
            names = [self._read_latest()] if self.remote else self.checkpoints()
            if not names or not names[-1]:
                raise UsageError(f"--resume_from_checkpoint latest: no checkpoint in {self.url}")
            spec = names[-1]
            if self.remote:
                return self._download(f"{self.root.rstrip('/')}/{spec}", self.fs)
            return self.path(spec)
        import fsspec

        fs, root = fsspec.core.url_to_fs(spec)
        if not fs.exists(root) and not os.path.isabs(spec) and self.exists(spec):
            return self.path(spec) if not self.remote else self._download(f"{self.root.rstrip('/')}/{spec}", self.fs)
        if not fs.exists(root):
            raise UsageError(f"--resume_from_checkpoint {spec}: no such checkpoint")
        if fs is self.fs and not self.remote or "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
            if not os.path.exists(os.path.join(root, "trainer_state.json")):
                raise UsageError(f"--resume_from_checkpoint {spec}: not a checkpoint folder (no trainer_state.json)")
            return root
        return self._download(spec)

    def _read_latest(self) -> Optional[str]:
        marker = f"{self.root.rstrip('/')}/{LATEST}"
        if not self.fs.exists(marker):
            return None
        name = self.fs.cat_file(marker).decode().strip()
        return name if _CKPT.match(name) else None

    def _download(self, url: str, fs=None) -> str:
        """A local copy of folder ``url`` (a path on ``fs`` when given: the output's own store)."""
        import fsspec

        fs, root = (fs, url) if fs is not None else fsspec.core.url_to_fs(url)
        local = tempfile.mkdtemp(prefix="minilora-resume-")
        fs.get(root.rstrip("/") + "/", local + "/", recursive=True)
        return local


def check_output_dir_apart(args) -> None:
    """UsageError when --output_dir would write into a folder the run reads, before anything is
    written:

    - the base model's (or tokenizer's) folder itself: the adapter files would sit next to the
      base's, and transformers' ``from_pretrained`` of that folder then loads base + adapter,
      silently; the tokenizer files would be rewritten. An output folder *inside* the base's
      folder is allowed: ``from_pretrained`` reads only the folder's own files, so the base loads
      as before.
    - a local data folder (--dataset_dir, --general_eval_dataset, --replay_general_dataset) or
      a folder inside it: data folders are read recursively, so the run's own metrics.jsonl,
      configs, report.md and tokenizer files would become records of the next run or resume.
    - a folder holding one of those as a ``checkpoint-N`` entry: the run prunes, clears
      (--overwrite_output_dir) and resumes (``latest``) its checkpoints by that name.
    Object-store outputs (``gs://``) are not compared."""
    if "://" in args.output_dir and not args.output_dir.startswith("file://"):
        return
    out = os.path.realpath(os.path.expanduser(args.output_dir.removeprefix("file://")))
    read = [("--model_name", args.model_name, False), ("--tokenizer_name_or_path", args.tokenizer_name_or_path, False)]
    read += [(f"--{name}", getattr(args, name), True)
             for name in ("dataset_dir", "general_eval_dataset", "replay_general_dataset")]
    for flag, name, is_data in read:
        folder = os.path.expanduser(name) if isinstance(name, str) and "://" not in name else None
        if folder is None or not os.path.isdir(folder):
            continue
        folder = os.path.realpath(folder)
        if out == folder or is_data and out.startswith(folder + os.sep):
            what = ("the data folder" if is_data else "the folder of the base model") + f" ({flag} {name})"
            why = ("data folders are read with every file under them, so the run's own metrics, configs and "
                   "report would become training records" if is_data else
                   "the adapter would sit next to the base's weights, and from_pretrained of that folder would "
                   "then load the base with the adapter applied")
            where = "is" if out == folder else "is inside"
            raise UsageError(f"--output_dir {args.output_dir} {where} {what}: {why}; choose another --output_dir")
        if os.path.dirname(folder) == out and _CKPT.match(os.path.basename(folder)):
            raise UsageError(f"--output_dir {args.output_dir} holds {flag} {name} as {os.path.basename(folder)}, a "
                             "name this run gives its own checkpoints (it removes old ones, and --overwrite_output_dir "
                             "all of them); choose another --output_dir")


# Settings that give a checkpoint its meaning: the base as the run loads it (weights, tokenizer,
# quantization, dtype) and the adapter's shape, which its weights fit; the data, its formatting and
# window boundaries, and the batch layout its position (epoch, micro-batch) counts in; and what its
# recorded history was measured on (the base's evaluation is kept from the first start and compared
# with the final one). Learning rate, steps, warm-up, dropout, logging and saving may change on
# resume (lowering the learning rate after a divergence is the advice the run itself gives), and
# so may the device: its numbers differ only by rounding.
RESUME_SETTINGS = ("model_name", "tokenizer_name_or_path", "quantize", "quantize_embeddings", "bf16", "use_lora",
                   "dataset_dir", "dataset_format", "chat_template", "max_seq_length", "gradient_accumulation_steps",
                   "seed", "validation_split_percentage", "train_on_responses_only", "streaming_data",
                   "replay_general", "replay_general_dataset", "replay_self", "max_eval_samples",
                   "general_eval_dataset")
LORA_RESUME_SETTINGS = ("lora_r", "lora_alpha", "lora_target_modules", "lora_bias", "use_rslora", "lora_top_layers")
STREAMING_RESUME_SETTINGS = ("shuffle_buffer_size",)  # the order a stream is read in
LOCAL_PATHS = ("model_name", "tokenizer_name_or_path", "dataset_dir", "replay_general_dataset", "general_eval_dataset")


def resume_settings(args, devices: int = 1) -> dict:
    """The settings a checkpoint records so that a resume can check them (see check_resume_settings).
    ``devices``: how many data-parallel devices share a micro-batch (``global_batch`` is
    --per_device_train_batch_size times that: the windows one micro-batch of the position takes)."""
    names = (RESUME_SETTINGS + (LORA_RESUME_SETTINGS if args.use_lora else ())
             + (STREAMING_RESUME_SETTINGS if args.streaming_data else ()))
    settings = {name: getattr(args, name) for name in names}
    for name in LOCAL_PATHS:  # one local folder, however it is spelt
        value = settings[name]
        if isinstance(value, str) and os.path.exists(value):
            settings[name] = os.path.realpath(value)
    if isinstance(args.dataset_dir, str):  # the reader used, given or inferred: json for .jsonl, jsonl or none
        from .data import reader_of

        settings["dataset_format"] = reader_of(args.dataset_dir, args.dataset_format) or args.dataset_format
    if args.use_lora and settings["lora_alpha"] is None:
        settings["lora_alpha"] = 2 * args.lora_r  # the default, spelt out: 16 given is 16 defaulted
    if isinstance(settings.get("lora_alpha"), (int, float)):
        settings["lora_alpha"] = float(settings["lora_alpha"])
    settings["per_device_train_batch_size"] = args.per_device_train_batch_size
    settings["global_batch"] = args.per_device_train_batch_size * devices
    return settings


def check_resume_settings(saved, args, path: str, devices: int = 1) -> None:
    """UsageError naming the first setting in which this run differs from the checkpoint at
    ``path`` (a checkpoint from before settings were recorded is not checked, nor settings a
    checkpoint predates). The batch is compared over all devices: a checkpoint made with 8
    windows per device on 1 device resumes with 4 per device on 2."""
    if saved is None:
        return
    if not isinstance(saved, dict):
        raise UsageError(f"--resume_from_checkpoint {path}: trainer_state.json is damaged (settings is not a mapping)")
    now = resume_settings(args, devices)
    if "global_batch" in saved:
        now.pop("per_device_train_batch_size")
    advice = ("resuming would change what the checkpoint means (other weights or another position in other data). "
              "Resume {}, or start a new run in another --output_dir")
    for name, value in now.items():
        if name not in saved or saved[name] == value:
            continue
        if name == "global_batch" and saved[name] == saved.get("per_device_train_batch_size", 0) * devices:
            name, value = "per_device_train_batch_size", args.per_device_train_batch_size  # as many devices as then
        elif name == "global_batch":
            per_device, rest = divmod(saved[name], devices)
            fix = (f"with --per_device_train_batch_size {per_device} on these {devices} device(s)"
                   if not rest and per_device else f"with {saved[name]} windows per micro-batch over all devices")
            raise UsageError(f"--resume_from_checkpoint {path}: the checkpoint was made with micro-batches of "
                             f"{saved[name]} windows over all devices and this run's take {value} "
                             f"(--per_device_train_batch_size {args.per_device_train_batch_size} on {devices} "
                             f"device(s)); its position counts micro-batches, so " + advice.format(fix))
        fix = f"without --{name}" if saved[name] is None else f"with {_as_flag(name, saved[name])}"
        raise UsageError(f"--resume_from_checkpoint {path}: the checkpoint was made with {_as_flag(name, saved[name])} "
                         f"and this run has {_as_flag(name, value)}; " + advice.format(fix))


def _as_flag(name: str, value) -> str:
    """A setting as the command line gives it: --bf16, --no-bf16, no --quantize, --lora_r 8."""
    if isinstance(value, bool):
        return f"--{name}" if value else f"--no-{name}"
    if value is None:
        return f"no --{name}"
    if isinstance(value, list):
        return f"--{name} {' '.join(map(str, value))}"
    return f"--{name} {value}"


def is_token_lists(value, count: Optional[int] = None) -> bool:
    """Whether ``value`` is a list (of ``count`` items) of lists of token ids (ints that are not bools)."""
    return isinstance(value, list) and (count is None or len(value) == count) and all(
        isinstance(ids, list) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids)
        for ids in value)


def save_tensors_safely(obj, path: str) -> None:
    """torch.save for state that only holds tensors and plain Python values, so it loads with
    ``torch.load(weights_only=True)``: no code can run when a checkpoint is read back."""
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_tensors_safely(path: str):
    """What save_tensors_safely wrote. Anything else (a planted pickle that would run code, a
    truncated file) is refused with a UsageError, never executed."""
    if not os.path.isfile(path):
        raise UsageError(f"{path} is missing; the checkpoint is incomplete, resume from another one")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle.UnpicklingError for a disallowed object, RuntimeError for a damaged zip
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"{path} was not loaded: it is damaged or holds more than tensors, and loading "
                         f"arbitrary pickle could run code ({first}); resume from another checkpoint") from None


def load_safetensors(path: str) -> dict[str, torch.Tensor]:
    """A safetensors file (no code can run reading one); missing or damaged: UsageError."""
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise UsageError(f"{path} is missing; the checkpoint is incomplete, resume from another one")
    try:
        tensors = load_file(path)
    except Exception as e:  # safetensors' own error types for truncated or corrupt files
        raise UsageError(f"{path} is truncated or corrupted and cannot be read ({e}); resume from another "
                         "checkpoint") from None
    for key, tensor in tensors.items():  # a diverged model must not be resumed as if it were good
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise UsageError(f"{path}: {key} holds non-finite values (NaN or inf); this checkpoint comes from a "
                             "diverged run: resume from an earlier checkpoint")
    return tensors


def _write_aside(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file renamed into place; if writing fails
    (a full disk), the temporary file is removed and ``path`` keeps its previous content."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def _first_missing(path: str) -> Optional[str]:
    """The outermost folder of ``path`` that does not exist yet (None when it all exists)."""
    missing = None
    while path and not os.path.exists(path):
        missing, path = path, os.path.dirname(path)
        if path == missing:
            break
    return missing
