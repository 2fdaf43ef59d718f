"""The training loop of one rank, built from a RunPlan (asr_dist.plan): DeepSpeed, steps, evaluation, checkpoints.

  RunPlan ──> TrainLoader of this rank, the model (its family's), deepspeed.initialize, TrainState
  loop, one optimizer step at a time:
      next step's micro-batches (accumulation of them) ──train_step (asr_dist.step)──> loss sums, audio
      ──> every optimizer step: watchdog beat, skipped-step watch, preemption agreement (one tiny all-reduce)
      ──> every log_every:         mean loss over ranks, lr, grad norm, loss scale, throughput -> TensorBoard + JSONL
      ──> every eval.every_steps:  exact distributed loss / WER / CER per eval set (and per group of each
                                   eval.group_by field), pooled over the sets -> TensorBoard + JSONL + eval_results.json
      ──> every checkpoint_every:  DeepSpeed checkpoint + the TrainState of every rank (asr_dist.state)
  end ──> final evaluation, checkpoint, Hugging Face export (model + processor + model card)

{output_dir}/config.yaml is the resolved config that ran; a resume names every key that differs from it.
Each part reads on its own: the DeepSpeed JSON in asr_dist.deepspeed_config, the evaluations in
asr_dist.evaluation.TrainingEvaluation, saves and resume in asr_dist.checkpoint.Checkpointer, the model in
its family (asr_dist.models). Training is counted in optimizer steps. Only rank 0 writes logs and exports;
every rank takes part in saves and in the collectives.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import math
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from . import checkpoint as ckpt
from .config import Config, ConfigError, config_diff, to_dict, to_yaml
from .data.index import ShardError
from .deepspeed_config import check_layerdrop
from .distributed import DistEnv, Heartbeat, device_index, get_env, init_process_group, shutdown
from .errors import TrainingError
from .evaluation import TrainingEvaluation
from .flops import peak_flops, train_flops_per_audio_second
from .logging import MetricWriter, setup_logging
from .models import build_model
from .plan import CONFIG_NAME, RunPlan, plan_run
from .state import TrainState, early_stop, ranking_key, score
from .step import NonFiniteStep, StepSpec, forward, keys_text, train_step
from .watchdog import Watchdog

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 75  # the job was asked to stop, saved, and can be requeued


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ───────────────────────────── the run ─────────────────────────────


class Preemption:
    """SIGTERM / SIGUSR1 set a flag; ranks agree on it at every step boundary, over a host (gloo) group: an
    all-reduce on the GPU would wait for the step's kernels, a host sync at every step."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        log.warning("received %s: saving at the next step boundary", signal.Signals(signum).name)
        self.requested = True

    def agreed(self, world_size: int, group=None) -> bool:
        """Whether any rank was asked to stop; ``group``: a gloo group of every rank (None: the default group,
        which must then be gloo)."""
        if world_size == 1:
            return self.requested
        flag = torch.tensor([1 if self.requested else 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        return bool(flag.item())


class StepProfiler:
    """``train.profile_steps: [first, last]``: torch.profiler over those optimizer steps (data wait,
    forward, backward, DeepSpeed's step), then a Chrome/Perfetto trace per rank and a table of the ops
    and kernels that took the most time, under {output_dir}/profile/. Steps counted like max_steps."""

    def __init__(self, steps: list, out: Path, rank: int, device: torch.device):
        self.first, self.last = steps or (0, -1)  # []: no step is in the window
        self.out, self.rank, self.device = out / "profile", rank, device
        self.prof, self.started_at = None, None

    def maybe_start(self, step: int) -> None:
        """``step``: optimizer steps done; starts before step ``first`` (or later ones, after a resume)."""
        if self.prof is not None or not self.first - 1 <= step < self.last:
            return
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        self.prof = profile(activities=activities, record_shapes=True)
        self.prof.start()
        self.started_at = step + 1

    def maybe_stop(self, step: int, final: bool = False) -> None:
        """After optimizer step ``step``; ``final``: the run's last step (a profile ends with it)."""
        if self.prof is None or (step < self.last and not final):
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.prof.stop()
        self.out.mkdir(parents=True, exist_ok=True)
        name = f"rank{self.rank}-steps{self.started_at}-{step}"
        self.prof.export_chrome_trace(str(self.out / f"{name}.json"))
        sort = "self_device_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        table = self.prof.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=70)
        (self.out / f"{name}-top.txt").write_text(
            f"optimizer steps {self.started_at}-{step} on rank {self.rank} ({self.device}), sorted by {sort}\n{table}\n")
        if self.rank == 0:
            log.info("profile of steps %d-%d: %s (trace: open %s in Perfetto or chrome://tracing)",
                     self.started_at, step, self.out / f"{name}-top.txt", self.out / f"{name}.json")
        self.prof = None


class Trainer:
    """One rank's training run, built from the run's plan. The loop reads as: the next step's micro-batches
    → ``train_step`` → log → evaluate → checkpoint → preemption check."""

    def __init__(self, plan: RunPlan, denv: DistEnv, preemption: Preemption | None = None):
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        cfg = plan.cfg
        self.plan, self.cfg, self.denv = plan, cfg, denv
        self.out = Path(cfg.output_dir)
        self.rank, self.world = denv.rank, denv.world_size
        self.shards, self.family = plan.shards, plan.family
        # the evaluation sets' loaders and groups, read (sample JSON only) before any model work
        self.writer = MetricWriter(self.out, enabled=denv.is_main, sinks=cfg.log.trackers)
        self.evaluation = TrainingEvaluation(cfg, plan.eval_sets, plan.vocab, self.rank, self.world, plan.featurize, self.writer)

        init_process_group(denv, cfg.distributed.timeout_minutes)
        # the step boundary's agreements run on the host: a gloo group beside NCCL's (the default one on CPU)
        self.host_group = (dist.new_group(backend="gloo", timeout=datetime.timedelta(minutes=cfg.distributed.timeout_minutes))
                           if self.world > 1 and dist.get_backend() != "gloo" else None)
        self._start_trackers()
        self.heartbeat = (Heartbeat(self.rank, self.world, cfg.distributed.heartbeat_timeout_s)
                          if self.world > 1 and cfg.distributed.heartbeat_timeout_s > 0 else None)
        self.watchdog = (Watchdog(self.rank, self.world, cfg.distributed.watchdog_factor, cfg.distributed.watchdog_floor_s,
                                  store=dist.distributed_c10d._get_default_store() if self.world > 1 else None)
                         if cfg.distributed.watchdog_factor > 0 else None)
        acc = get_accelerator()
        self.device = torch.device(acc.device_name(device_index(denv, acc.device_count()))) if acc.device_name() != "cpu" else torch.device("cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        seed_everything(cfg.seed)
        model, _ = build_model(cfg.model, plan.vocab, seed=cfg.seed, family=plan.family, config=plan.model_config)
        sync_free = cfg.model.sync_free_forward and self.family.use_sync_free_forward(model)
        check_layerdrop(cfg, self.world, shared_draws=sync_free)
        if plan.pack_align is not None and not sync_free:
            raise ConfigError("data.pack=true: this model has no sync-free forward, which runs packed micro-batches; "
                              "set data.pack=false")
        self.layers = self.family.num_layers(model.config)
        self.input_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.distributed.precision, torch.float32)
        self.spec = StepSpec(
            input_name=self.family.input_name, device=self.device, input_dtype=self.input_dtype, sync_free=sync_free,
            layerdrop=cfg.model.layerdrop if sync_free else 0.0,  # else transformers' forward draws
            num_layers=self.layers, seed=cfg.seed, utterances_per_micro=plan.utterances_per_micro,
            # ZeRO 1-3 and fp16 skip steps with inf/NaN gradients themselves; stage 0 in fp32/bf16 does not
            check_finite=cfg.distributed.zero_stage == 0 and cfg.distributed.precision != "fp16",
            samples_per_input=getattr(plan.featurize, "samples_per_frame", 1),
            micro_batch_key=plan.micro_key,
            rank=self.rank, world_size=self.world)
        if plan.micro_candidates:  # data.micro_batch_size=auto (or data.micro_batch_seconds=auto) on a GPU
            self._choose_micro_batch_size(model)
        self.loader = plan.loader(self.rank)
        self.total_steps, self.ds_config = plan.total_steps, plan.ds_config
        if cfg.model.compile:
            self.family.compile(model)
        if cfg.distributed.zero_stage == 3 and sync_free:
            for p in self.family.zero3_external_parameters(model):
                deepspeed.zero.register_external_parameter(model, p)
        params = self.family.trainable_parameters(model)
        self.engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params, config=self.ds_config)
        ckpt.use_safe_loading(self.engine)
        front = self.family.front_end(model)
        self.frozen_encoder = front is not None and not any(p.requires_grad for p in front.parameters())
        self.peak_flops = peak_flops(torch.cuda.get_device_name(self.device)) if self.device.type == "cuda" else None
        if plan.pack_align is not None and denv.is_main:
            log.info("packed micro-batches: utterances start on multiples of %d samples; attention %s with a "
                     "document mask; capacities %s samples", plan.pack_align, model.config._attn_implementation,
                     ", ".join(map(str, self.loader.capacities)))
        if plan.augment is not None and denv.is_main:
            log.info("augmentation of the training audio (drawn per utterance and epoch): %s", plan.augment.describe())
        self.state = TrainState(self.loader)
        self.checkpoints = ckpt.Checkpointer(self.engine, self.state, denv, cfg)
        self.preemption = preemption or Preemption()
        self._pending: list[dict] = []  # micro-batches of a step that an epoch's end cut (carried into the next)
        self._skipped_run, self._last_skipped = 0, 0

    def _choose_micro_batch_size(self, model) -> None:
        """data.micro_batch_size=auto (or data.micro_batch_seconds=auto): the largest candidate whose longest
        micro-batch fits every rank's GPU (asr_dist.memory), before DeepSpeed holds any memory; the plan is made
        again for it."""
        from . import memory

        d, plan = self.cfg.distributed, self.plan
        trainable = sum(p.numel() for p in self.family.trainable_parameters(model))
        extra = memory.held_by_training(trainable, d.precision, d.zero_stage, self.world, d.reduce_bucket_size)
        accumulated = trainable * self.input_dtype.itemsize  # gradients held between the micro-batches of a step
        every_layer = [False] * self.layers if self.spec.sync_free else None  # the worst case: no layer skipped
        t0 = time.perf_counter()
        layerdrop, model.config.layerdrop = getattr(model.config, "layerdrop", 0.0), 0.0  # transformers' forward
        try:
            micro, probes, budget = memory.choose(
                model, plan.micro_candidates, plan.probe_batch, lambda m, batch: forward(m, batch, self.spec, every_layer),
                self.device, self.input_dtype, extra, self.rank, self.world, accumulated, self.host_group,
                plan.micro_key)
        finally:
            model.config.layerdrop = layerdrop
        key = plan.micro_key
        plan.use_micro_batch(micro)
        # the large-batch mode weighs each micro-batch's loss by its utterances over the mean, which the choice moves
        self.spec = dataclasses.replace(self.spec, utterances_per_micro=plan.utterances_per_micro)
        if self.denv.is_main:
            log.info("%s=auto: %s x accumulation %d (a forward and backward of the longest micro-batch of each "
                     "candidate peaked at %s; with %.1f GiB that training adds for the optimizer, it must stay under "
                     "%.1f GiB of this GPU; probed in %.0f s). %s=N chooses another", key,
                     f"{micro:g} s" if isinstance(micro, float) else micro, plan.accumulation,
                     "; ".join(p.describe() for p in probes), extra / memory.GiB, budget / memory.GiB,
                     time.perf_counter() - t0, key)

    def _start_trackers(self) -> None:
        """log.trackers' MLflow and W&B runs, on rank 0; one that cannot start stops every rank with its reason."""
        from .trackers import TrackerError, start_trackers

        if not {"mlflow", "wandb"} & set(self.cfg.log.trackers):
            return
        error = None
        if self.denv.is_main:
            try:
                self.writer.add(start_trackers(self.cfg.log, self.out))
            except Exception as e:  # whatever it is, every rank hears of it (else they wait in the broadcast)
                error = str(e) if isinstance(e, TrackerError) else f"a tracker could not start: {type(e).__name__}: {e}"
        if self.world > 1:
            box = [error]
            dist.broadcast_object_list(box, src=0, group=self.host_group)  # host data: over gloo, not NCCL
            error = box[0]
        if error:
            raise TrackerError(error)

    # ── resume, save (asr_dist.checkpoint.Checkpointer), the run's config ──

    def resume(self) -> None:
        client = self.checkpoints.resume()
        if self.denv.is_main:
            self._record_config(client)

    def _record_config(self, client: dict | None) -> None:
        """Write {output_dir}/config.yaml, the resolved config of this run. On a resume, name every key that
        differs from the config the checkpoint was trained with (config.yaml, else the checkpoint's own), and keep
        that one as config.until-step-N.yaml."""
        from omegaconf import OmegaConf

        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / CONFIG_NAME
        if client is not None:
            before = None
            if path.exists():
                try:
                    before = OmegaConf.to_container(OmegaConf.load(path))
                except Exception as e:  # an unreadable record is no reason to stop a resume
                    log.warning("%s: not readable (%s); comparing with the checkpoint's config instead", path, e)
            before = before if isinstance(before, dict) else client.get("config")
            changed = config_diff(before or {}, to_dict(self.cfg))
            if changed:
                kept = self.out / f"config.until-step-{self.state.step:08d}.yaml"
                log.warning("resuming at step %d with %d config key(s) changed from the run's: %s (the earlier config "
                            "is kept as %s)", self.state.step, len(changed), "; ".join(changed), kept.name)
                if path.exists():
                    path.replace(kept)
                else:
                    kept.write_text(OmegaConf.to_yaml(OmegaConf.create(before)))
        tmp = path.with_suffix(".yaml.tmp")
        tmp.write_text(to_yaml(self.cfg))
        tmp.replace(path)

    def _unwatched(self):
        """Evaluation and saves are no optimizer steps: the watchdog waits for them."""
        return self.watchdog.paused() if self.watchdog is not None else contextlib.nullcontext()

    def save(self, step: int) -> Path:
        with self._unwatched():
            return self.checkpoints.save(step)

    def _save_unless_saved(self, step: int) -> None:
        if not self.checkpoints.is_latest(step):
            self.save(step)

    def _barrier(self) -> None:
        self.checkpoints.barrier()

    # ── evaluation (asr_dist.evaluation.TrainingEvaluation) ──

    def evaluate(self, step: int) -> dict:
        with self._unwatched():
            self.engine.eval()
            try:
                return self.evaluation(self.engine, self.family, step, self.device, self.input_dtype)
            finally:
                self.engine.train()

    # ── the loop ──

    def run(self) -> dict:
        self.resume()
        state, cfg = self.state, self.cfg
        if state.step >= self.total_steps:
            log.info("already trained %d of %d steps", state.step, self.total_steps)
        if self.denv.is_main:
            self.writer.hparams(to_dict(cfg), self.ds_config)
            log.info("training %d steps (%d per epoch, accumulation %d, %d ranks) into %s", self.total_steps,
                     self.loader.steps_per_epoch, self.loader.accumulation, self.world, self.out)
        self.engine.train()
        window = self._new_window()
        self._skipped_run, self._last_skipped = 0, self.engine.skipped_steps
        start_time, start_step = time.time(), state.step
        profiler = StepProfiler(cfg.train.profile_steps, self.out, self.rank, self.device)
        stopped = early_stop(state.history, cfg)  # a resumed run that had stopped early stays stopped
        if stopped:
            log.warning("train.early_stopping: %s; nothing more to train", stopped)
        while state.step < self.total_steps and not stopped:
            batches = iter(self.loader)
            while state.step < self.total_steps:
                profiler.maybe_start(state.step)
                micro = self._next_step(batches, window)
                if micro is None:
                    break  # the epoch ended
                result = self._train_step(micro)
                state.step = step = self.engine.global_steps
                self._count(window, result)
                if self.watchdog is not None:
                    self.watchdog.step_done()
                profiler.maybe_stop(step, final=step >= self.total_steps)
                self._watch_skipped(step, result.keys)
                if step % cfg.train.log_every == 0 or step == self.total_steps:
                    self._log(step, window, start_time, start_step)
                evaluated = cfg.eval.every_steps and step % cfg.eval.every_steps == 0 and step < self.total_steps
                if evaluated:
                    self._record(step, self.evaluate(step))
                    stopped = early_stop(state.history, cfg)
                if stopped:
                    log.warning("stopping early at step %d: %s", step, stopped)
                    break
                if (cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0 and step < self.total_steps
                        or evaluated and cfg.train.average_best):  # average_best: each evaluation's weights kept
                    self.save(step)
                if self.preemption.agreed(self.world, self.host_group):
                    self._save_unless_saved(step)
                    log.warning("preempted at step %d: checkpoint saved; exiting with code %d", step, EXIT_PREEMPTED)
                    raise SystemExit(EXIT_PREEMPTED)
        if self.watchdog is not None:
            self.watchdog.stop()  # what is left (evaluation, export) makes no optimizer steps
        step = state.step
        # an early stop evaluated this step already; a finished run started again evaluates its weights again
        evaluated_here = bool(stopped) and bool(state.history) and state.history[-1]["step"] == step
        results = self.evaluate(step) if self.evaluation.loaders and not evaluated_here else {}
        self._record(step, results)
        if cfg.train.save_final:
            self._save_unless_saved(step)
            self._export_final(stopped)
            self.writer.artifact(self.out / "model" / "README.md", "model")
        elif self.denv.is_main:
            log.info("train.save_final=false: no checkpoint of step %d and no %s/model", step, self.out)
        self.writer.artifact(self.out / RESULTS_NAME, "eval")
        self.writer.artifact(self.out / CONFIG_NAME, "config")
        if state.best:
            log.info("best %s %s %.4f at step %d, exported to %s", state.best["set"],
                     state.best.get("metric", "wer").upper(), state.best.get("value", state.best.get("wer")),
                     state.best["step"], self.out / "best")
        self.writer.close()
        return {"step": step, "eval": results, "history": state.history, "stopped_early": stopped}

    def _export_final(self, stopped: str | None) -> None:
        """output_dir/model: the mean of the checkpoints train.average_last or average_best names; else, after an
        early stop, the best model (output_dir/best); else the final weights."""
        from .export import export

        cfg = self.cfg
        export(self, self.out / "model")
        if not (cfg.train.average_last or cfg.train.average_best or stopped):
            return
        self._barrier()
        if not self.denv.is_main:
            return
        model = self.out / "model"
        if cfg.train.average_last or cfg.train.average_best:
            from .average import average, best_checkpoints, last_checkpoints

            from .export import model_card

            n = cfg.train.average_last or cfg.train.average_best
            try:
                paths, what = (last_checkpoints(self.out, n) if cfg.train.average_last
                               else best_checkpoints(self.out, n))
                average(paths, model, what, card=model_card(self))
            except Exception as e:  # the other ranks are past the export: a failure here loses nothing trained
                log.error("train.average_%s=%d: could not average (%s); output_dir/model holds the final weights. "
                          "`asr-dist average --run %s` averages what the run kept", "last" if cfg.train.average_last
                          else "best", n, str(e).splitlines()[0] if str(e) else type(e).__name__, self.out)
                return
            log.info("output_dir/model holds the mean of %s checkpoints (steps %s)", what,
                     ", ".join(p.name.split("-")[1].lstrip("0") for p in paths))
        else:
            import shutil

            best = self.out / "best"
            if not best.is_dir():
                return
            tmp = self.out / ".model-best"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(best, tmp)
            with open(tmp / "README.md", "a") as f:
                f.write(f"\n## Early stopping\n\nTraining stopped early at step {self.state.step}: {stopped}. These "
                        f"are the weights of step {self.state.best['step']}, the best evaluation.\n")
            shutil.rmtree(model)
            tmp.rename(model)
            log.info("output_dir/model holds the best model, of step %d", self.state.best["step"])

    def _next_step(self, batches, window: dict) -> list[dict] | None:
        """The micro-batches of this rank's next optimizer step, or None when the epoch ends first (what it
        delivered of the step is kept for the next epoch's iterator)."""
        while len(self._pending) < self.loader.accumulation:
            t = time.time()
            try:
                batch = next(batches, None)
            except ShardError as e:  # data.on_corrupt=stop; raised again here from a loader worker
                text = str(e).strip().splitlines()[-1]
                raise TrainingError(f"damaged training data on rank {self.rank}: "
                                    f"{text.split('ShardError: ', 1)[-1]}") from None
            window["wait"] += time.time() - t
            if batch is None:
                return None
            self._pending.append(batch)
        micro, self._pending = self._pending, []
        return micro

    def _train_step(self, micro: list[dict]):
        try:
            return train_step(self.engine, micro, self.state.step, self.spec)
        except NonFiniteStep as e:
            # ZeRO stage 0 without fp16 has no overflow check: the step was stopped before the weights changed
            step = self.state.step
            self._save_unless_saved(step)
            raise TrainingError(
                f"inf/NaN loss or gradients in optimizer step {step + 1} (loss {e.loss:.4g} on rank {self.rank}); "
                f"utterances on rank {self.rank}: {keys_text(e.keys)}. The weights from before it were saved as "
                f"checkpoint step {step}. Try a lower optim.lr or a longer optim.warmup_steps, or ZeRO stage 1-3 "
                f"(they skip such steps and stop only after distributed.max_skipped_steps in a row)") from None

    @staticmethod
    def _count(window: dict, result) -> None:
        window["loss"] += result.loss_sum
        window["audio"] += result.audio_seconds
        window["layer_audio"] += result.layer_audio_seconds
        window["utts"] += result.utterances
        window["steps"] += 1

    def _watch_skipped(self, step: int, keys: list[str]) -> None:
        """fp16, and ZeRO 1-3 in any precision, skip a step whose gradients are inf or NaN; many in a row is a
        diverging run: stop with a checkpoint (skipped steps leave the weights as before them)."""
        skipped = self.engine.skipped_steps
        self._skipped_run = self._skipped_run + skipped - self._last_skipped if skipped > self._last_skipped else 0
        self._last_skipped = skipped
        if self._skipped_run < self.cfg.distributed.max_skipped_steps:
            return
        self.save(step)
        n = self.cfg.distributed.max_skipped_steps
        if self.cfg.distributed.precision == "fp16":
            what = (f"fp16 overflow storm: {n} optimizer steps in a row were skipped for inf/NaN gradients "
                    f"(loss scale {getattr(self.engine.optimizer, 'cur_scale', '?')})")
            hint = "Try distributed.precision=bf16, a lower optim.lr, or a lower distributed.initial_scale_power"
        else:
            what = f"{n} optimizer steps in a row had inf/NaN gradients and were skipped"
            hint = "Try a lower optim.lr or a longer optim.warmup_steps, and check those utterances"
        raise TrainingError(f"{what}; utterances of the last one on rank {self.rank}: {keys_text(keys)}. A checkpoint "
                            f"with the weights from before the skipped steps was saved at step {step}. {hint}")

    def _record(self, step: int, results: dict) -> None:
        """Add an evaluation to the history and write it to {output_dir}/eval_results.json; export the
        model to {output_dir}/best/ when it is the best so far by the run's ranking (the first set's WER, or
        train.early_stopping's set and metric; every rank decides alike: the results are all-reduced)."""
        if not results:
            return
        state = self.state
        if self.denv.is_main:  # the latest evaluation, whole (replaced atomically: a reader never sees half)
            tmp = self.out / f"{RESULTS_NAME}.tmp"
            tmp.write_text(json.dumps({"step": step, "eval": results}, indent=1) + "\n")
            tmp.replace(self.out / RESULTS_NAME)
        row = {"step": step, "train_loss": state.last_train_loss}
        for name, r in results.items():
            row.update({f"{name}_loss": r["loss"], f"{name}_wer": r["wer"], f"{name}_cer": r["cer"]})
        state.history.append(row)
        key = ranking_key(self.cfg)
        value = score(row, key)
        if (state.best.get("set"), state.best.get("metric", "wer")) == key:
            to_beat = state.best.get("value", state.best.get("wer", math.inf))  # older checkpoints: "wer" only
        else:  # ranked by another set or metric before this resume: the best of the history by this one
            to_beat = min((v for r in state.history[:-1] if (v := score(r, key)) is not None), default=math.inf)
        if value is not None and value < to_beat:
            name = key[0]
            state.best = {"step": step, "set": name, "metric": key[1], "value": value,
                          "wer": row.get(f"{name}_wer"), "cer": row.get(f"{name}_cer")}
            from .export import export

            with self._unwatched():
                export(self, self.out / "best")

    def _log(self, step: int, window: dict, start_time: float, start_step: int) -> None:
        engine = self.engine
        totals = torch.stack([window["loss"], torch.tensor(float(window["utts"]), dtype=torch.float64, device=self.device),
                              torch.tensor(window["audio"], dtype=torch.float64, device=self.device),
                              torch.tensor(float(self.loader.skipped_samples), dtype=torch.float64, device=self.device)])
        mix = self.loader.shards.mix_names
        if mix:  # utterances and audio seconds seen from each set of the mix, since the run began, all ranks
            seen = torch.tensor(self.loader.mix_seen, dtype=torch.float64, device=self.device).flatten()
            totals = torch.cat([totals, seen])
        if self.world > 1:
            dist.all_reduce(totals)  # sums over ranks: the mean loss per utterance, and the audio of all ranks
        elapsed = time.time() - window["t0"]
        loss = float(totals[0] / totals[1]) if float(totals[1]) else float("nan")
        metrics = {
            "train/loss": loss, "train/lr": engine.get_lr()[0],
            "train/grad_norm": float(engine.get_global_grad_norm() or 0.0),
            "train/skipped_steps": engine.skipped_steps,
            "train/skipped_samples": int(totals[3]),  # all ranks
            "perf/audio_seconds_per_second": float(totals[2]) / elapsed if elapsed > 0 else 0.0,
            "perf/data_wait_fraction": window["wait"] / elapsed if elapsed > 0 else 0.0,
        }
        if mix:
            seen = totals[4:].view(len(mix), 2)
            for name, (utts, audio) in zip(mix, (seen / seen.sum(0).clamp(min=1e-9)).tolist()):
                metrics[f"data/mix_utterance_share/{name}"] = utts
                metrics[f"data/mix_audio_share/{name}"] = audio
        if window["utts"]:  # model FLOPs of the real audio (padding excluded), per second, per GPU
            layers = self.layers * window["layer_audio"] / window["audio"] if window["audio"] else None  # LayerDrop
            per_second = train_flops_per_audio_second(self.engine.module.config, window["audio"] / window["utts"],
                                                       self.frozen_encoder, layers)
            metrics["perf/tflops_per_gpu"] = metrics["perf/audio_seconds_per_second"] * per_second / self.world / 1e12
            if self.peak_flops:
                metrics["perf/mfu"] = metrics["perf/tflops_per_gpu"] * 1e12 / self.peak_flops
        if self.cfg.distributed.precision == "fp16":
            metrics["train/loss_scale"] = float(getattr(engine.optimizer, "cur_scale", getattr(engine.optimizer, "loss_scale", 0)))
        if self.device.type == "cuda":
            metrics["perf/gpu_memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.writer.scalars(step, metrics)
        rate = (step - start_step) / max(1e-9, time.time() - start_time)
        eta = (self.total_steps - step) / rate if rate > 0 else float("nan")
        log.info("step %d/%d loss %.4f lr %.2e %.0f audio s/s ETA %s", step, self.total_steps, loss, metrics["train/lr"],
                 metrics["perf/audio_seconds_per_second"], time.strftime("%H:%M:%S", time.gmtime(eta)) if eta == eta else "?")
        self.state.last_train_loss = loss
        window.update(self._new_window())

    def _new_window(self) -> dict:
        """What the training log sums between two logs (the loss stays on the device: no sync per micro-batch)."""
        return {"loss": torch.zeros((), device=self.device, dtype=torch.float64), "audio": 0.0, "layer_audio": 0.0,
                "utts": 0, "wait": 0.0, "t0": time.time(), "steps": 0}


RESULTS_NAME = "eval_results.json"


def train(cfg: Config, denv: DistEnv | None = None) -> dict:
    """Run (or resume) the training that ``cfg`` describes, on every rank of the job."""
    from deepspeed.accelerator import get_accelerator

    preemption = Preemption()  # first: a signal during start-up is a request to stop at the first step
    denv = denv or get_env()
    setup_logging(denv.rank, denv.world_size)
    try:
        # everything that can fail on the config or the data fails here, before any model work
        plan = plan_run(cfg, denv.world_size, cuda=get_accelerator().device_name() == "cuda")
        trainer = Trainer(plan, denv, preemption)
        try:
            result = trainer.run()
            trainer._barrier()  # every rank done before anyone stops beating and leaves
            return result
        except Exception as e:
            if trainer.heartbeat is not None and not isinstance(e, (TrainingError, ConfigError)):
                # a collective failed: if a peer is gone, the heartbeat names it and ends this rank
                log.error("rank %d: %s: %s; checking whether another rank was lost", denv.rank, type(e).__name__,
                          str(e).strip().splitlines()[0][:300] if str(e).strip() else "")
                trainer.heartbeat.diagnose()
            raise
        finally:
            if trainer.watchdog is not None:
                trainer.watchdog.stop()
            if trainer.heartbeat is not None:
                trainer.heartbeat.stop()
            trainer.writer.close("FINISHED" if sys.exc_info()[0] is None else "FAILED")
    finally:
        shutdown(denv)
