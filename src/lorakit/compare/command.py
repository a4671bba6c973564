"""`lorakit compare`: adapters side by side against their base, on one loaded model."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorakit.evaluation.measure import Divergence

if TYPE_CHECKING:
    from lorakit.adapters.files import AdapterFiles
    from lorakit.base.threads import ThreadTuner
    from lorakit.evaluation.metrics import Metric


@dataclass
class CompareArgs:
    """What adapters learned (task loss and metric) and what they forgot (KL from the base)."""

    adapter: list[str] = field(default_factory=list)
    """Adapter or checkpoint directories to compare (repeat the option for several)."""
    model: str | None = None
    """Base model: a local transformers directory or a hub id; omitted: the bundled SmolLM2-135M-Instruct."""
    data: str | None = None
    """Task data with answers (prompt/completion or messages rows): task loss and --metric, base vs adapters."""
    metric: str = "exact"
    """Task metric on --data: exact, json, regex:PATTERN or MODULE:FUNCTION (lorakit.evaluation.metrics)."""
    task_rows: int | None = None
    """Rows of --data the metric generates answers for (default: all)."""
    reference: str | None = None
    """Reference text file (any data format train reads; measured where train puts the loss); default:
    the base model's own greedy and sampled continuations of lorakit's general prompts."""
    prompts: int | None = None
    """How many of the general prompts to continue (default: all 24)."""
    sampled: int = 1
    """Sampled continuations per general prompt, beside the greedy one."""
    max_new_tokens: int = 64
    """Length of each continuation of a general prompt (and of each task answer)."""
    kl_threshold: float = 1.0
    """Mean KL (nats per token) above which the headline flags general behaviour as changed (1.0: on
    the bundled model the demo adapter measures 0.56, one trained at 10x its learning rate 2.5)."""
    output: str | None = None
    """Directory for report.json and report.html (default: the first adapter's directory); report files
    there that compare did not write are refused unless --overwrite."""
    overwrite: bool = False
    """Replace a report.json or report.html in --output that is not an earlier compare report."""
    show: int = 4
    """Generations shown side by side in report.html (base vs each adapter)."""
    batch_size: int = 8
    """Sequences per forward pass."""
    answer_batch_size: int = 32
    """Prompts per batch when generating the task answers for --metric (generating is bound by the
    steps it takes more than by their size, so larger batches take less time)."""
    seq_len: int = 1024
    """Maximum tokens per row of --data and --reference."""
    seed: int = 0
    """Seed for the sampled continuations."""
    shipped_reference: bool = True
    """On the bundled model (fp32, CPU) at these defaults, read its continuations of the general prompts
    from the copy lorakit ships instead of generating them again (the same tokens, checked by
    `make test-experiment`); false: always generate."""
    quantize: str | None = None
    """Quantize the frozen base while loading: nf4 or int8."""
    device: str | None = None
    """cpu, cuda, ... (default: cuda when available)."""

    def __post_init__(self) -> None:
        from lorakit.evaluation.metrics import parse_metric

        if isinstance(self.adapter, str):
            self.adapter = [self.adapter]
        if not self.adapter:
            raise ValueError("give at least one --adapter DIR (an adapter or a checkpoint directory)")
        for name in ("sampled", "show"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("max_new_tokens", "batch_size", "answer_batch_size", "seq_len", "prompts", "task_rows"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if not self.kl_threshold > 0:
            raise ValueError(f"--kl-threshold must be > 0 (nats per token), got {self.kl_threshold!r}")
        parse_metric(self.metric)


def headline(name: str, div: Divergence, threshold: float, task: dict[str, Any] | None = None) -> str:
    """One line a user can act on: how far the adapter moved, and what it gained."""
    kept = div.kl_mean <= threshold
    verdict = "general behaviour kept" if kept else f"past --kl-threshold {threshold:g}: general behaviour changed, read the samples"
    line = (f"{name}: KL {div.kl_mean:.3f} nats/token (p95 {div.kl_p95:.3f}), top-1 agreement {div.agreement:.0%}, "
            f"perplexity of the base's text {div.perplexity_base:.2f} -> {div.perplexity_adapted:.2f}: {verdict}")
    if task is not None:
        line += f"; task {task['metric_name']} {task['base']:.0%} -> {task['adapted']:.0%}"
    return line


REPORT_FILES = ("report.json", "report.html")
HTML_TITLE = b"<title>lorakit compare</title>"
"""What the head of a report.html that compare wrote holds (lorakit.compare.report.render_html)."""


def _is_report(path: Path) -> bool:
    """Whether `path` is a report compare wrote (replaced without --overwrite)."""
    import json

    try:
        if path.name == "report.html":
            with path.open("rb") as f:
                return HTML_TITLE in f.read(512)
        if path.stat().st_size > 256 * 2**20:
            return False
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and {"adapters", "reference", "kl_threshold"} <= data.keys()


def report_dir(args: CompareArgs) -> Path:
    """The directory report.json and report.html go to, checked before anything is measured:
    neither file may be an input, nor a file compare did not write (unless --overwrite)."""
    from lorakit.adapters.files import CONFIG_NAME, WEIGHTS_NAME
    from lorakit.adapters.outputs import check_not_input, input_paths

    output = Path(args.output) if args.output else Path(args.adapter[0])
    if output.exists() and not output.is_dir():
        raise ValueError(f"--output {output} is a file; compare writes report.json and report.html into a directory")
    inputs = input_paths(("--model", args.model), ("--data", args.data), ("--reference", args.reference))
    inputs += [(f"a file of --adapter {a}", Path(a) / name) for a in args.adapter for name in (CONFIG_NAME, WEIGHTS_NAME)]
    for name in REPORT_FILES:
        path = output / name
        check_not_input(path, inputs)
        if path.exists() and not args.overwrite and not (path.is_file() and _is_report(path)):
            raise ValueError(f"--output {output} holds a {name} that lorakit compare did not write; pass "
                             "--overwrite to replace it, or pick another --output")
    return output


def _label(path: str, taken: set[str]) -> str:
    p = Path(path)
    label = f"{p.parent.name}/{p.name}" if p.name.startswith("checkpoint-") else p.name or str(p)
    if label in taken:
        label = str(p)
    taken.add(label)
    return label


def compare(args: CompareArgs) -> dict[str, Any]:
    """Measure, write report.json and report.html, and return the report."""
    from lorakit.adapters.files import read_adapter
    from lorakit.base.models import load_model
    from lorakit.base.threads import tuner_for
    from lorakit.evaluation.metrics import parse_metric
    from lorakit.train.runlog import log

    metric = parse_metric(args.metric)
    files = [read_adapter(a) for a in args.adapter]  # every adapter is checked before the model loads
    report_dir(args)
    model, tokenizer = load_model(args.model, device=args.device, quantize=args.quantize)
    # On a CPU shared with other busy processes, torch's full thread pool can run many times
    # slower than one thread: measure, as train does (threads.py), and again before each phase.
    tuner = tuner_for(next(model.parameters()).device, False, log)
    try:
        return _measure_and_write(args, metric, files, model, tokenizer, tuner)
    finally:
        if tuner is not None:
            tuner.close()


def _measure_and_write(args: CompareArgs, metric: Metric, files: list[AdapterFiles], model: Any, tokenizer: Any,
                       tuner: ThreadTuner | None) -> dict[str, Any]:
    import torch

    from lorakit.adapters.files import load_adapter
    from lorakit.adapters.inject import disable_adapters, set_adapter
    from lorakit.adapters.outputs import staged_files
    from lorakit.compare.report import write_report
    from lorakit.evaluation.measure import (
        continue_prompts,
        divergence,
        file_reference,
        general_prompts,
        generated_reference,
        prompt_ids,
        reference_settings,
        shipped_reference,
    )
    from lorakit.evaluation.metrics import check_references, greedy_answers, load_prompts
    from lorakit.train.objectives.sft import evaluate
    from lorakit.train.runlog import log

    def next_phase() -> None:
        if tuner is not None:
            tuner.choose("next phase")

    pad = tokenizer.pad_token_id
    task_prompts = None
    if args.data:
        task_prompts = load_prompts(args.data, tokenizer, args.task_rows)
        check_references(metric, task_prompts, args.data)

    # The reference text comes from the base before any adapter is loaded.
    general = general_prompts(args.prompts)
    if args.reference:
        reference = file_reference(args.reference, tokenizer, args.seq_len)
        source = f"{args.reference} ({len(reference.rows)} rows)"
    else:
        shipped = None
        param = next(model.parameters())
        if args.shipped_reference and args.model is None and args.quantize is None and param.device.type == "cpu" \
                and param.dtype == torch.float32:
            shipped = shipped_reference(tokenizer, reference_settings(general, args.max_new_tokens, args.sampled, 1.0,
                                                                      args.seed, args.batch_size))
        how = f"{len(general)} general prompts (1 greedy + {args.sampled} sampled each, up to {args.max_new_tokens} tokens)"
        if shipped is not None:
            log(f"reference text: the bundled model's continuations of {how}, as lorakit ships them")
            reference = shipped
        else:
            log(f"reference text: the base's continuations of {how}")
            reference = generated_reference(model, tokenizer, general, args.max_new_tokens, args.sampled,
                                            seed=args.seed, batch_size=args.batch_size)
        source = f"the base's own continuations of {len(general)} general prompts (1 greedy + {args.sampled} sampled)"
    taken: set[str] = set()
    labels = [_label(a, taken) for a in args.adapter]
    names = [f"adapter{i}" for i in range(len(files))]
    for name, adapter_files in zip(names, files, strict=True):
        load_adapter(model, adapter_files, adapter_name=name)

    next_phase()
    log(f"measuring KL, perplexity and agreement on {sum(1 for _ in reference.rows)} reference rows")
    divergences = divergence(model, reference.rows, names, pad, args.batch_size)

    generations = []
    if not args.reference and args.show:
        shown = general[: args.show]
        ids = [prompt_ids(tokenizer, p["messages"]) for p in shown]
        per_adapter = {}
        for name, label in zip(names, labels, strict=True):
            set_adapter(model, name)
            conts = continue_prompts(model, tokenizer, ids, args.max_new_tokens, batch_size=args.batch_size)
            per_adapter[label] = [tokenizer.decode(c, skip_special_tokens=True).strip() for c in conts]
        for i, p in enumerate(shown):
            generations.append({"prompt": p["messages"][-1]["content"], "base": reference.continuations[i],
                                "adapters": {label: per_adapter[label][i] for label in labels}})

    task: dict[str, Any] | None = None
    if task_prompts is not None:
        from lorakit.data.sft import as_sequences, load_examples

        rows = as_sequences(load_examples(args.data, tokenizer, args.seq_len)[0], args.seq_len, False)
        references = [p.reference for p in task_prompts]
        ids = [p.ids for p in task_prompts]
        device = next(model.parameters()).device
        next_phase()
        log(f"task: loss on {len(rows)} rows of {args.data}, {metric.name} on {len(ids)} generated answers")
        with disable_adapters(model):
            base_loss = evaluate(model, rows, args.batch_size, pad, device)[0]
            base_answers = greedy_answers(model, tokenizer, ids, args.max_new_tokens, args.answer_batch_size)
        task = {"data": args.data, "metric": metric.spec, "metric_name": metric.name, "rows": len(ids),
                "base": {"loss": base_loss, "metric": metric.mean(base_answers, references)}, "adapters": {}}
        answers = {}
        for name, label in zip(names, labels, strict=True):
            set_adapter(model, name)
            loss = evaluate(model, rows, args.batch_size, pad, device)[0]
            answers[label] = greedy_answers(model, tokenizer, ids, args.max_new_tokens, args.answer_batch_size)
            task["adapters"][label] = {"loss": loss, "metric": metric.mean(answers[label], references)}
        task["samples"] = [{"prompt": p.text, "reference": p.reference, "base": base_answers[i],
                            "adapters": {label: answers[label][i] for label in labels}}
                           for i, p in enumerate(task_prompts[: args.show])]

    adapters = []
    for path, label, div in zip(args.adapter, labels, divergences, strict=True):
        entry: dict[str, Any] = {"name": label, "path": str(path), **div.as_dict(),
                                 "verdict": "kept" if div.kl_mean <= args.kl_threshold else "changed"}
        summary = None
        if task is not None:
            entry["task_loss"] = task["adapters"][label]["loss"]
            entry["task_metric"] = task["adapters"][label]["metric"]
            summary = {"metric_name": metric.name, "base": task["base"]["metric"], "adapted": entry["task_metric"]}
        entry["headline"] = headline(label, div, args.kl_threshold, summary)
        adapters.append(entry)
    report = {
        "base_model": args.model or "SmolLM2-135M-Instruct (bundled)",
        "reference": {"source": source, "rows": len(reference.rows), "tokens": divergences[0].tokens},
        "kl_threshold": args.kl_threshold,
        "adapters": adapters,
        "task": task,
        "generations": generations,
        "torch_threads": torch.get_num_threads(),
    }
    with staged_files(report_dir(args), "compare") as staging:
        write_report(report, staging)
    return report


def run_compare(args: CompareArgs) -> None:
    report = compare(args)
    output = Path(args.output) if args.output else Path(args.adapter[0])
    for entry in report["adapters"]:
        print(entry["headline"])
    print(f"report: {output / 'report.json'} and {output / 'report.html'}")
