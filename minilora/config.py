"""LoRA settings as one small dataclass, plus the name matching PEFT uses for them."""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from dataclasses import dataclass, field
from typing import Optional, Union

try:  # the regex parser the re module itself uses (Python 3.11 renamed it)
    import re._parser as _sre_parse
except ImportError:  # pragma: no cover - Python 3.10
    import sre_parse as _sre_parse

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BIAS_MODES = ("none", "all", "lora_only")
INIT_MODES = ("kaiming", "gaussian")
# PEFT's TaskType values: recorded in adapter_config.json, where PEFT (and transformers' PEFT
# integration) pick the model class from it; minilora's own computation does not depend on it.
TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS", "SEQ_2_SEQ_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")

# Where a layer index sits in a module path ("model.layers.3.mlp.up_proj" -> 3); PEFT's default
# layers_pattern names cover Llama (layers), GPT-2 (h) and most others.
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)(?:\.|$)")


# PEFT's LoraConfig names for three of LoRAConfig's fields, accepted wherever settings are given by name.
PEFT_ALIASES = {"lora_alpha": "alpha", "lora_dropout": "dropout", "init_lora_weights": "init"}


@dataclass
class LoRAConfig:
    """What to adapt and how.

    Attributes:
        r: rank of every adapter unless ``rank_pattern`` says otherwise.
        alpha: scaling numerator; ``None`` means ``2 * r``.
        dropout: dropout probability on the adapter's input, in [0, 1).
        target_modules: module-name endings (list), a regex that must match the whole module
            name (str), or ``"all-linear"`` (every nn.Linear but the output head).
        exclude_modules: same forms as ``target_modules``; matched modules are never adapted.
        layers_to_transform: only adapt modules inside these layer indices.
        bias: which biases train and are saved with the adapter: none, all, lora_only.
        use_rslora: scale by ``alpha / sqrt(r)`` instead of ``alpha / r``.
        use_dora: DoRA (weight-decomposed LoRA, PEFT's ``use_dora``): a trained magnitude per
            output feature rescales each row of ``W0 + scaling·BA`` (see minilora/dora.py).
        init: ``kaiming`` (A Kaiming-uniform, as PEFT) or ``gaussian`` (A ~ N(0, 1/r)).
        rank_pattern / alpha_pattern: per-module overrides, keys matched against the end of
            module names (regexes allowed), as PEFT does.
        modules_to_save: module-name endings (e.g. ``["lm_head", "embed_tokens"]``) trained in full:
            each adapter gets its own trainable copy of these modules (minilora/modules_to_save.py).
        ensure_weight_tying: where the base ties two modules' weights (lm_head and embed_tokens),
            their copies share one weight too, as in the base; False (PEFT's default) copies each
            named module on its own.
        task_type: PEFT's task type, written to adapter_config.json (None or one of TASK_TYPES).

    PEFT's names ``lora_alpha``, ``lora_dropout`` and ``init_lora_weights`` (True or "gaussian")
    are accepted for ``alpha``, ``dropout`` and ``init``:
    ``LoRAConfig(r=8, lora_alpha=16, lora_dropout=0.05, task_type="CAUSAL_LM")``.
    """

    r: int = 16
    alpha: Optional[float] = None
    dropout: float = 0.0
    target_modules: Union[list[str], str] = field(default_factory=lambda: list(LLAMA_TARGETS))
    exclude_modules: Optional[Union[list[str], str]] = None
    layers_to_transform: Optional[Union[int, list[int]]] = None
    bias: str = "none"
    use_rslora: bool = False
    use_dora: bool = False
    init: str = "kaiming"
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    modules_to_save: Optional[list[str]] = None
    ensure_weight_tying: bool = False
    task_type: Optional[str] = "CAUSAL_LM"

    def __post_init__(self):
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        if isinstance(self.exclude_modules, tuple):
            self.exclude_modules = list(self.exclude_modules)
        if isinstance(self.layers_to_transform, int):
            self.layers_to_transform = [self.layers_to_transform]
        if isinstance(self.modules_to_save, (tuple, str)):
            self.modules_to_save = [self.modules_to_save] if isinstance(self.modules_to_save, str) \
                else list(self.modules_to_save)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first setting that cannot work."""
        _check_rank("r", self.r)
        if self.alpha is not None:
            _check_alpha("alpha", self.alpha)
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout!r} is outside [0, 1); use e.g. 0.05 or 0.1, or 0 for none")
        if self.bias not in BIAS_MODES:
            raise ValueError(f"bias={self.bias!r} is not one of {', '.join(BIAS_MODES)}")
        for flag in ("use_rslora", "use_dora"):  # a string such as "false" would be truthy
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag}={getattr(self, flag)!r}: give True or False")
        if self.init not in INIT_MODES:
            raise ValueError(f"init={self.init!r} is not one of {', '.join(INIT_MODES)}")
        if not isinstance(self.target_modules, (str, list)) or not self.target_modules \
                or isinstance(self.target_modules, list) and not all(isinstance(t, str) and t for t in self.target_modules):
            raise ValueError(
                f"target_modules={self.target_modules!r}: give a list of module-name endings "
                "(e.g. ['q_proj', 'v_proj']), a regex string, or 'all-linear'"
            )
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            check_pattern("target_modules", self.target_modules)
        if self.exclude_modules is not None and not isinstance(self.exclude_modules, str) and not (
                isinstance(self.exclude_modules, list) and all(isinstance(t, str) and t for t in self.exclude_modules)):
            raise ValueError(f"exclude_modules={self.exclude_modules!r}: give a list of module-name endings "
                             "(e.g. ['lm_head']), a regex string, or None")
        if isinstance(self.exclude_modules, str):
            check_pattern("exclude_modules", self.exclude_modules)
        for what, patterns in (("rank_pattern", self.rank_pattern), ("alpha_pattern", self.alpha_pattern)):
            for key in patterns:
                if not isinstance(key, str) or not key:
                    raise ValueError(f"{what} key {key!r}: keys are module-name endings or regexes (text)")
                check_pattern(f"{what} key", key)
        for key, value in self.rank_pattern.items():
            _check_rank(f"rank_pattern[{key!r}]", value)
        for key, value in self.alpha_pattern.items():
            _check_alpha(f"alpha_pattern[{key!r}]", value)
        if self.layers_to_transform is not None and not all(  # True is an int too, and would mean layer 1
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.layers_to_transform
        ):
            raise ValueError(f"layers_to_transform={self.layers_to_transform!r}: give non-negative layer indices")
        if self.layers_to_transform is not None and isinstance(self.target_modules, str) \
                and self.target_modules != "all-linear":  # saved as the list of names it resolved to
            raise ValueError(f"layers_to_transform cannot narrow a regex target_modules={self.target_modules!r} "
                             "(PEFT refuses such an adapter); put the layer indices in the regex instead")
        if self.modules_to_save is not None and not all(isinstance(n, str) and n for n in self.modules_to_save):
            raise ValueError(f"modules_to_save={self.modules_to_save!r}: give module-name endings, "
                             "e.g. ['lm_head', 'embed_tokens']")
        for key in self.modules_to_save or ():  # each is a regex inside selects' PEFT rule
            check_pattern("modules_to_save entry", key, "modules_to_save holds module-name endings such as 'lm_head'")
        if not isinstance(self.ensure_weight_tying, bool):
            raise ValueError(f"ensure_weight_tying={self.ensure_weight_tying!r} should be True or False")
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            raise ValueError(f"task_type={self.task_type!r} is not one of PEFT's task types "
                             f"({', '.join(TASK_TYPES)}) or None")

    def replace(self, **changes) -> "LoRAConfig":
        """A copy with ``changes`` (PEFT's names accepted, as in the constructor), so
        ``inject(model, r=16, lora_alpha=32, lora_dropout=0.05)`` works as a PEFT user would write it."""
        changes = peft_names(changes)
        return dataclasses.replace(self, **changes)

    # -- per-module decisions ------------------------------------------------------------------

    @property
    def lora_alpha(self) -> float:
        """alpha as used: the given value, or 2 * r when it was left as None."""
        return 2 * self.r if self.alpha is None else self.alpha

    def rank_for(self, name: str) -> int:
        key = pattern_key(self.rank_pattern, name)
        return self.r if key is None else self.rank_pattern[key]

    def alpha_for(self, name: str) -> float:
        key = pattern_key(self.alpha_pattern, name)
        return self.lora_alpha if key is None else self.alpha_pattern[key]

    def selects(self, name: str) -> bool:
        """Whether the module called ``name`` is a target (before the nn.Linear type check; with
        ``"all-linear"`` every name is, and the caller keeps the Linears but the output head)."""
        if self.target_modules != "all-linear" and not matches(self.target_modules, name):
            return False
        if self.exclude_modules is not None and matches(self.exclude_modules, name):
            return False
        if self.modules_to_save and any(re.match(rf"(^|.*\.){key}($|\..*)", name) for key in self.modules_to_save):
            return False  # trained in full, so never also LoRA (PEFT's rule, the same regex)
        if self.layers_to_transform is not None:
            found = _LAYER_INDEX.search(name)
            if found is None or int(found.group(1)) not in self.layers_to_transform:
                return False
        return True


# dataclass writes __init__ from the fields; this wraps it so that PEFT's names are taken too and an
# unknown name gets a message listing the settings instead of Python's bare TypeError.
_fields_init = LoRAConfig.__init__


@functools.wraps(_fields_init)
def _init_with_peft_names(self, *args, **fields):
    _fields_init(self, *args, **peft_names(fields))


LoRAConfig.__init__ = _init_with_peft_names


def peft_names(fields: dict) -> dict:
    """``fields`` with PEFT's ``lora_alpha``/``lora_dropout``/``init_lora_weights`` renamed to
    ``alpha``/``dropout``/``init``; raises TypeError naming any setting LoRAConfig does not have."""
    fields = dict(fields)
    if "init_lora_weights" in fields:
        value = fields["init_lora_weights"]
        if value is not True and value != "gaussian":
            raise ValueError(f"init_lora_weights={value!r}: minilora initialises as PEFT's True (Kaiming-uniform A, "
                             "zero B) or 'gaussian'; other schemes are not implemented")
        fields["init_lora_weights"] = "kaiming" if value is True else "gaussian"
    for peft_name, name in PEFT_ALIASES.items():
        if peft_name in fields:
            if name in fields:
                raise ValueError(f"give {name} or {peft_name}, not both")
            fields[name] = fields.pop(peft_name)
    known = {f.name for f in dataclasses.fields(LoRAConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise TypeError(f"unknown LoRA setting(s) {', '.join(unknown)}; the settings are "
                        f"{', '.join(sorted(known | set(PEFT_ALIASES)))}")
    return fields


def matches(spec: Union[list[str], str], name: str) -> bool:
    """PEFT's rule: a list entry matches the whole name or its end after a dot; a string is a
    regex that must match the whole name."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == key or name.endswith("." + key) for key in spec)


# Longest regex accepted from a config: module names are short, and so are patterns that match them.
MAX_PATTERN_LENGTH = 1000
_REPEATS = {_sre_parse.MAX_REPEAT, _sre_parse.MIN_REPEAT} | (
    {_sre_parse.POSSESSIVE_REPEAT} if hasattr(_sre_parse, "POSSESSIVE_REPEAT") else set())


def check_pattern(what: str, pattern: str,
                  hint: str = "a string target is a regex matched against the whole module name, a list holds "
                              "module-name endings") -> None:
    """Raise ValueError unless ``pattern`` is a regex whose matching time stays bounded.

    Python's backtracking matcher takes exponential time on a repeated group that itself
    repeats (``(.*)*x``, ``(a+)+``) or a repeated alternation (``(a|ab)*``): one such pattern
    in an adapter_config.json from a stranger hangs the load for hours on a 40-character
    module name. Those shapes are refused; every pattern PEFT users write (``.*\\.(q|v)_proj``,
    ``model\\.layers\\.\\d+\\.self_attn\\.(q_proj|v_proj)``) has neither.
    """
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise ValueError(f"{what} is a regex of {len(pattern)} characters; at most {MAX_PATTERN_LENGTH} are accepted")
    try:
        parsed = _sre_parse.parse(pattern)
    except (re.error, RecursionError, OverflowError) as e:
        raise ValueError(f"{what}={pattern!r} is not a valid regex ({e}); {hint}") from None
    if _backtracks_exponentially(parsed, in_repeat=False):
        raise ValueError(f"{what}={pattern!r} repeats a group that itself repeats or alternates (like (a+)+, (.*)* "
                         "or (a|ab)*), which can make matching take exponential time; write it without the nested "
                         r"repetition, e.g. '.*\.(q_proj|v_proj)'")


def _backtracks_exponentially(items, in_repeat: bool) -> bool:
    """Whether a parsed regex holds a repeat or an alternation inside an unbounded-enough repeat."""
    for op, av in items:
        if op in _REPEATS:
            low, high, sub = av
            if in_repeat and high > 1:
                return True
            if _backtracks_exponentially(sub, in_repeat or high > 1):
                return True
        elif op is _sre_parse.BRANCH:
            if in_repeat:
                return True
            if any(_backtracks_exponentially(sub, in_repeat) for sub in av[1]):
                return True
        elif op is _sre_parse.SUBPATTERN:
            if _backtracks_exponentially(av[-1], in_repeat):
                return True
        elif op in (_sre_parse.ASSERT, _sre_parse.ASSERT_NOT):
            if _backtracks_exponentially(av[1], in_repeat):
                return True
        elif op is getattr(_sre_parse, "ATOMIC_GROUP", None):
            if _backtracks_exponentially(av, in_repeat):
                return True
        elif op is _sre_parse.GROUPREF_EXISTS:
            if any(sub is not None and _backtracks_exponentially(sub, in_repeat) for sub in av[1:]):
                return True
    return False


def inside_adapters(name: str) -> bool:
    """Whether module ``name`` lies inside an adapter-holding layer's ``adapters`` (a LoRA
    adapter, or a modules_to_save copy): such modules are never targets themselves."""
    return ".adapters." in f".{name}." or name.endswith(".adapters")


def pattern_key(patterns: dict, name: str) -> Optional[str]:
    """The first key of ``patterns`` that matches the end of ``name`` (PEFT's get_pattern_key)."""
    for key in patterns:
        if name == key or re.match(rf"(?:.*\.)?(?:{key})$", name):
            return key
    return None


def _check_rank(what: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{what}={value!r}: the rank must be a positive integer such as 8, 16 or 32")


def _check_alpha(what: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
        raise ValueError(f"{what}={value!r}: alpha must be a positive number (2 x r is usual)")
