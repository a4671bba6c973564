"""Adapter configuration: a plain, self-validating dataclass.

Field names follow the LoRA literature (`r`, `alpha`, `dropout`); `to_peft_dict` /
`from_peft_dict` translate to and from PEFT's `adapter_config.json` so files travel
both ways.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import re2
import regex

INITS = ("default", "gaussian", "pissa", "olora", "loftq")
"""Initialisations `LoraConfig.init` accepts."""

ALL_LINEAR = "all-linear"

REGEX_TIMEOUT_S = 0.5
"""Longest a regex that RE2 cannot run (lookaround, backreferences) may take on one module name."""

MAX_RANK = 2**16
"""Largest rank accepted (`r`, `rank_pattern` values): wider than the layers of any model in use."""
MAX_SCALING = 1e4
"""Largest |alpha / r| (|alpha / sqrt(r)| with rsLoRA) accepted for any module; usual values are 0.25 to 4.
Past it an update swamps the base layer's output, and in float16 / float32 files it overflows."""


@dataclass
class LoraConfig:
    """How one adapter is shaped and where it goes."""

    r: int = 8
    """Rank of the low-rank update (the width of A and B)."""
    alpha: float = 16
    """Scaling numerator: the update is multiplied by alpha / r (alpha / sqrt(r) with rsLoRA)."""
    dropout: float = 0.0
    """Dropout probability on the input of A; 0 disables it."""
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])
    """Modules to adapt: a list of names (suffix match on the dotted path), a regex
    (full match on the dotted path) or "all-linear" (every linear layer but the output head)."""
    exclude_modules: list[str] | str | None = None
    """Modules never to adapt, matched like target_modules (list = suffix, str = regex)."""
    target_parameters: list[str] | None = None
    """Expert parameters of mixture-of-experts layers to adapt, by suffix of their dotted name
    (PEFT's `target_parameters`, e.g. "mlp.experts.gate_up_proj"). "all-linear" adapts every
    expert parameter anyway; this names them when target_modules is a list or a regex."""
    modules_to_save: list[str] | None = None
    """Modules trained in full and saved with the adapter (e.g. a classifier head), by suffix."""
    use_rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r) instead of alpha / r."""
    use_dora: bool = False
    """Weight-decomposed LoRA (DoRA): a trainable magnitude per output feature."""
    init: str = "default"
    """Initialisation: default (A Kaiming-uniform, B zero), gaussian, pissa, olora, loftq
    (quantizes the targeted layers' base to NF4 and starts B A on the quantization error)."""
    loftq_iters: int = 1
    """LoftQ: alternating quantize / rank-r SVD steps (init=loftq only)."""
    rank_pattern: dict[str, int] | None = None
    """Per-module rank overrides: {regex matched at the end of the module path: r}."""
    alpha_pattern: dict[str, float] | None = None
    """Per-module alpha overrides: {regex matched at the end of the module path: alpha}."""
    base_model_name_or_path: str | None = None
    """Base model the adapter was trained on (informational; written to adapter_config.json)."""

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoraConfig.r must be a positive integer, got {self.r!r}")
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool):
            raise ValueError(f"LoraConfig.alpha must be a number, got {self.alpha!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.init not in INITS:
            raise ValueError(
                f"LoraConfig.init must be one of {', '.join(INITS)}; got {self.init!r}"
            )
        if isinstance(self.loftq_iters, bool) or not isinstance(self.loftq_iters, int) or self.loftq_iters < 1:
            raise ValueError(f"LoraConfig.loftq_iters must be an integer >= 1, got {self.loftq_iters!r}")
        if not (self.target_parameters and list(self.target_modules) == []):  # experts alone: no modules
            self.target_modules = _check_selector("target_modules", self.target_modules)
        if self.exclude_modules is not None:
            self.exclude_modules = _check_selector("exclude_modules", self.exclude_modules)
        if self.target_parameters is not None:
            if isinstance(self.target_parameters, str) or not all(
                isinstance(p, str) and p.strip(".") for p in self.target_parameters
            ):
                raise ValueError(
                    "LoraConfig.target_parameters must be a list of parameter names, matched at the end of "
                    f"their dotted path (e.g. 'mlp.experts.gate_up_proj'); got {self.target_parameters!r}"
                )
            self.target_parameters = list(self.target_parameters) or None
        if self.modules_to_save is not None:
            if isinstance(self.modules_to_save, str) or not all(
                isinstance(m, str) and m for m in self.modules_to_save
            ):
                raise ValueError(
                    f"LoraConfig.modules_to_save must be a list of module names, got {self.modules_to_save!r}"
                )
            self.modules_to_save = list(self.modules_to_save)
        for name, pattern in (
            ("rank_pattern", self.rank_pattern),
            ("alpha_pattern", self.alpha_pattern),
        ):
            if pattern is None:
                continue
            if not isinstance(pattern, dict):
                raise ValueError(
                    f"LoraConfig.{name} must be a dict of regex -> value, got {pattern!r}"
                )
            for key, value in pattern.items():
                _compile(f"{name} key", key)
                if name == "rank_pattern" and (not isinstance(value, int) or value <= 0):
                    raise ValueError(
                        f"LoraConfig.rank_pattern[{key!r}] must be a positive integer, got {value!r}"
                    )
        check_scale(self.r, self.alpha, self.rank_pattern, self.alpha_pattern, self.use_rslora, "LoraConfig.", "alpha")

    def rank_for(self, module_name: str) -> int:
        """The rank of the adapter on `module_name`, after rank_pattern."""
        return int(_pattern_value(self.rank_pattern, module_name, self.r))

    def alpha_for(self, module_name: str) -> float:
        """The alpha of the adapter on `module_name`, after alpha_pattern."""
        return float(_pattern_value(self.alpha_pattern, module_name, self.alpha))

    def scaling_for(self, module_name: str) -> float:
        r = self.rank_for(module_name)
        alpha = self.alpha_for(module_name)
        return alpha / (r**0.5) if self.use_rslora else alpha / r

    # PEFT's adapter_config.json -------------------------------------------------

    def to_peft_dict(
        self, resolved_targets: list[str] | str | None = None, resolved_parameters: list[str] | None = None
    ) -> dict[str, Any]:
        """The config as PEFT writes it, so PEFT and vLLM read our files."""
        targets = resolved_targets if resolved_targets is not None else self.target_modules
        parameters = resolved_parameters if resolved_parameters is not None else self.target_parameters
        init: bool | str = True if self.init == "default" else self.init
        if self.init == "gaussian":
            init = "gaussian"
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": self.base_model_name_or_path,
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": targets,
            "exclude_modules": self.exclude_modules,
            "target_parameters": parameters or None,
            "modules_to_save": self.modules_to_save,
            "use_rslora": self.use_rslora,
            "use_dora": self.use_dora,
            "init_lora_weights": init,
            "rank_pattern": self.rank_pattern or {},
            "alpha_pattern": self.alpha_pattern or {},
            "bias": "none",
            "fan_in_fan_out": False,
            "inference_mode": True,
            "layers_to_transform": None,
            "layers_pattern": None,
            "loftq_config": {"loftq_bits": 4, "loftq_iter": self.loftq_iters} if self.init == "loftq" else {},
        }

    @classmethod
    def from_peft_dict(
        cls, data: dict[str, Any], source: str = "adapter_config.json"
    ) -> LoraConfig:
        """Read PEFT's adapter_config.json (ours or PEFT's own)."""
        peft_type = data.get("peft_type", "LORA")
        if peft_type != "LORA":
            raise ValueError(
                f"{source}: peft_type {peft_type!r} is not supported; lorakit reads LORA adapters"
            )
        unsupported = {
            "bias": ("none", None),
            "layers_to_transform": (None,),
            "use_qalora": (False, None),
            "lora_bias": (False, None),
        }
        for key, accepted in unsupported.items():
            if data.get(key, accepted[0]) not in accepted:
                raise ValueError(
                    f"{source}: {key}={data[key]!r} is not supported (accepted: {accepted[0]!r})"
                )
        init = data.get("init_lora_weights", True)
        if init is True:
            init = "default"
        elif init is False:
            init = "default"  # weights come from the file anyway
        elif isinstance(init, str) and init.startswith("pissa"):
            init = "pissa"
        if init not in INITS:
            raise ValueError(
                f"{source}: init_lora_weights={init!r} is not supported; accepted: {INITS}"
            )
        targets = data.get("target_modules")
        parameters = data.get("target_parameters") or None
        if targets is None and parameters:
            targets = []  # PEFT allows an adapter on expert parameters alone
        elif targets is None:
            raise ValueError(f"{source}: target_modules is missing")
        if isinstance(targets, (set, tuple)):
            targets = list(targets)
        r = data.get("r", 8)
        if isinstance(r, float) and r.is_integer():
            r = int(r)
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ValueError(f"{source}: r must be a positive integer, got {r!r}")
        check_peft_scale(data, source)
        return cls(
            r=r,
            alpha=data.get("lora_alpha", 8),
            dropout=float(data.get("lora_dropout", 0.0) or 0.0),
            target_modules=targets,
            exclude_modules=data.get("exclude_modules"),
            target_parameters=parameters,
            modules_to_save=data.get("modules_to_save"),
            use_rslora=bool(data.get("use_rslora", False)),
            use_dora=bool(data.get("use_dora", False)),
            init=init,
            loftq_iters=int((data.get("loftq_config") or {}).get("loftq_iter", 1)),
            rank_pattern=data.get("rank_pattern") or None,
            alpha_pattern=data.get("alpha_pattern") or None,
            base_model_name_or_path=data.get("base_model_name_or_path"),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


def check_peft_scale(data: dict[str, Any], source: str) -> None:
    """`check_scale` on an adapter_config.json read as a dict: errors name `source`, the field
    (PEFT's names: r, lora_alpha, rank_pattern, alpha_pattern) and the value."""
    r = data.get("r", 8)
    if isinstance(r, float) and r.is_integer():
        r = int(r)
    patterns = [data.get(key) or None for key in ("rank_pattern", "alpha_pattern")]
    ranks, alphas = (p if isinstance(p, dict) else None for p in patterns)
    check_scale(r, data.get("lora_alpha", 8), ranks, alphas, bool(data.get("use_rslora")), f"{source}: ", "lora_alpha")


def check_scale(
    r: Any, alpha: Any, rank_pattern: dict[str, Any] | None, alpha_pattern: dict[str, Any] | None,
    use_rslora: bool, where: str, alpha_name: str,
) -> None:
    """Refuse a rank or an alpha that cannot scale an update sanely: a rank that is not an
    integer in 1..MAX_RANK, an alpha that is not a finite number, or one whose scaling
    (alpha / r, alpha / sqrt(r) with rsLoRA) would pass MAX_SCALING for the smallest rank.

    A NaN or infinite alpha passes every shape check and then turns each output of the
    adapter into NaN; a huge one overflows the float32 a GGUF file stores it in.
    `where` starts each message ("LoraConfig." or "FILE: "); `alpha_name` is alpha's name there.
    """
    ranks = {"r": r} | {f"rank_pattern[{k!r}]": v for k, v in (rank_pattern or {}).items()}
    for name, value in ranks.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{where}{name} must be a positive integer, got {value!r}")
        if value > MAX_RANK:
            raise ValueError(f"{where}{name} is {value}; a rank is at most {MAX_RANK}")
    smallest = min(ranks.values())
    divisor = math.sqrt(smallest) if use_rslora else smallest
    alphas = {alpha_name: alpha} | {f"alpha_pattern[{k!r}]": v for k, v in (alpha_pattern or {}).items()}
    for name, value in alphas.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}{name} must be a number, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(
                f"{where}{name} must be a finite number, got {value!r}; accepted: a number with "
                f"|alpha / r| at most {MAX_SCALING:g}"
            )
        if abs(value) > MAX_SCALING * divisor:  # (compared before dividing: an int may be too big for a float)
            scale = "alpha / sqrt(r)" if use_rslora else "alpha / r"
            shown = repr(value) if len(repr(value)) <= 24 else f"{str(value)[:12]}... ({len(str(value))} digits)"
            raise ValueError(
                f"{where}{name} is {shown}: with r={smallest} the update would be scaled by over "
                f"{MAX_SCALING:g}; accepted: |{scale}| at most {MAX_SCALING:g} (usual values: 0.25 to 4)"
            )


def _compile(what: str, pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as err:
        raise ValueError(f"LoraConfig {what} {pattern!r} is not a valid regex: {err}") from None


def _check_selector(name: str, value: Any) -> list[str] | str:
    if isinstance(value, str):
        if not value:
            raise ValueError(f"LoraConfig.{name} must not be empty")
        if value != ALL_LINEAR:
            _compile(name, value)
        return value
    if (
        isinstance(value, (list, tuple, set))
        and value
        and all(isinstance(v, str) and v for v in value)
    ):
        return sorted(value) if isinstance(value, set) else list(value)
    raise ValueError(
        f"LoraConfig.{name} must be a non-empty list of module names, a regex string or "
        f"'{ALL_LINEAR}'; got {value!r}"
    )


def _pattern_value(patterns: dict[str, Any] | None, module_name: str, default: Any) -> Any:
    """PEFT's rule: a pattern applies when it matches the end of the dotted module path."""
    if not patterns:
        return default
    for pattern, value in patterns.items():
        if _fullmatch(rf"(?:.*\.)?(?:{pattern})", module_name, pattern):
            return value
    return default


def matches(selector: list[str] | str, module_name: str) -> bool:
    """Whether `module_name` is selected: list = exact name or dotted suffix, str = regex full match."""
    if isinstance(selector, str):
        return _fullmatch(selector, module_name, selector)
    return any(module_name == s or module_name.endswith("." + s) for s in selector)


@functools.lru_cache(maxsize=512)
def _linear_time(pattern: str) -> Any:
    """RE2 (time linear in the name's length, whatever the pattern), or `regex` for the
    patterns RE2 does not accept, which then run under a time limit."""
    options = re2.Options()
    options.log_errors = False
    try:
        return re2.compile(pattern, options)
    except re2.error:
        return regex.compile(pattern)


def _fullmatch(pattern: str, name: str, shown: str) -> bool:
    """A regex file or option may come from anyone: no pattern may stall the caller."""
    compiled = _linear_time(pattern)
    if isinstance(compiled, regex.Pattern):
        try:
            return compiled.fullmatch(name, timeout=REGEX_TIMEOUT_S) is not None
        except TimeoutError:
            raise ValueError(
                f"regex {shown!r} took over {REGEX_TIMEOUT_S} s on module name {name!r} (catastrophic "
                "backtracking); write it without nested repetition"
            ) from None
    return compiled.fullmatch(name) is not None
