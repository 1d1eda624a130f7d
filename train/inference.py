"""Inference with trained adapters: load a base model plus an adapter, generate text, and serve
several adapters from one base model (switching, or a different adapter per batch row).

    model, tokenizer = load_lora_model("meta-llama/Llama-3.2-1B", "gs://bucket/lora-medical-adapter")
    print(generate_text(model, tokenizer, "The differential diagnosis of chest pain includes"))

Adapters are PEFT-format folders (``adapter_config.json`` + ``adapter_model.safetensors``), as
minilora and PEFT both write them; a local path or any fsspec URL (``gs://``, ``s3://``,
``memory://``) works. Command line: ``minilora-generate --help``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from typing import Iterator, Optional, Sequence, Union

import torch

import minilora
from minilora.save import CONFIG_NAME, PICKLE_NAME, WEIGHTS_NAME
from .base_model import adapter_defaults, resolve_base
from .command import quiet_start, require_app_packages, run_command
from .device import inference_device, move_model

# Files worth copying out of an adapter folder: the adapter itself and, if the training run saved
# one, its tokenizer (which then wins over the base model's: it may have added a pad token).
ADAPTER_FILES = (CONFIG_NAME, WEIGHTS_NAME, PICKLE_NAME)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")

Dtype = Union[torch.dtype, str, None]


# -- loading ------------------------------------------------------------------------------------

def load_lora_model(base_model_name: str, lora_adapter_path: Optional[str] = None, *, merge: bool = False,
                    device: Union[str, torch.device, None] = None, torch_dtype: Dtype = None,
                    token: Optional[str] = None):
    """(model, tokenizer): the base model (hub id or local folder) with the adapter at
    ``lora_adapter_path`` (local folder or fsspec URL) loaded and active, in eval mode.

    Args:
        merge: fold the adapter into the weights and drop the LoRA layers
            (``minilora.merge_and_unload``): a plain transformers model, as fast as the base.
        device: where the model lives; default CUDA when available, else CPU. ``"xla"`` works
            but generation recompiles as the sequence grows, so prefer CPU/GPU for inference.
        torch_dtype: e.g. ``torch.bfloat16`` or ``"bfloat16"``; default float32.
        token: Hugging Face token for gated models (e.g. Llama), passed to transformers only;
            without it transformers falls back to ``HF_TOKEN`` / the cached login.

    The tokenizer comes from the adapter folder when it holds one, else from the base model.
    """
    model = load_base_model(base_model_name, device=device, torch_dtype=torch_dtype, token=token)
    tokenizer = None
    if lora_adapter_path is not None:
        with local_adapter_dir(lora_adapter_path) as local:
            minilora.load_adapter(model, local)
            tokenizer = _tokenizer_in(local)
        if merge:
            minilora.merge_and_unload(model, safe=True)
    elif merge:
        raise ValueError("merge=True needs an adapter to merge; give lora_adapter_path")
    if tokenizer is None:
        tokenizer = load_tokenizer(base_model_name, token=token)
    return model, tokenizer


def load_base_model(name_or_path: str, *, device: Union[str, torch.device, None] = None,
                    torch_dtype: Dtype = None, token: Optional[str] = None):
    """A transformers causal LM from a hub id, a local folder or a .gguf file (converted once, cached:
    train/base_model.py), on ``device``, in eval mode."""
    from transformers import AutoModelForCausalLM

    name_or_path = resolve_base(name_or_path)
    dtype = _dtype(torch_dtype)
    model = AutoModelForCausalLM.from_pretrained(name_or_path, token=token, **({"dtype": dtype} if dtype else {}))
    return move_model(model, inference_device(device)).eval()


def load_tokenizer(name_or_path: str, *, token: Optional[str] = None):
    from transformers import AutoTokenizer

    return _with_pad_token(AutoTokenizer.from_pretrained(resolve_base(name_or_path), token=token))


def _tokenizer_in(folder: str):
    if any(os.path.isfile(os.path.join(folder, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
        return load_tokenizer(folder)
    return None


@contextlib.contextmanager
def local_adapter_dir(path: str) -> Iterator[str]:
    """A local folder holding the adapter at ``path``: ``path`` itself when it is local, else a
    temporary copy of its adapter and tokenizer files (fetched with fsspec, removed on exit)."""
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(path)
    except ImportError as e:  # e.g. gs:// without gcsfs
        raise ImportError(f"cannot open {path!r}: {e}. For gs:// install the gcs extra: "
                          "pip install 'minilora[gcs]'") from None
    if "file" in _protocols(fs):
        yield root
        return
    if not fs.isdir(root):
        raise minilora.AdapterLoadError(f"no adapter folder at {path!r} (expected a folder holding "
                                        f"{CONFIG_NAME} and {WEIGHTS_NAME})")
    present = {os.path.basename(p.rstrip("/")) for p in fs.ls(root, detail=False)}
    with tempfile.TemporaryDirectory(prefix="minilora-adapter-") as local:
        for name in sorted(present & set(ADAPTER_FILES + TOKENIZER_FILES)):
            fs.get(f"{root.rstrip('/')}/{name}", os.path.join(local, name))
        if CONFIG_NAME not in present:
            raise minilora.AdapterLoadError(f"{path!r} has no {CONFIG_NAME}; an adapter folder holds {CONFIG_NAME} "
                                            f"and {WEIGHTS_NAME} (found: {', '.join(sorted(present)) or 'nothing'})")
        yield local


def _protocols(fs) -> tuple:
    protocol = fs.protocol
    return protocol if isinstance(protocol, tuple) else (protocol,)


def _dtype(value: Dtype) -> Optional[torch.dtype]:
    if value is None or isinstance(value, torch.dtype):
        return value
    dtype = getattr(torch, str(value), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"torch_dtype={value!r} is not a torch dtype; use e.g. 'bfloat16', 'float16' or 'float32'")
    return dtype


def _with_pad_token(tokenizer):
    # Llama tokenizers ship without a pad token; batching needs one, and eos is the usual stand-in.
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def model_device(model) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def eval_mode(model):
    """Dropout off for the duration (greedy output and scores must not depend on the RNG); the
    model's train/eval mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


# -- generation ---------------------------------------------------------------------------------

def generate_text(model, tokenizer, prompt: str, max_new_tokens: int = 200, **options) -> str:
    """The continuation of ``prompt`` only (the prompt itself is not repeated), special tokens
    removed. Greedy unless ``options`` say otherwise (``do_sample=True, temperature=0.7,
    top_p=0.9``, or any other ``model.generate`` option); greedy output is deterministic."""
    return generate_texts(model, tokenizer, [prompt], max_new_tokens, **options)[0]


def generate_texts(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 200, *,
                   add_special_tokens: bool = True, **options) -> list[str]:
    """``generate_text`` for several prompts in one batch. Prompts are left-padded, so every
    row's continuation starts at the same column; with greedy decoding each row's text is the
    one it would get alone. ``add_special_tokens=False`` for prompts that carry their own (a chat
    template's output), which would otherwise start with a second BOS."""
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings; for one prompt use generate_text")
    tokenizer = _with_pad_token(tokenizer)
    input_ids, attention_mask = pad_rows([tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"] for p in prompts],
                                         tokenizer.pad_token_id,
                                         side="left", device=model_device(model))
    options.setdefault("do_sample", False)
    if not options["do_sample"]:
        # The model's generation_config may carry sampling defaults (Llama 3's does); clear them so
        # greedy decoding does not warn that they go unused.
        options.setdefault("temperature", None)
        options.setdefault("top_p", None)
        options.setdefault("top_k", None)
    with torch.inference_mode(), eval_mode(model):
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                                pad_token_id=tokenizer.pad_token_id, **options)
    new_tokens = output[:, input_ids.shape[1]:]  # (B, new) — all rows' prompts end at the same column
    return tokenizer.batch_decode(new_tokens, skip_special_tokens=True)


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int, *, side: str,
             device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B, longest) int64. ``side="left"`` right-aligns the
    rows (for generation: every row continues at the same column); ``"right"`` left-aligns them
    (for scoring: padding after a sequence cannot change a causal model's view of it)."""
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("every sequence must have at least one token")
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return ids.to(device), mask.to(device)


# -- several adapters on one base ---------------------------------------------------------------

class AdapterManager:
    """One base model, many adapters, without reloading or re-wrapping the base on every switch.

        manager = AdapterManager("meta-llama/Llama-3.2-1B")
        manager.load_adapter("cardiology", "./cardiology_lora")
        manager.load_adapter("oncology", "gs://bucket/oncology_lora")
        model = manager.switch_adapter("cardiology")     # a pointer switch, nothing reloads
        manager.generate_batch(["...", "...", "..."], ["cardiology", "oncology", None])

    The adapter loaded last is the active one until ``switch_adapter`` picks another. A batch
    whose rows use different adapters runs every row in one product per layer, from adapters
    stacked on the device (minilora.batched). ``device_adapters``: a device budget, in adapters:
    at most that many sit on the device at once (least recently used out first); on a GPU the
    others wait on the host, and only the one ``switch_adapter`` picked joins the base there.
    """

    def __init__(self, base_model_name: str, *, device: Union[str, torch.device, None] = None,
                 torch_dtype: Dtype = None, token: Optional[str] = None, device_adapters: Optional[int] = None):
        model = load_base_model(base_model_name, device=device, torch_dtype=torch_dtype, token=token)
        self._attach(model, load_tokenizer(base_model_name, token=token), device_adapters)

    @classmethod
    def from_model(cls, model, tokenizer, *, device_adapters: Optional[int] = None) -> "AdapterManager":
        """Manage an already loaded transformers model (it is changed in place as adapters load)."""
        manager = cls.__new__(cls)
        manager._attach(model, tokenizer, device_adapters)
        return manager

    def _attach(self, model, tokenizer, device_adapters: Optional[int]) -> None:
        if any(m.merged for _, m in minilora.lora_modules(model)):
            raise ValueError("the model has a merged adapter; an AdapterManager needs unmerged adapters "
                             "(call minilora.unmerge(model) first)")
        if device_adapters is not None and device_adapters < 1:
            raise ValueError(f"device_adapters={device_adapters}: give the number of adapters the device may hold "
                             "at once (at least 1), or None for all of them")
        self.model, self.tokenizer = model, _with_pad_token(tokenizer)
        self.device_adapters, self._bank, self._on_device = device_adapters, None, None

    @property
    def adapters(self) -> list[str]:
        """Names of the loaded adapters, in load order."""
        return minilora.adapter_names(self.model)

    @property
    def active_adapter(self) -> Optional[str]:
        return minilora.active_adapter(self.model)

    @property
    def bank(self) -> Optional[minilora.AdapterBank]:
        """The adapter bank holding the device budget (None without one: mixed batches use the
        model's own, with a slot for every adapter)."""
        if self.device_adapters is None or not self.adapters:
            return None
        self._bank = minilora.AdapterBank.for_model(self.model, self._bank or minilora.AdapterBank(
            self.model, capacity=self.device_adapters))
        return self._bank

    def _offloads(self) -> bool:
        """With a device budget on a GPU, adapters wait on the host until a batch needs them."""
        return self.device_adapters is not None and model_device(self.model).type != "cpu"

    def load_adapter(self, name: str, path: str) -> None:
        """Load the adapter at ``path`` (local folder or fsspec URL) under ``name``; it becomes active."""
        if name in self.adapters:
            raise ValueError(f"an adapter named {name!r} is already loaded; unload_adapter({name!r}) first "
                             "or pick another name")
        with local_adapter_dir(path) as local:
            minilora.load_adapter(self.model, local, adapter_name=name)
        if self._offloads():
            self.bank.offload(name)
            self._on_device = None

    def switch_adapter(self, name: str):
        """Make ``name`` the active adapter and return the model (the same object every time)."""
        self._check([name])
        if self._offloads() and self._on_device != name:  # the model runs it alone: beside the base
            if self._on_device in self.adapters:
                self.bank.offload(self._on_device)
            self.bank.restore(name)
            self._on_device = name
        minilora.set_adapter(self.model, name)
        return self.model

    def unload_adapter(self, name: str) -> None:
        """Remove adapter ``name``; if it was active, the model runs as the base until the next switch."""
        self._check([name])
        minilora.delete_adapter(self.model, name)

    def generate(self, name: Optional[str], prompt: str, max_new_tokens: int = 200, **options) -> str:
        """``generate_text`` with adapter ``name`` (``None``: the base model); the active adapter
        is left as it was."""
        return self.generate_batch([prompt], [name], max_new_tokens, **options)[0]

    def generate_batch(self, prompts: Sequence[str], adapter_names: Sequence[Optional[str]],
                       max_new_tokens: int = 200, *, add_special_tokens: bool = True, **options) -> list[str]:
        """One batch, one forward per step, each row through its own adapter (``None``: the base).
        Greedy rows give what each would give alone."""
        if len(prompts) != len(adapter_names):
            raise ValueError(f"{len(prompts)} prompts but {len(adapter_names)} adapter names; give one name per prompt")
        self._check(adapter_names)
        if options.get("num_beams", 1) != 1 or options.get("num_return_sequences", 1) != 1:
            raise ValueError("generate_batch keeps one row per prompt; num_beams and num_return_sequences must be 1")
        with eval_mode(self.model), minilora.mixed_batch(self.model, list(adapter_names), bank=self.bank):
            return generate_texts(self.model, self.tokenizer, prompts, max_new_tokens,
                                  add_special_tokens=add_special_tokens, **options)

    def _check(self, names: Sequence[Optional[str]]) -> None:
        loaded = self.adapters
        unknown = [n for n in names if n is not None and n not in loaded]
        if unknown:
            raise ValueError(f"no adapter named {unknown[0]!r} is loaded; loaded: {', '.join(loaded) or '(none)'}. "
                             "Load it with load_adapter(name, path)")


# -- command line -------------------------------------------------------------------------------

def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every minilora inference/evaluation command shares."""
    parser.add_argument("--base_model", help="hub id, local folder or .gguf file of the base model (default: the base "
                                              "the adapter's adapter_config.json names)")
    parser.add_argument("--adapter", help="adapter folder or fsspec URL (gs://…); omit for the base model alone")
    parser.add_argument("--merge", action="store_true", help="fold the adapter into the weights before running")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, xla … (default: cuda if available, else cpu)")
    parser.add_argument("--torch_dtype", help="bfloat16, float16 or float32 (default float32)")
    parser.add_argument("--huggingface_token", default=None,
                        help="token for gated models; HF_TOKEN in the environment works too and keeps it out of "
                             "the process list")
    parser.add_argument("--debug", action="store_true", help="print full tracebacks for errors")


def model_from_args(args: argparse.Namespace):
    args.base_model = args.base_model or adapter_defaults(args.adapter)[0]
    if not args.base_model:
        raise ValueError("give --base_model (or an --adapter folder whose adapter_config.json names its base)")
    return load_lora_model(args.base_model, args.adapter, merge=args.merge, device=args.device,
                           torch_dtype=args.torch_dtype, token=args.huggingface_token)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="minilora-generate",
                                     description="Generate text with a base model and an optional LoRA adapter. "
                                                 "After the embedded demo: minilora-generate --adapter ./minilora-demo "
                                                 "\"What causes gout?\"")
    add_model_arguments(parser)
    parser.add_argument("prompts", nargs="*", metavar="PROMPT", help="prompts (questions), as --prompt")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt; repeat for several")
    parser.add_argument("--adapters", nargs="+", metavar="NAME=PATH", default=[],
                        help="several adapters on one base, each under a name; every prompt then names its "
                             "adapter with --prompt_for, and all of them run in one batch")
    parser.add_argument("--prompt_for", nargs=2, action="append", default=[], metavar=("NAME", "PROMPT"),
                        help="with --adapters: a prompt and the adapter it runs through (base: none); repeat")
    parser.add_argument("--chat_template", action=argparse.BooleanOptionalAction, default=None,
                        help="put each prompt into the tokenizer's chat template as the user's question (default: "
                             "when the adapter was trained with --chat_template, as the demo's was)")
    parser.add_argument("--prompt_file", help="a text file with one prompt per line (blank lines skipped)")
    parser.add_argument("--max_new_tokens", type=int, default=200)
    parser.add_argument("--do_sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, help="sampling temperature (with --do_sample)")
    parser.add_argument("--top_p", type=float, help="nucleus sampling mass (with --do_sample)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for sampling")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    require_app_packages(parser.prog)
    quiet_start(args.device, auto_picks_xla=False)

    prompts = list(args.prompts) + list(args.prompt)
    if args.prompt_file:
        if not os.path.isfile(args.prompt_file):
            parser.error(f"--prompt_file {args.prompt_file}: no such file")
        with open(args.prompt_file, encoding="utf-8") as f:
            prompts += [line.rstrip("\n") for line in f if line.strip()]
    if not prompts and not args.prompt_for:
        parser.error("give at least one prompt (PROMPT, --prompt or --prompt_file)")
    if any(not p.strip() for p in prompts + [p for _, p in args.prompt_for]):
        parser.error("--prompt is empty; give the text the model should continue")
    if args.max_new_tokens < 1:
        parser.error(f"--max_new_tokens must be at least 1, got {args.max_new_tokens}")
    if args.temperature is not None and not args.temperature > 0 or args.top_p is not None and not 0 < args.top_p <= 1:
        parser.error("--temperature must be positive and --top_p in (0, 1]")
    if not args.do_sample and (args.temperature is not None or args.top_p is not None):
        parser.error("--temperature and --top_p only apply when sampling; add --do_sample")
    if args.adapters:
        return _generate_per_adapter(parser, args, argv, prompts)
    if args.prompt_for:
        parser.error("--prompt_for names one of several adapters given with --adapters NAME=PATH ...")
    base, trained_chat = adapter_defaults(args.adapter)
    if not (args.base_model or base):
        parser.error("give --base_model, or an --adapter folder whose adapter_config.json names its base")
    chat = trained_chat if args.chat_template is None else args.chat_template

    def generate() -> int:
        options = {"do_sample": args.do_sample}
        options.update({k: v for k, v in (("temperature", args.temperature), ("top_p", args.top_p)) if v is not None})
        torch.manual_seed(args.seed)
        model, tokenizer = model_from_args(args)
        for prompt in prompts:  # one at a time: output appears as it is ready
            if chat:
                from .chat import chat_prompt

                text = generate_text(model, tokenizer, chat_prompt(tokenizer, prompt), args.max_new_tokens,
                                     add_special_tokens=False, **options)
            else:
                text = generate_text(model, tokenizer, prompt, args.max_new_tokens, **options)
            print(f"### Prompt\n{prompt}\n### Generated\n{text}\n", flush=True)
        return 0

    return run_command("minilora-generate", argv, generate, errors=(ValueError,))


def _generate_per_adapter(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str],
                          prompts: list[str]) -> int:
    """minilora-generate --adapters A=PATH B=PATH --prompt_for A "..." --prompt_for base "...": every
    prompt through its own adapter, all in one batch (AdapterManager.generate_batch)."""
    paths = dict(item.split("=", 1) for item in args.adapters if "=" in item)
    if len(paths) != len(args.adapters) or "base" in paths or not all(paths):
        parser.error(f"--adapters {' '.join(args.adapters)}: give each adapter as NAME=PATH, with distinct names "
                     "other than 'base' (which --prompt_for uses for the base model alone)")
    if args.adapter or args.merge:
        parser.error("--adapters serves several adapters unmerged; leave out --adapter and --merge")
    if prompts:
        parser.error("with --adapters, give each prompt with the adapter it runs through: --prompt_for NAME PROMPT")
    unknown = [name for name, _ in args.prompt_for if name != "base" and name not in paths]
    if unknown:
        parser.error(f"--prompt_for {unknown[0]}: no such adapter; --adapters names {', '.join(paths)} (or use base)")
    defaults = {name: adapter_defaults(path) for name, path in paths.items()}
    base = args.base_model or next((b for b, _ in defaults.values() if b), None)
    if not base:
        parser.error("give --base_model, or --adapters folders whose adapter_config.json names their base")
    trained_chat = {chat for _, chat in defaults.values()}
    if args.chat_template is None and len(trained_chat) > 1:
        parser.error("some of these adapters were trained with --chat_template and some without; say which the "
                     "prompts get: --chat_template or --no-chat_template")
    chat = trained_chat.pop() if args.chat_template is None else args.chat_template

    def generate() -> int:
        options = {"do_sample": args.do_sample}
        options.update({k: v for k, v in (("temperature", args.temperature), ("top_p", args.top_p)) if v is not None})
        torch.manual_seed(args.seed)
        manager = AdapterManager(base, device=args.device, torch_dtype=args.torch_dtype, token=args.huggingface_token)
        for name, path in paths.items():
            manager.load_adapter(name, path)
        texts = [prompt for _, prompt in args.prompt_for]
        if chat:
            from .chat import chat_prompt

            texts = [chat_prompt(manager.tokenizer, t) for t in texts]
        names = [None if name == "base" else name for name, _ in args.prompt_for]
        generated = manager.generate_batch(texts, names, args.max_new_tokens, add_special_tokens=not chat, **options)
        for (name, prompt), text in zip(args.prompt_for, generated):
            print(f"### Prompt ({name})\n{prompt}\n### Generated\n{text}\n", flush=True)
        return 0

    return run_command("minilora-generate", argv, generate, errors=(ValueError,))


if __name__ == "__main__":
    sys.exit(main())
