"""The training recipe, top to bottom: setup, loss, evaluation, checkpoints, the loop.

One readable function (`train`) runs it all; nothing hides the loop. The parts are kept
apart so that they can be swapped or extended:

- `setup` builds model, data and optimizer;
- `compute_loss(model, batch)` is the one place the loss is computed (a fused kernel
  can replace it);
- micro-batch `i` of the run is a pure function of (seed, i) (`data.micro_batch`),
  so a resumed or sharded run can start anywhere;
- `save_checkpoint` / `load_checkpoint` hold everything a resumed run needs to end with
  the same adapter as an uninterrupted one: adapter, optimizer, scheduler, RNG states
  and the data position.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.adapters.coverage import coverage
from lorakit.adapters.files import load_adapter, read_adapter, save_adapter
from lorakit.adapters.inject import inject, trainable_parameters
from lorakit.base.models import DEFAULT_HUB_ID, default_device, default_dtype, load_model
from lorakit.base.quant import memory_report
from lorakit.base.templates import save_tokenizer
from lorakit.base.threads import tuner_for
from lorakit.data.sft import batches_per_epoch
from lorakit.export.check import vllm_verdict_for_training
from lorakit.train import distributed, objectives, sharded, watch
from lorakit.train.args import TrainArgs
from lorakit.train.checkpoint import load_checkpoint, rng_state, save_checkpoint
from lorakit.train.fastpath import enable_fast_path
from lorakit.train.memory import after_first_step, fit_for_training, piece_tokens
from lorakit.train.objectives import RolloutFactory
from lorakit.train.objectives.sft import to_device
from lorakit.train.precision import attention_in_fp32, autocast_dtype_for, cpu_has_native_bf16
from lorakit.train.run import Run
from lorakit.train.rundir import prepare_output, settings
from lorakit.train.runlog import format_record, log, plot_losses, progress_bar

CPU_MAX_TOKENS = 256
"""Tokens per piece of a micro-batch on a CPU: GEMMs of a few hundred rows run about as fast per
token, and activations stay small (bench/train_cpu.py: 512 in bf16 ran 10% faster at 1.4x the peak)."""


# setup ------------------------------------------------------------------------------------


def setup(args: TrainArgs, resume_from: Path | None = None, rollouts: RolloutFactory | None = None) -> Run:
    """Model with a fresh adapter (or the checkpoint's), data, optimizer and schedule.

    `rollouts(model, tokenizer)` builds what --objective grpo samples completions with.
    """
    device = torch.device(args.device) if args.device else None
    if distributed.launched_world_size() > 1 and device is None and torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    env = distributed.init(args.strategy, device or torch.device("cpu"))
    distributed.check_batch(args.batch_size, env)
    target = device or default_device()
    compute_dtype = autocast_dtype_for(args.precision, target)
    # The frozen base is held in the compute dtype: fp32, or bf16 under bf16 autocast (on a GPU,
    # load_model's own default, bf16 where supported).
    base_dtype = torch.float32 if compute_dtype is None else (compute_dtype if target.type == "cpu" else None)
    # Under FSDP2 a model directory is read shard by shard into a model built on the meta device.
    start_from = resume_from or (Path(args.init_adapter) if args.init_adapter else None)
    start_config = read_adapter(start_from).config if start_from is not None else args.lora_config()
    lazy_source, why = sharded.choose(args.model, env, start_config, args.quantize)
    objective = objectives.for_args(args, rollouts=rollouts)
    if lazy_source is not None and objective.second_adapter:
        lazy_source, why = None, "loading the whole model in every process: --reference init holds a second adapter"
    if env.strategy == "fsdp":
        log(f"FSDP2: {why}")
    if lazy_source is not None:
        model, tokenizer = sharded.build_meta(lazy_source, base_dtype or default_dtype(target), args.quantize)
        device = target
    else:
        model, tokenizer = load_model(args.model, device=device, dtype=base_dtype, quantize=args.quantize)
        device = next(model.parameters()).device
    train_data, eval_rows = objective.load_data(tokenizer)

    torch.manual_seed(args.seed)
    start_adapter: dict[str, torch.Tensor] = {}  # whole tensors for a shard-by-shard load
    if start_from is not None and lazy_source is not None:
        inject(model, start_config)
        start_adapter = sharded.checkpoint_adapter(read_adapter(start_from))
    elif start_from is not None:
        load_adapter(model, start_from, trainable=True)
    else:
        start_config.base_model_name_or_path = args.model or DEFAULT_HUB_ID
        inject(model, start_config)
        if env.is_main and (verdict := vllm_verdict_for_training(model)):
            log(verdict)  # said before the run, not after it
        if lazy_source is not None:
            start_adapter = sharded.initial_adapter(model, start_config, args.seed, device,
                                                    next(model.parameters()).dtype)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    objective.setup_model(model)
    fast, fitted = False, None  # --memory auto picks the fast path's settings (lorakit.train.memory)
    if args.fast_path and device.type == "cuda" and not getattr(objective, "fast_path", True):
        log(f"GPU fast path off: --objective {objective.name} runs the generic path")
    elif args.fast_path and device.type == "cuda" and (blocked := distributed.fast_path_blocked(env)):
        log(f"GPU fast path off: {blocked}")
    elif args.fast_path and device.type == "cuda":
        fitted = fit_for_training(model, device, "off" if env.enabled else args.memory, args.memory_limit,
                                  objective.batch_tokens(), args.seq_len)
        status = enable_fast_path(model, fitted.config if fitted else None)
        fast = status.enabled
        log(f"GPU fast path: {status.reason}" if status.enabled else f"GPU fast path off: {status.reason}")
    log(str(trainable_parameters(model)))
    log(coverage(model, "default").summary())
    train_rows, rows_per_batch = objective.plan(train_data, padding_free=fast and not env.enabled, env=env,
                                                budget_cap=fitted.choice.tokens if fitted else None)
    per_epoch = batches_per_epoch(len(train_rows), rows_per_batch) * getattr(objective, "updates_per_batch", 1)
    total = args.max_steps or max(1, math.ceil(args.epochs * per_epoch / args.grad_accum))
    warmup = args.warmup_steps if args.warmup_steps is not None else int(0.03 * total)
    run = Run(model, tokenizer, device, train_rows, eval_rows, total, min(warmup, total), env=env,
              rows_per_batch=rows_per_batch, memory=fitted, objective=objective)
    # Wrap before the optimizer is built: FSDP2 replaces the parameters by sharded ones.
    loss_module = objective.loss_module(model)
    run.loss_module = distributed.wrap(loss_module, env, device)
    if lazy_source is not None:
        held = sharded.materialize(model, lazy_source, env, device, start_adapter)
        log(f"FSDP2: this process holds {held:,} of the model's {sum(p.numel() for p in model.parameters()):,} values")
    if env.enabled:
        log(f"{env.strategy} across {env.world_size} processes: {args.batch_size // env.world_size} sequences each per micro-batch")
    run.optimizer = make_optimizer(model, args)
    run.scheduler = torch.optim.lr_scheduler.LambdaLR(run.optimizer, lr_lambda(args.schedule, run.warmup_steps, total))
    run.autocast_dtype = compute_dtype
    if run.autocast_dtype is None:
        log("precision: fp32")
    elif device.type == "cpu":
        fp32_attention = attention_in_fp32(model)
        why = "native bf16 on this CPU" if cpu_has_native_bf16() else "--precision bf16; this CPU emulates bf16"
        log(f"precision: bf16 base and autocast, fp32 adapter ({why}{'; attention in fp32' if fp32_attention else ''})")
    else:
        log("precision: bf16 autocast")
    return run


def make_optimizer(model: nn.Module, args: TrainArgs) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; with LoRA+, B gets lr * loraplus_ratio."""
    named = sorted((n, p) for n, p in model.named_parameters() if p.requires_grad)
    b_params = [p for n, p in named if ".lora_B." in n or n.endswith("lora_embedding_B")]
    b_ids = {id(p) for p in b_params}
    groups = [{"params": [p for _, p in named if id(p) not in b_ids], "lr": args.lr}]
    if b_params:
        groups.append({"params": b_params, "lr": args.lr * args.loraplus_ratio})
    return torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay, foreach=None)


def lr_lambda(schedule: str, warmup: int, total: int):
    """The multiplier of the peak learning rate at each step: linear warmup, then the schedule."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


# outputs ----------------------------------------------------------------------------------


def write_config(args: TrainArgs, run: Run, path: Path) -> None:
    import yaml

    resolved = asdict(args)
    # The file can be passed back as is (--config): a rerun neither resumes nor clears a directory
    # unless asked on its own command line; the `resolved` facts are accepted there and ignored.
    resolved.update(resume=False, overwrite=False)
    resolved["resolved"] = {
        "device": str(run.device),
        "total_steps": run.total_steps,
        "warmup_steps": run.warmup_steps,
        "train_sequences": len(run.train_rows),
        "autocast": str(run.autocast_dtype) if run.autocast_dtype else "fp32",
        "lorakit_targets": args.lora_config().target_modules,
    }
    path.write_text(yaml.safe_dump(resolved, sort_keys=False))


# the loop ---------------------------------------------------------------------------------


def train(args: TrainArgs, rollouts: RolloutFactory | None = None) -> Path:
    """Run the whole recipe; returns the output directory (which holds the final adapter).

    `rollouts(model, tokenizer)` builds the rollout source --objective grpo samples with
    (`lorakit train` passes the serving engine's, `lorakit.serve.rollouts.Rollouts`).
    """
    from dataclasses import replace

    args = replace(args, resolved=None)  # a --config file's recorded facts are not options
    began = time.perf_counter()
    output = Path(args.output)
    resume_from, run_id = prepare_output(args)  # one run per directory (rundir.py)
    output.mkdir(parents=True, exist_ok=True)
    if resume_from is not None:
        log(f"resuming from {resume_from}")
    elif args.resume:
        log(f"--resume: no checkpoint in {output}; starting from scratch")

    run = setup(args, resume_from, rollouts)
    model, optimizer, scheduler, env = run.model, run.optimizer, run.scheduler, run.env
    loss_module = run.loss_module
    assert optimizer is not None and scheduler is not None and loss_module is not None
    pad_id = run.tokenizer.pad_token_id
    objective = run.objective
    eval_every = args.eval_every or max(1, run.total_steps // 5)
    save_every = args.save_every or eval_every
    per_epoch = batches_per_epoch(len(run.train_rows), run.rows_per_batch) * getattr(objective, "updates_per_batch", 1)
    max_tokens = None
    if not env.enabled:
        max_tokens = piece_tokens(run.memory, args.max_tokens or (CPU_MAX_TOKENS if run.device.type == "cpu" else None))

    state: dict[str, Any] = {"best_eval_loss": None, "evals_without_improvement": 0,
                             "run_id": run_id, "settings": settings(args)}
    start = 0
    metrics_path = output / "metrics.jsonl"
    if resume_from is not None:
        state = load_checkpoint(run, resume_from)
        start = state["step"]
        if start >= run.total_steps:  # nothing left: the final adapter stays as it is
            log(f"the run in {output} is already complete (step {start} of {run.total_steps}); nothing to train")
            distributed.barrier(run.env)
            distributed.cleanup(run.env)
            return output
        # Drop metrics logged after the checkpoint (an interrupted run may have logged more).
        if metrics_path.exists() and env.is_main:
            kept = [line for line in metrics_path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= start]
            metrics_path.write_text("".join(line + "\n" for line in kept))
    elif metrics_path.exists() and env.is_main:
        metrics_path.unlink()
    if env.is_main:
        write_config(args, run, output / "train_config.yaml")
    watcher = watch.Watch(args, run, output, start)  # samples, task metric, forgetting, best/, trackers

    model.train()
    step = start
    window_loss, window_count, window_tokens, window_time = 0.0, 0, 0, 0.0
    steps_time = 0.0  # the optimizer steps alone: what the rest of the run costs is measured against it
    stop_reason = "done"
    progress = progress_bar(enabled=env.is_main)
    task = progress.add_task("train", total=run.total_steps, completed=start, loss=float("nan"), tps=0.0)
    progress.start()
    rng_at_step = rng_state()  # a checkpoint at `step` restarts from exactly this state
    in_step = False
    tuner = tuner_for(run.device, env.enabled, log)  # CPU threads by measurement (threads.py)
    try:
        while step < run.total_steps:
            t0 = time.perf_counter()
            # One optimizer step = grad_accum micro-batches; micro-batch i is a function of (seed, i),
            # and each process takes its own rows of it (all of them in a single-process run).
            # On one CPU process each micro-batch runs in pieces of at most max_tokens tokens (same
            # update, a fraction of the activation memory); GEMMs of a few hundred rows are as fast
            # per token on a CPU. Sharded runs keep whole micro-batches (same backward count per rank).
            batches = objective.step_batches(run.train_rows, run.rows_per_batch, step, env, pad_id, max_tokens)
            # Normalise by the supervised tokens of the whole step on all processes, so accumulation
            # and sharding both equal one big batch. DDP and FSDP2 average gradients over processes,
            # hence the factor world_size.
            local_count = sum(objective.count(b) for b in batches)  # supervised tokens, or pairs
            local_tokens = sum(int((b["input_ids"] != pad_id).sum()) for b in batches)  # for tokens/s
            step_count, step_tokens = (int(v) for v in distributed.all_sum([local_count, local_tokens], env))
            objective.prepare_step(batches, step_count, env)
            step_loss = 0.0
            in_step = True
            for batch in batches:
                batch = to_device(batch, run.device)
                with torch.autocast(run.device.type, dtype=run.autocast_dtype or torch.float32,
                                    enabled=run.autocast_dtype is not None):
                    loss_sum = loss_module(batch)
                (loss_sum * env.world_size / max(step_count, 1)).backward()
                step_loss += loss_sum.item()
            step_loss = distributed.all_sum([step_loss], env)[0]
            if run.memory is not None and step == start:  # --memory auto: measured, chosen again
                after_first_step(run.memory, run.device, max(b["input_ids"].numel() for b in batches))
            if args.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]],
                                               args.max_grad_norm)
            optimizer.step()
            lr_used = scheduler.get_last_lr()[0]
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            in_step = False
            step += 1
            rng_at_step = rng_state()  # nothing below draws random numbers before the next step
            window_time += (elapsed := time.perf_counter() - t0)
            steps_time += elapsed
            if tuner is not None:
                tuner.after_step(step_tokens, elapsed)
            window_loss += step_loss
            window_count += step_count
            window_tokens += step_tokens
            tps = window_tokens / max(window_time, 1e-9)
            progress.update(task, completed=step, loss=step_loss / max(step_count, 1), tps=tps)

            record: dict[str, Any] = {}
            if step % args.log_every == 0 or step == run.total_steps:
                record.update(loss=window_loss / max(window_count, 1), tokens_per_s=round(tps, 1))
                record.update(objective.train_stats(loss_module, env))
                memory = memory_report(model, optimizer)
                record.update(memory.as_dict())
                if step - start <= args.log_every and env.is_main:
                    progress.console.print(str(memory))
                window_loss, window_count, window_tokens, window_time = 0.0, 0, 0, 0.0
            evaluated = run.eval_rows is not None and (step % eval_every == 0 or step == run.total_steps)
            if evaluated:
                record.update(objective.evaluate(run, loss_module, pad_id))
                eval_loss = record["eval_loss"]
                record.update(watcher.evaluate(step, progress.console))
                best = state["best_eval_loss"]
                if best is None or eval_loss < best:
                    state["best_eval_loss"], state["evals_without_improvement"] = eval_loss, 0
                else:
                    state["evals_without_improvement"] += 1
            if record and env.is_main:
                record = {"step": step, "epoch": round(step * args.grad_accum / per_epoch, 4),
                          "lr": lr_used, **record}
                with metrics_path.open("a") as f:
                    f.write(json.dumps(record) + "\n")
                progress.console.print(format_record(record, run.total_steps))
                watcher.logged(record, state)
            stopping = (evaluated and args.early_stopping is not None
                        and state["evals_without_improvement"] >= args.early_stopping)
            if step % save_every == 0 or step == run.total_steps or stopping:
                save_checkpoint(run, output, step, state, rng_state(), args.keep_checkpoints)
            if stopping:
                stop_reason = f"early stopping: no better eval_loss in {args.early_stopping} evaluations"
                break
    except KeyboardInterrupt:
        # A half-done step is dropped: the checkpoint holds the state as of the start of `step`.
        progress.stop()
        if in_step:
            optimizer.zero_grad(set_to_none=True)
        if step > start or resume_from is None:
            path = save_checkpoint(run, output, step, state, rng_at_step, args.keep_checkpoints)
            log(f"interrupted at step {step}: saved {path}; continue with --resume")
        raise
    finally:
        progress.stop()
        if tuner is not None:
            tuner.close()
        if hasattr(objective, "close"):
            objective.close()

    save_adapter(model, output, write=env.is_main)
    if env.is_main:  # the template travels with the adapter (lorakit.base.templates)
        save_tokenizer(run.tokenizer, output)
    log(str(memory_report(model, optimizer)))
    if metrics_path.exists() and env.is_main:
        plot_losses(metrics_path, output / "loss.png", watcher.plotted)
    watcher.close(adapter=output)
    log(f"{stop_reason} at step {step}: adapter saved to {output} ({steps_time:.1f} s in {step - start} optimizer "
        f"steps, {time.perf_counter() - began:.1f} s in all)")
    distributed.barrier(env)
    distributed.cleanup(env)
    return output
