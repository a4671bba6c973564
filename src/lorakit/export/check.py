"""`lorakit check`: will vLLM, SGLang, llama.cpp or PEFT load this adapter, and act on it?

Each target's rules are written from its own loader, at the version named beside them. An
adapter gets one verdict per target: it loads and acts, it loads with warnings (it loads, but
some of it is ignored or scaled differently than in training), or it is refused; each failed
rule says why, and a target that takes the adapter comes with the command that serves it.

The facts come from the files alone (config and tensor shapes; no weights are read) plus the
base model's config, instantiated on the meta device, to tell a linear layer from anything
else and to know the vocabulary size.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from lorakit.export.convert import convert_command

TARGETS = ("vllm", "sglang", "llama.cpp", "peft")
LOADS, WARNS, REFUSED = "loads and acts", "loads with warnings", "refused"

VLLM = "vLLM 0.11"
"""vllm/lora/peft_helper.py (PEFTHelper.validate_legal), vllm/config/lora.py (MaxLoRARanks),
vllm/lora/models.py (LoRAModel.from_local_checkpoint: the expected-modules check)."""
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The values vLLM's --max-lora-rank accepts; an adapter's rank must not exceed the one chosen."""
SGLANG = "SGLang 0.5"
"""python/sglang/srt/lora/lora_config.py and lora_manager.py: rank and alpha from the config."""
LLAMA_CPP = "llama.cpp (convert_lora_to_gguf.py, src/llama-adapter.cpp, late 2025)"
"""One adapter.lora.alpha for the file; each tensor's rank from its shape."""
PEFT = "PEFT 0.17"

LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_embedding_A", ".lora_embedding_B")
PREFIX = "base_model.model."


@dataclass
class Finding:
    """A rule the adapter fails on one target."""

    rule: str
    severity: str  # WARNS or REFUSED
    reason: str


@dataclass
class Verdict:
    target: str
    verdict: str
    findings: list[Finding]
    command: str | None
    notes: list[str] = field(default_factory=list)


@dataclass
class AdapterFacts:
    """What the rules look at, from the adapter's files and its base model's config."""

    directory: Path
    raw: dict[str, Any]
    shapes: dict[str, tuple[int, ...]]
    module_kinds: dict[str, str] = field(default_factory=dict)
    """Dotted module path -> linear | embedding | the class name of anything else."""
    vocab_size: int | None = None
    model_type: str | None = None
    tied_embeddings: bool = False
    base_note: str | None = None
    """Why the base model could not be inspected (its rules are then not checked)."""

    # derived ------------------------------------------------------------------------
    def lora_modules(self) -> dict[str, int]:
        """Module path -> rank, from lora_A / lora_embedding_A shapes (fused experts apart)."""
        out = {}
        for key, shape in self.shapes.items():
            for suffix in (".lora_A.weight", ".lora_embedding_A"):
                if key.endswith(suffix) and self._expert_module(_strip(key[: -len(suffix)])) is None:
                    out[_strip(key[: -len(suffix)])] = int(shape[0])
        return out

    def expert_modules(self) -> list[str]:
        """Paths of the fused-experts modules whose parameters the adapter adapts (target_parameters)."""
        found = {self._expert_module(_strip(k[: -len(".lora_A.weight")]))
                 for k in self.shapes if k.endswith(".lora_A.weight")}
        return sorted(p for p in found if p is not None)

    def _expert_module(self, prefix: str) -> str | None:
        from lorakit.adapters.experts import split_nested

        wanted = self.raw.get("target_parameters") or []
        path, _ = split_nested(prefix)
        owners = {t.rsplit(".", 1)[0] for t in wanted if "." in t}
        if any(path == o or path.endswith("." + o) for o in owners) or (wanted and path != prefix):
            return path
        return None

    def embedding_vocab(self) -> dict[str, int]:
        return {_strip(k[: -len(".lora_embedding_A")]): int(s[1]) for k, s in self.shapes.items()
                if k.endswith(".lora_embedding_A")}

    def dora(self) -> bool:
        return bool(self.raw.get("use_dora")) or any(k.endswith(".lora_magnitude_vector") for k in self.shapes)

    def saved_modules(self) -> list[str]:
        listed = list(self.raw.get("modules_to_save") or [])
        extra = sorted({_strip(k).rsplit(".", 1)[0] for k in self.shapes if not _is_lora_key(k)})
        return listed + [m for m in extra if not any(m.endswith(x) for x in listed)]

    def bias(self) -> bool:
        return (self.raw.get("bias", "none") not in ("none", None) or bool(self.raw.get("lora_bias"))
                or any(k.endswith(".lora_B.bias") for k in self.shapes))

    def scalings(self) -> dict[str, float]:
        """Module path -> the scaling PEFT (and lorakit) apply: alpha_m / r_m (sqrt with rsLoRA)."""
        from lorakit.adapters.config import LoraConfig

        # Only the fields that decide alpha per module; the rest (bias, ...) may be anything here.
        config = LoraConfig(alpha=float(self.raw.get("lora_alpha", 8)), target_modules=["unused"],
                            alpha_pattern=self.raw.get("alpha_pattern") or None)
        rslora = bool(self.raw.get("use_rslora"))
        return {path: config.alpha_for(path) / (r**0.5 if rslora else r) for path, r in self.lora_modules().items()}

    def base(self) -> str:
        return self.raw.get("base_model_name_or_path") or "BASE_MODEL"


def _strip(key: str) -> str:
    return key[len(PREFIX):] if key.startswith(PREFIX) else key


def _is_lora_key(key: str) -> bool:
    return (any(key.endswith(s) for s in LORA_SUFFIXES) or key.endswith(".lora_magnitude_vector")
            or key.endswith(".lora_B.bias") or key.endswith(".base_layer.weight"))


# reading ------------------------------------------------------------------------------


def read_facts(directory: str | os.PathLike, model: str | None = None) -> AdapterFacts:
    """Facts from an adapter directory; `model` overrides the base recorded in its config."""
    facts = read_files(directory)
    _inspect_base(facts, model or facts.raw.get("base_model_name_or_path"))
    return facts


def read_facts_on(directory: str | os.PathLike, model: nn.Module) -> AdapterFacts:
    """Facts from an adapter directory whose base is `model`, already loaded (a server's)."""
    facts = read_files(directory)
    facts_from_modules(facts, model)
    return facts


def read_files(directory: str | os.PathLike) -> AdapterFacts:
    """The adapter's own facts (config and tensor shapes), the base model not yet inspected."""
    from safetensors import safe_open

    from lorakit.adapters.config import check_peft_scale
    from lorakit.adapters.files import CONFIG_NAME, WEIGHTS_NAME

    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing; an adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        raw = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{config_path} is not valid JSON: {err}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{config_path} must hold a JSON object, got {type(raw).__name__}")
    check_peft_scale(raw, str(config_path))  # a NaN or absurd alpha loads nowhere sanely: no verdict
    try:
        with safe_open(str(weights_path), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except Exception as err:  # safetensors raises its own error types for a bad header
        raise ValueError(f"{weights_path} is truncated or corrupt: {err}") from None
    return AdapterFacts(directory, raw, shapes)


def _inspect_base(facts: AdapterFacts, base: str | None) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from lorakit.base.models import DEFAULT_HUB_ID, default_model_path

    if not base:
        facts.base_note = "the adapter does not record its base model (pass --model)"
        return
    try:
        source = str(default_model_path()) if base == DEFAULT_HUB_ID else base
        if Path(source).expanduser().exists():
            source = str(Path(source).expanduser())
        config = AutoConfig.from_pretrained(source)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, FileNotFoundError) as err:
        facts.base_note = f"base model {base!r} could not be inspected ({str(err).splitlines()[0]}); pass --model"
        return
    facts_from_modules(facts, model)


def facts_from_modules(facts: AdapterFacts, model: nn.Module) -> None:
    """Fill in module kinds, vocabulary size and tying from a (meta or real) model."""
    from lorakit.adapters.layers import LoraLayer
    from lorakit.adapters.targets import unwrap_shell

    for path, module in model.named_modules():
        if isinstance(module, LoraLayer):
            module = unwrap_shell(module)
        if isinstance(module, nn.Linear):
            facts.module_kinds[path] = "linear"
        elif isinstance(module, nn.Embedding):
            facts.module_kinds[path] = "embedding"
        else:
            facts.module_kinds[path] = type(module).__name__
    config = getattr(model, "config", None)
    _per_expert_names(facts, model, getattr(config, "model_type", None))
    facts.vocab_size = getattr(config, "vocab_size", None)
    facts.model_type = getattr(config, "model_type", None)
    facts.tied_embeddings = bool(getattr(config, "tie_word_embeddings", False))


def _per_expert_names(facts: AdapterFacts, model: nn.Module, model_type: str | None) -> None:
    """The per-expert linear layers the model's checkpoints name (`convert --to per-expert` writes
    LoRA for them): servers that load those checkpoints expert by expert take them."""
    from lorakit.adapters.experts import expert_params_of
    from lorakit.export.per_expert import LAYOUTS

    if model_type not in LAYOUTS:
        return
    fused_path, *projections = LAYOUTS[model_type]
    for path, module in model.named_modules():
        if not path.endswith(".mlp.experts") or not expert_params_of(module):
            continue
        for e in range(int(getattr(module, "num_experts", 0))):
            for name in projections:
                facts.module_kinds[f"{path[: -len('mlp.experts')]}{fused_path}.{e}.{name}"] = "linear"


def facts_from_model(model: nn.Module, adapter_name: str = "default") -> AdapterFacts:
    """Facts for an adapter still on a model (as `lorakit train` sets it up), without copying weights."""
    from lorakit.adapters.embedding import LoraEmbedding
    from lorakit.adapters.experts import LoraExperts, file_prefixes
    from lorakit.adapters.files import adapter_config_dict
    from lorakit.adapters.layers import LoraLinear
    from lorakit.adapters.saved import ModulesToSave
    from lorakit.adapters.state import get_state

    shapes: dict[str, tuple[int, ...]] = {}
    for path in get_state(model).targets[adapter_name]:
        layer = model.get_submodule(path)
        key = PREFIX + path
        if isinstance(layer, LoraLinear):
            shapes[key + ".lora_A.weight"] = tuple(layer.lora_A[adapter_name].weight.shape)
            shapes[key + ".lora_B.weight"] = tuple(layer.lora_B[adapter_name].weight.shape)
            if layer.use_dora[adapter_name]:
                shapes[key + ".lora_magnitude_vector"] = (layer.out_features,)
        elif isinstance(layer, LoraEmbedding):
            shapes[key + ".lora_embedding_A"] = tuple(layer.lora_embedding_A[adapter_name].shape)
            shapes[key + ".lora_embedding_B"] = tuple(layer.lora_embedding_B[adapter_name].shape)
        elif isinstance(layer, LoraExperts):
            params = layer.targets[adapter_name]
            for param, prefix in file_prefixes(key, params, layer.expert_params).items():
                shapes[prefix + ".lora_A.weight"] = tuple(layer.lora_A[adapter_name][param].shape)
                shapes[prefix + ".lora_B.weight"] = tuple(layer.lora_B[adapter_name][param].shape)
    for path, module in model.named_modules():
        if isinstance(module, ModulesToSave) and adapter_name in module.modules_to_save:
            for pname, tensor in module.modules_to_save[adapter_name].state_dict().items():
                shapes[f"{PREFIX}{path}.{pname}"] = tuple(tensor.shape)
    facts = AdapterFacts(Path("."), adapter_config_dict(model, adapter_name), shapes)
    facts_from_modules(facts, model)
    return facts


# the rules ------------------------------------------------------------------------------


BUNDLED_BASE_NOTE = (
    "the bundled base is SmolLM2-135M-Instruct dequantized from a Q4_1 GGUF, not the original weights: "
    "a server loading the original fp16/bf16 weights (HuggingFaceTB/SmolLM2-135M-Instruct) gets slightly "
    "different logits than lorakit did"
)


def _common(facts: AdapterFacts, loader: str, convert_hint: bool = True) -> Iterable[Finding]:
    """What none of vLLM, SGLang and llama.cpp load: DoRA, modules_to_save, bias."""
    if facts.dora():
        yield Finding("dora", REFUSED, f"{loader} does not load DoRA adapters (lora_magnitude_vector); "
                      f"{convert_command(facts.directory)}, retrain without --use-dora, or merge the adapter "
                      "into the base (lorakit merge)")
    saved = facts.saved_modules()
    if saved:
        yield Finding("modules_to_save", REFUSED, f"{loader} loads LoRA weights only, not modules trained in full "
                      f"(modules_to_save: {', '.join(saved)}); merge the adapter into the base (lorakit merge)")
    if facts.bias():
        yield Finding("bias", REFUSED, f"{loader} does not load LoRA bias terms (bias / lora_bias in adapter_config.json)")


def _experts(facts: AdapterFacts, loader: str) -> Iterable[Finding]:
    """LoRA on fused mixture-of-experts parameters, in PEFT's target_parameters layout."""
    experts = facts.expert_modules()
    if experts:
        yield Finding("experts", REFUSED, (
            f"the adapter holds LoRA on fused expert parameters ({', '.join(facts.raw.get('target_parameters') or [])} "
            f"in {len(experts)} layer(s), PEFT's target_parameters layout); {loader} reads expert LoRA only as "
            "per-expert modules (experts.<e>.gate_proj ...), not this layout. `lorakit convert --to per-expert` "
            "writes it expert by expert under the names of the model's checkpoints (Qwen3-MoE, Qwen2-MoE, OLMoE, "
            "DeepSeek-V3, Mixtral), exactly; or serve it with lorakit serve, load it with PEFT, or merge it into "
            "the base (lorakit merge)"))


def _non_uniform(facts: AdapterFacts, loader: str) -> Iterable[Finding]:
    """rank_pattern / alpha_pattern: a loader that scales every module by lora_alpha / r."""
    scalings = facts.scalings()
    alpha, r = float(facts.raw.get("lora_alpha", 8)), int(facts.raw.get("r", 8))
    global_scale = alpha / (r**0.5 if facts.raw.get("use_rslora") else r)
    wrong = sorted(p for p, s in scalings.items() if abs(s - global_scale) > 1e-9 * max(1.0, abs(s)))
    if wrong:
        example = wrong[0]
        yield Finding("rank/alpha pattern", WARNS, (
            f"{loader} ignores rank_pattern / alpha_pattern and scales every module by lora_alpha / r = "
            f"{global_scale:g}; {len(wrong)} module(s) were trained at another scale (e.g. {example}: "
            f"{scalings[example]:g}), so their update would be scaled wrongly; retrain with one rank and alpha"))


def _targets(facts: AdapterFacts, loader: str) -> Iterable[Finding]:
    if facts.base_note:
        return
    vocab = facts.embedding_vocab()
    for path in sorted(facts.lora_modules()):
        kind = facts.module_kinds.get(path)
        if kind is None:
            yield Finding("targets", REFUSED, f"{path} is not a module of the base model ({facts.model_type}); "
                          f"{loader} would refuse the unexpected module (a different base model?)")
        elif kind == "embedding":
            if vocab.get(path) != facts.vocab_size:
                yield Finding("embedding", REFUSED, f"{path}: embedding LoRA over {vocab.get(path)} tokens, but the "
                              f"base vocabulary has {facts.vocab_size}; {loader} takes embedding LoRA only at the "
                              "base vocabulary size (no added tokens)")
        elif kind != "linear":
            yield Finding("targets", REFUSED, f"{path} is a {kind}; {loader} applies LoRA to linear layers "
                          "(and embeddings) only")


def _max_rank(facts: AdapterFacts) -> int:
    ranks = facts.lora_modules().values()
    return max(ranks) if ranks else int(facts.raw.get("r", 8))


def check_vllm(facts: AdapterFacts, name: str) -> tuple[list[Finding], str]:
    findings = [*_common(facts, VLLM), *_experts(facts, VLLM), *_non_uniform(facts, VLLM), *_targets(facts, VLLM)]
    top = _max_rank(facts)
    allowed = [r for r in VLLM_MAX_LORA_RANKS if r >= top]
    if not allowed:
        findings.append(Finding("rank", REFUSED, f"rank {top} is above the largest --max-lora-rank vLLM accepts "
                                f"({VLLM_MAX_LORA_RANKS[-1]}; accepted: {', '.join(map(str, VLLM_MAX_LORA_RANKS))})"))
        allowed = [VLLM_MAX_LORA_RANKS[-1]]
    command = (f"vllm serve {facts.base()} --enable-lora --max-lora-rank {allowed[0]} "
               f"--lora-modules {name}={facts.directory}")
    return findings, command


def check_sglang(facts: AdapterFacts, name: str) -> tuple[list[Finding], str]:
    findings = [*_common(facts, SGLANG), *_experts(facts, SGLANG), *_non_uniform(facts, SGLANG), *_targets(facts, SGLANG)]
    modules = sorted({p.rsplit(".", 1)[-1] for p in facts.lora_modules()})
    command = (f"python -m sglang.launch_server --model-path {facts.base()} --enable-lora "
               f"--lora-paths {name}={facts.directory} --max-lora-rank {_max_rank(facts)} "
               f"--lora-target-modules {' '.join(modules)}")
    return findings, command


def check_llama_cpp(facts: AdapterFacts, name: str) -> tuple[list[Finding], str]:
    from lorakit.export.gguf_lora import SUPPORTED_ARCHS

    findings = [*_common(facts, "llama.cpp"), *_experts(facts, "llama.cpp")]
    # llama.cpp reads one alpha for the file and each tensor's rank from its shape; lorakit's
    # exporter folds per-module alpha and rsLoRA into B, so every module keeps its trained scale.
    if not facts.base_note:
        if facts.model_type not in SUPPORTED_ARCHS:
            findings.append(Finding("architecture", REFUSED, f"lorakit export gguf-lora writes llama.cpp names for "
                                    f"{', '.join(SUPPORTED_ARCHS)}; this base is {facts.model_type!r}"))
        heads = [p for p in facts.lora_modules() if p.rsplit(".", 1)[-1] == "lm_head"]
        if heads and facts.tied_embeddings:
            findings.append(Finding("lm_head", REFUSED, "lm_head is tied to the token embeddings in this base; "
                                    "llama.cpp has no separate output tensor to adapt"))
        if facts.embedding_vocab() and facts.tied_embeddings:
            findings.append(Finding("embedding", REFUSED, "embedding LoRA on a base whose output layer shares the "
                                    "token embeddings: llama.cpp would adapt the output layer too"))
        findings += _targets(facts, "llama.cpp")
    command = f"lorakit export {facts.directory} --format gguf-lora --output {name}.gguf && llama-server -m BASE.gguf --lora {name}.gguf"
    return findings, command


def check_peft(facts: AdapterFacts, name: str) -> tuple[list[Finding], str]:
    findings = []
    outside = sorted(k for k in facts.shapes if not k.startswith(PREFIX))
    if outside:
        findings.append(Finding("keys", REFUSED, f"key {outside[0]!r} does not start with {PREFIX!r}; PEFT would "
                                "load nothing for it and leave the module unadapted"))
    command = ("python -c \"from transformers import AutoModelForCausalLM; from peft import PeftModel; "
               f"PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained('{facts.base()}'), '{facts.directory}')\"")
    return findings, command


CHECKS = {"vllm": check_vllm, "sglang": check_sglang, "llama.cpp": check_llama_cpp, "peft": check_peft}


def check(facts: AdapterFacts, targets: Iterable[str] = TARGETS, name: str | None = None) -> list[Verdict]:
    """One verdict per target."""
    name = name or facts.directory.resolve().name or "adapter"
    out = []
    for target in targets:
        if target not in CHECKS:
            raise ValueError(f"--target {target!r} is not one of {', '.join(TARGETS)}")
        findings, command = CHECKS[target](facts, name)
        if any(f.severity == REFUSED for f in findings):
            verdict = REFUSED
        elif findings:
            verdict = WARNS
        else:
            verdict = LOADS
        notes = [f"not checked against the base model: {facts.base_note}"] if facts.base_note and target != "peft" else []
        if verdict != REFUSED and _bundled_base(facts):
            notes.append(BUNDLED_BASE_NOTE)
        out.append(Verdict(target, verdict, findings, None if verdict == REFUSED else command, notes))
    return out


def _bundled_base(facts: AdapterFacts) -> bool:
    from lorakit.base.models import DEFAULT_HUB_ID

    return facts.raw.get("base_model_name_or_path") == DEFAULT_HUB_ID


def format_verdicts(verdicts: list[Verdict]) -> str:
    lines = []
    for v in verdicts:
        lines.append(f"{v.target}: {v.verdict}")
        lines += [f"  - {f.rule}: {f.reason}" for f in v.findings]
        lines += [f"  note: {n}" for n in v.notes]
        if v.command:
            lines.append(f"  serve it: {v.command}")
    return "\n".join(lines)


def parse_targets(text: str) -> list[str]:
    """'all' or a comma-separated list of targets."""
    if text.strip() == "all":
        return list(TARGETS)
    chosen = [t.strip() for t in text.split(",") if t.strip()]
    for t in chosen:
        if t not in TARGETS:
            raise ValueError(f"--target {t!r} is not one of {', '.join(TARGETS)} (or all)")
    if not chosen:
        raise ValueError(f"--target is empty; give one or more of {', '.join(TARGETS)}, or all")
    return chosen


def vllm_verdict_for_training(model: nn.Module, adapter_name: str = "default") -> str | None:
    """The vLLM verdict for the adapter a run is about to train, when it is not a clean one."""
    facts = facts_from_model(model, adapter_name)
    verdict = check(facts, ["vllm"], name="adapter")[0]
    if verdict.verdict == LOADS:
        return None
    return "these settings make an adapter that " + format_verdicts([verdict]).replace("vllm: ", f"{VLLM}: ", 1)
