"""What a training run watches at each evaluation besides the loss, and where it reports it.

    --eval-samples N      N greedy answers to held-out prompts: samples.jsonl and a console table
    --metric SPEC         a task metric on the held-out answers (lorakit.evaluation.metrics), logged as SPEC's name
    --save-best KEY       keep the adapter of the best evaluation so far in OUTPUT/best/
    --track-forgetting    KL to the base (the same weights, adapter disabled) on the base's own
                          greedy continuations of lorakit's general prompts (lorakit.compare)
    --report-to LIST      records to TensorBoard / MLflow / W&B (lorakit.train.track)

The training recipe calls `Watch` at three points: after an evaluation (`evaluate`), after a
record is written (`logged`) and at the end (`finish` / `close`).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorakit.evaluation.metrics import check_references, greedy_answers, load_prompts, parse_metric
from lorakit.train.track import Trackers, parse_report_to

if TYPE_CHECKING:
    from lorakit.train.args import TrainArgs
    from lorakit.train.run import Run

FORGETTING_PROMPTS_TOKENS = 32
"""Length of the base's continuations that --track-forgetting measures KL on."""


def best_direction(key: str) -> str:
    return "min" if key in ("eval_loss", "kl") else "max"


class Watch:
    """Samples, task metric, forgetting, the best adapter and the trackers of one run."""

    def __init__(self, args: TrainArgs, run: Run, output: Path, start: int) -> None:
        from lorakit.train.runlog import log

        self.args, self.run, self.output = args, run, output
        self.metric = parse_metric(args.metric) if args.metric else None
        wanted = bool(args.eval_samples or self.metric or args.track_forgetting)
        if run.env.enabled and (wanted or args.save_best):
            raise ValueError("--eval-samples, --metric, --save-best and --track-forgetting run in a "
                             "single process; drop them under torchrun (--report-to works there)")
        self.prompts = []
        if self.args.eval_data and (args.eval_samples or self.metric):
            count: int | None = args.eval_samples
            if self.metric:  # the metric runs on the whole eval set unless --metric-rows says less
                count = None if args.metric_rows is None else max(args.metric_rows, args.eval_samples)
            self.prompts = load_prompts(args.eval_data, run.tokenizer, count)
            if self.metric:
                check_references(self.metric, self.prompts, args.eval_data)
            # Answers as long as the longest reference, and a little more.
            longest = max(len(run.tokenizer(p.reference, add_special_tokens=False)["input_ids"]) for p in self.prompts)
            self.answer_tokens = min(args.seq_len, longest + 8)
        self.reference = None
        if args.track_forgetting:
            from lorakit.adapters.inject import disable_adapters
            from lorakit.evaluation.measure import general_prompts, generated_reference

            with disable_adapters(run.model):
                self.reference = generated_reference(run.model, run.tokenizer, general_prompts(),
                                                     FORGETTING_PROMPTS_TOKENS, sampled=0,
                                                     autocast_dtype=run.autocast_dtype)
            log(f"forgetting: KL to the base on its own continuations of {len(self.reference.rows)} general prompts")
        self.samples_path = output / "samples.jsonl"
        if run.env.is_main:
            _drop_after(self.samples_path, start)
        self.trackers = None
        if run.env.is_main and parse_report_to(args.report_to):
            self.trackers = Trackers(parse_report_to(args.report_to), output, asdict(args))
            log(self.trackers.describe())

    @property
    def plotted(self) -> list[str]:
        """Record keys loss.png shows beside the losses."""
        return ([self.metric.name] if self.metric else []) + (["kl"] if self.reference else [])

    def evaluate(self, step: int, console: Any) -> dict[str, float]:
        """Samples, the metric and KL at one evaluation: the values to add to its record."""
        out: dict[str, float] = {}
        model, tokenizer = self.run.model, self.run.tokenizer
        if self.prompts:
            answers = greedy_answers(model, tokenizer, [p.ids for p in self.prompts], self.answer_tokens,
                                     self.args.batch_size, self.run.autocast_dtype)
            if self.metric:
                out[self.metric.name] = self.metric.mean(answers, [p.reference for p in self.prompts])
            shown = list(zip(self.prompts, answers, strict=True))[: self.args.eval_samples]
            if shown and self.run.env.is_main:
                with self.samples_path.open("a") as f:
                    for prompt, answer in shown:
                        row = {"step": step, "prompt": prompt.text, "reference": prompt.reference, "output": answer}
                        if self.metric:
                            row[self.metric.name] = float(self.metric.score(answer, prompt.reference))
                        f.write(json.dumps(row) + "\n")
                console.print(_table(step, shown))
        if self.reference is not None:
            from lorakit.evaluation.measure import divergence

            [div] = divergence(model, self.reference.rows, [_active(model)],
                               tokenizer.pad_token_id, self.args.batch_size, self.run.autocast_dtype)
            out.update(kl=div.kl_mean, kl_p95=div.kl_p95, agreement=div.agreement)
        return out

    def logged(self, record: dict[str, Any], state: dict[str, Any]) -> None:
        """After a record is written: trackers, and the best adapter so far."""
        if self.trackers is not None:
            self.trackers.log(record)
        key = self.args.save_best
        if key is None or key not in record:
            return
        value, best = record[key], state.get("best")
        better = best is None or (value < best["value"] if best_direction(key) == "min" else value > best["value"])
        if better:
            save_best(self.run.model, self.output, {"metric": key, "value": value, "step": record["step"]})
            state["best"] = {"metric": key, "value": value, "step": record["step"]}

    def close(self, adapter: Path | None = None, failed: bool = False) -> None:
        if self.trackers is not None:
            self.trackers.close(adapter, failed)


def _active(model: Any) -> str:
    from lorakit.adapters.inject import active_adapters

    return active_adapters(model)[0]


def save_best(model: Any, output: Path, info: dict[str, Any]) -> Path:
    """The adapter as it is now, in OUTPUT/best/ with best.json; replaced whole (temporary name, renamed)."""
    from lorakit.adapters.files import save_adapter

    final, tmp, old = output / "best", output / ".best.tmp", output / ".best.old"
    shutil.rmtree(tmp, ignore_errors=True)
    save_adapter(model, tmp)
    (tmp / "best.json").write_text(json.dumps(info, indent=2) + "\n")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def _drop_after(path: Path, step: int) -> None:
    """A resumed run keeps the samples up to its checkpoint; a fresh run starts the file anew."""
    if not path.exists():
        return
    if step == 0:
        path.unlink()
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


def _table(step: int, shown: list) -> Any:
    from rich.table import Table

    table = Table(title=f"samples at step {step}", show_lines=False, title_justify="left")
    for column in ("prompt", "reference", "output"):
        table.add_column(column, overflow="ellipsis", no_wrap=True, max_width=48)
    for prompt, answer in shown:
        table.add_row(prompt.text, prompt.reference, answer)
    return table
