"""DeepSpeed trainer for the masked-expression objective.

One optimizer step = ``grad_accum`` micro-batches of ``data.batch_size`` cells per rank.

Host reads (the hot path never waits for the GPU on our account): batches arrive page-locked and are copied
with ``non_blocking``; the loss stays a device tensor summed over micro-batches; tokens, cells, masked
fraction and sequence length are counted on the host from the CPU batch. A step that is logged
(``run.log_every``) makes one all-reduce of [Σ loss, tokens, cells] and one device→host copy (with the
gradient norm); a step that is not logged makes none. ``request_stop`` is all-reduced at the start of each
step and read at its end from page-locked memory (see :meth:`Trainer._stop_agreed`), so every rank stops
after the same step.

Non-finite values, decided at the step boundary: a micro-batch whose loss is NaN/Inf multiplies its backward by
NaN (on the device), so the step's gradients are non-finite. DeepSpeed's wrapped optimizers (ZeRO 1–3, bf16)
compute the global norm and skip such an update themselves (no update, no LR-schedule advance; their
``overflow`` flag is a host bool); on its plain-optimizer path (ZeRO stage 0 in fp32) nothing does, so the trainer
computes ‖g‖₂ of the all-reduced gradients and reads it once per step (that path's only read), dropping the
gradients when it is not finite. A skipped step then reads which value was bad: policy ``stop`` raises
:class:`NonFiniteError` ("loss" or "gradient norm"; no checkpoint is written, the last good one stays
``latest``), policy ``skip`` counts it in ``skipped_steps`` (any ``grad_accum``).

Reads that remain inside DeepSpeed 0.19.8 (not ours; see docs/training.md): every wrapped optimizer's
``step()`` reads the global norm / overflow flag (``is_invalid_grad_norm``, ``has_overflow``) and, with clipping,
the clip coefficient; ZeRO-3's backward epilogue synchronizes its reduce stream, ZeRO-1/2 with
``overlap_comm`` synchronize the device. Its throughput timer (a device sync per forward and per step) is
switched off in :func:`training.deepspeed_config.deepspeed_config`. ``optim.device_skip`` (bf16 ZeRO-1/2) moves the
check and the clipping onto the device (:mod:`training.guarded_adamw`): no read in ``step()``; the updates it skipped
are read with the logged values and before a save, where ``nan_policy`` acts on them.

Context parallelism (``parallel.context_parallel_degree`` P, :mod:`training.parallel`): world = DP × P; data
and masks come from the DP rank, each micro-batch is cut into P equal token shards after masking, the loss
logged is the DP ranks' mean (each CP rank contributes its share).

Profiler scopes (``torch.profiler.record_function``, a few microseconds each when no profiler runs): each
micro-batch's ``trainer/data`` (next batch), ``trainer/mask_copy`` (masking, host→device copies),
``trainer/forward``, ``trainer/backward`` and each step's ``trainer/update`` (DeepSpeed's optimizer step), so
``benchmarks/training_profile.py`` can say which host phase the GPU waits on when it idles.

Look-ahead (``run.prefetch``): the next micro-batch is fetched, masked and copied right after this one's backward is
queued, so the host does that work while the GPU runs the backward, not after ``engine.step()`` drained it (H200,
160m @ 8K: ~45 ms of GPU idle per step). Not across a step that saves a checkpoint or ends the run, so the loader
position a checkpoint records never counts a batch no step trained.

Exactness: masking uses a generator seeded from (seed, step, micro-batch, DP rank); the data order
is the loader's resumable state; no other randomness is used in training (no dropout).
"""

from __future__ import annotations

import dataclasses
import json
import math
import resource
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from torch.profiler import record_function
from tqdm.auto import tqdm

from training import checkpoint
from training.compile import compile_blocks
from training.config import Config
from training.deepspeed_config import deepspeed_config, resolve_precision
from training.distributed import init_distributed
from training.encoder import build_model
from training.guarded_adamw import GuardedAdamW
from training.masking import choose_masked, mask_generator
from training.metrics import MetricsLogger, device_peak_flops, effective_seq_len, flops_per_token, head_params
from training.parallel import apply_context_parallel, backward_scale, init_parallel, shard_batch
from training.parallel.ulysses_pipelined import head_balance


class NonFiniteError(RuntimeError):
    """Raised under ``nan_policy: stop`` when a loss or gradient norm is NaN/Inf."""


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only (not on biases, LayerNorms or embeddings)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and "emb" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class Trainer:
    """Builds tokenizer, model, DeepSpeed engine and loader from a Config; resumes from ``latest``.

    ``callbacks``: functions ``f(trainer, record)`` called on every rank after each step.
    """

    def __init__(self, cfg: Config, callbacks: Sequence[Callable] = ()):
        import deepspeed

        from data_prep.tokenize import CellTokenizer

        r, d, o = cfg.run, cfg.data, cfg.optim
        self.rank, self.world, self.device = init_distributed()
        self.parallel = init_parallel(cfg.parallel.context_parallel_degree, cfg.model.n_heads)   # DP × CP
        if d.mds is not None:
            from data_prep.vocab import GeneVocab
            vocab_path = Path(d.mds) / "vocab.tsv"
            if not vocab_path.is_file():
                raise FileNotFoundError(f"data.mds={d.mds} has no vocab.tsv (build it with python -m data_prep build)")
            vocab_size = len(GeneVocab.load(vocab_path))
        else:
            vocab_size = d.synthetic_vocab
        self.tokenizer = CellTokenizer(vocab_size, d.context_length, d.n_bins, r.seed, d.gene_selection)
        mcfg = dataclasses.replace(cfg.model, n_tokens=self.tokenizer.n_tokens, n_bins=d.n_bins)
        self.cfg = cfg = dataclasses.replace(cfg, model=mcfg)
        self.run_dir = Path(r.dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        # Before anything is built or written: a resume may not change what its checkpoint means.
        self.resume_changes = checkpoint.check_resume(self.ckpt_dir, cfg)
        torch.manual_seed(r.seed)
        model = build_model(mcfg)
        if self.parallel.cp > 1:
            apply_context_parallel(model, self.parallel.cp_group, chunks=cfg.parallel.context_parallel_chunks,
                                   exchange=cfg.parallel.context_parallel_exchange)
        if r.compile:   # with CP the Ulysses all-to-all stays eager between two compiled regions of each block
            compile_blocks(model, fullgraph=self.parallel.cp == 1)
        self.n_params, self.n_params_nonemb = model.num_params(), model.num_params(non_embedding=True)
        self.n_params_head = head_params(model)
        cuda = self.device.type == "cuda"
        if o.device_skip and not (resolve_precision(cfg, cuda) == "bf16" and r.zero_stage in (1, 2)):
            raise ValueError(f"optim.device_skip needs bf16 with ZeRO stage 1 or 2 (DeepSpeed's ZeRO-1/2 optimizer); "
                             f"got {resolve_precision(cfg, cuda)} with stage {r.zero_stage}")
        groups = _param_groups(model, o.weight_decay)
        optimizer = (GuardedAdamW(groups, clip=o.grad_clip, lr=o.lr, betas=o.betas, eps=o.eps) if o.device_skip else
                     torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps, fused=cuda or None))
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, config=deepspeed_config(cfg, self.parallel.dp, cuda),
            mpu=self.parallel.mpu)
        self._guard = optimizer if o.device_skip else None
        if self._guard is not None:
            zero = self.engine.optimizer
            optimizer.norm_source = lambda: zero._global_grad_norm
        # The scheduler is built at iteration 0 (training.deepspeed_config) and DeepSpeed steps it after each
        # update; applying iteration 0 here makes update k use iteration k−1 (LR 0 at step 1).
        if self.scheduler is not None:
            self.scheduler.step(0)
        # ZeRO 0 + fp32: DeepSpeed steps the torch optimizer unwrapped, with no global norm and no check.
        self._plain_optimizer = self.engine.optimizer is self.engine.basic_optimizer
        self.loader = self._build_loader()
        if self.rank == 0:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            self._record_config()
        dist.barrier()
        self.step, self.skipped_steps, self._stop = 0, 0, False
        if cuda:      # request_stop's all-reduced flag lands here without a blocking copy (_share_stop)
            self._stop_host, self._stop_event = torch.zeros(1).pin_memory(), torch.cuda.Event()
        self.callbacks = list(callbacks)
        client = checkpoint.resume(self.engine, self.ckpt_dir)
        if client is not None:
            state = client["sigattn"]
            self.step, self.skipped_steps = state["step"], state["skipped_steps"]
            self.loader.load_state_dict(state["loader"])
        self._guard_seen, self._guard_checked = 0, self.step   # device-skipped updates read so far; step last read
        if self.rank == 0:
            print(f"[sigattn] model {mcfg.preset or 'custom'} ({mcfg.attention}): {self.n_params:,} parameters "
                  f"({self.n_params_nonemb:,} non-embedding); world {self.world}"
                  f"{f' = DP {self.parallel.dp} x CP {self.parallel.cp}' if self.parallel.cp > 1 else ''}; "
                  f"{'resumed at step ' + str(self.step) if client else 'fresh start'}", flush=True)
            H, P = mcfg.n_heads, self.parallel.cp
            if P > 1 and H % P:
                print(f"[sigattn] context parallel {P} over {H} heads: {-(-H // P)} or {H // P} heads per rank "
                      f"(uneven; attention runs at {head_balance(H, P):.2f} of an even split's balance)", flush=True)

    def _record_config(self) -> None:
        """``config.yaml``: the config of this start (each checkpoint keeps the one it was trained with);
        a resume's allowed changes are appended to ``resumes.jsonl``."""
        run_config = self.run_dir / "config.yaml"
        if run_config.is_file():                   # checkpoints written before they kept their config
            for tag_dir in self.ckpt_dir.glob("step_*"):
                if tag_dir.is_dir() and not (tag_dir / checkpoint.CONFIG).is_file():
                    shutil.copyfile(run_config, tag_dir / checkpoint.CONFIG)
        tag = checkpoint.latest_tag(self.ckpt_dir)
        if tag is not None:
            record = {"tag": tag, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                      "changed": {k: list(v) for k, v in self.resume_changes.items()}}
            with (self.run_dir / "resumes.jsonl").open("a") as f:
                f.write(json.dumps(record, default=str) + "\n")
            if self.resume_changes:
                print("[sigattn] resuming with changed " + ", ".join(
                    f"{k}: {o} → {n}" for k, (o, n) in self.resume_changes.items()), flush=True)
        self.cfg.save(run_config)

    def _build_loader(self):
        d, r = self.cfg.data, self.cfg.run
        if d.mds is None:
            from training.synthetic import SyntheticCellLoader
            return SyntheticCellLoader(self.tokenizer, d.batch_size, mean_genes=d.synthetic_mean_genes,
                                       seed=r.seed, rank=self.parallel.dp_rank, world_size=self.parallel.dp,
                                       num_workers=d.num_workers, pin_memory=self.device.type == "cuda")
        from data_prep.loader import build_loader
        return build_loader(d.mds, d.split, tokenizer=self.tokenizer, batch_size=d.batch_size,
                            shuffle=d.shuffle, seed=r.seed, num_workers=d.num_workers,
                            pin_memory=self.device.type == "cuda",
                            **({"replication": self.parallel.cp} if self.parallel.cp > 1 else {}))

    def close(self) -> None:
        """Release the DeepSpeed engine: its model, optimizer states and gradient hooks (GPU memory on CUDA).

        Without this an engine outlives its trainer (DeepSpeed's hooks keep it referenced), so each further
        trainer built in the same process (a notebook, a sweep) adds ~13 B per parameter. ``with Trainer(cfg)
        as t:`` closes on exit. The trainer cannot train after ``close()``."""
        engine, self.engine = getattr(self, "engine", None), None
        if engine is not None:
            engine.destroy()

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def request_stop(self) -> None:
        """Ask for a collective checkpoint and an orderly return (``"stopped"``).

        Safe from a signal handler: it only sets a flag, which the next step all-reduces at its start; that
        step completes, every rank saves, and ``train()`` returns."""
        self._stop = True

    def _batches(self) -> Iterator[dict]:
        while True:
            n = 0
            for batch in self.loader:
                n += 1
                yield batch
            if n == 0:
                raise RuntimeError(f"the {self.cfg.data.split} loader yielded no batches")

    def _save(self) -> None:
        # Under one key: DeepSpeed's own checkpoint keys (e.g. skipped_steps) would shadow ours.
        state = {"step": self.step, "skipped_steps": self.skipped_steps, "loader": self.loader.state_dict()}
        checkpoint.save(self.engine, self.ckpt_dir, self.step, {"sigattn": state}, self.cfg.run.keep_last, self.cfg)

    def _nonfinite(self, what: str, step: int, at: bool = True) -> None:
        if self.cfg.run.nan_policy == "stop":
            last = checkpoint.latest_tag(self.ckpt_dir)
            raise NonFiniteError(f"non-finite {what}{f' at step {step}' if at else ''}; stopping (nan_policy=stop). "
                                 f"Last good checkpoint: {self.ckpt_dir / last if last else 'none'}")
        self.skipped_steps += 1

    def train(self) -> str:
        """Run to ``run.max_steps``; return ``"finished"`` or ``"stopped"`` (after ``request_stop``)."""
        cfg, r = self.cfg, self.cfg.run
        gas, cp, dp = cfg.optim.grad_accum, self.parallel.cp, self.parallel.dp
        scale = backward_scale(cp, r.zero_stage)
        logger = MetricsLogger(self.run_dir, r.tensorboard) if self.rank == 0 else None
        cells_log = (self.run_dir / f"cells_rank{self.rank}.jsonl").open("a") if r.log_cell_ids else None
        peak = device_peak_flops(self.device)
        bar = tqdm(total=r.max_steps, initial=self.step, disable=self.rank != 0 or not r.progress,
                   desc=f"train {cfg.model.attention}", unit="step", dynamic_ncols=True)
        batches = self._batches()
        status = "finished"
        window = _Window()                                   # host-side counts since the last logged step
        ahead = None                                         # the next micro-batch, masked and copied early
        try:
            while self.step < r.max_steps:
                step = self.step + 1
                logged = step % r.log_every == 0 or step == r.max_steps
                window.start()
                self.engine.train()
                stop_flag = self._share_stop()
                loss_sum, cell_ids, grad_norm, host = None, [], None, None
                lr = self.engine.get_lr()[0]                 # the LR this step applies
                for micro in range(gas):
                    if ahead is None:
                        ahead = self._next_micro(batches, step, micro, gas, cp)
                    (host_batch, masked, batch, idx), ahead = ahead, None
                    if cells_log is not None:
                        cell_ids += host_batch["cell_id"].tolist()
                    window.add(host_batch, masked, gas, cp)
                    with record_function("trainer/forward"):
                        loss, _ = self.engine(batch, idx)
                        lv = loss.detach()
                        loss_sum = lv.double() if loss_sum is None else loss_sum + lv.double()
                    # A non-finite loss multiplies the backward by NaN: every gradient turns NaN, so the step
                    # boundary drops the update (DeepSpeed's overflow check, or ours below) without a host read here.
                    with record_function("trainer/backward"):
                        self.engine.backward(loss * torch.where(torch.isfinite(lv), scale, math.nan))
                    # Look-ahead: mask and copy the next micro-batch now, while the GPU runs this backward, instead
                    # of after the optimizer step drained it. Never across a step that saves (the loader's saved
                    # position must not count a batch no step trained) or past the last step.
                    if r.prefetch and (micro + 1 < gas or not self._saves_after(step, stop_flag)):
                        nxt = (step, micro + 1) if micro + 1 < gas else (step + 1, 0)
                        ahead = self._next_micro(batches, *nxt, gas, cp)
                    if micro == gas - 1 and self._plain_optimizer:
                        # ZeRO 0 + fp32: nothing in DeepSpeed checks the norm, so the trainer reads it (with the
                        # logged values when this step is logged): the one read the wrapped optimizers make themselves.
                        host = self._read(loss_sum, window, self._grad_norm(), logged)
                        grad_norm = host["grad_norm"]
                        if not math.isfinite(grad_norm):      # as DeepSpeed's wrapped optimizers do:
                            self.engine.zero_grad()           # no update, no LR-schedule advance,
                            self.engine.micro_steps += 1      # and the micro-step DeepSpeed's step() would count
                            continue
                    with record_function("trainer/update"):
                        self.engine.step()
                record = {"step": step, "lr": lr}
                if self._guard is not None:   # skipped on the device: known when read, with the logged values
                    skipped, loss_bad = False, False
                    if logged:
                        host = self._read(loss_sum, window, self.engine.get_global_grad_norm(), True,
                                          self._guard.skipped)
                        loss_bad = self._guard_news(step, host["skips"], record) and not math.isfinite(host["loss"])
                else:
                    if self._plain_optimizer:
                        skipped = not math.isfinite(grad_norm)
                    else:   # DeepSpeed's wrapped optimizers checked the norm (their own host read), skipped the update
                        skipped = bool(getattr(self.engine.optimizer, "overflow", False))
                    loss_bad = skipped and self._any_nonfinite(loss_sum)     # a bad step's extra read: which value
                if skipped:
                    self._nonfinite("loss" if loss_bad else "gradient norm", step)
                    record.update(skipped=True)
                if logged and loss_bad:
                    record.update(loss=None, skipped_steps=self.skipped_steps)
                    window.reset()
                elif logged:
                    if host is None:
                        host = self._read(loss_sum, window, self.engine.get_global_grad_norm(), True)
                    dt = time.perf_counter() - window.t0
                    tokens_per_s = host["tokens"] / dt
                    mfu = None
                    if peak is not None:
                        f = flops_per_token(self.n_params_nonemb, cfg.model.n_layers, cfg.model.d_model,
                                            window.seq_len / window.steps, self.n_params_head,
                                            window.masked_frac / window.steps)
                        mfu = f * tokens_per_s / (peak * self.world)
                    record.update(loss=host["loss"] / (gas * dp), grad_norm=host["grad_norm"],
                                  tokens_per_s=tokens_per_s, cells_per_s=host["cells"] / dt, mfu=mfu,
                                  tokens_per_step=host["tokens"] / window.steps, seq_len=window.seq_len / window.steps,
                                  mem_gb=self._mem_gb(), skipped_steps=self.skipped_steps)
                    window.reset()
                self.step = step
                if cells_log is not None:
                    cells_log.write(json.dumps({"step": step, "rank": self.rank, "cell_ids": cell_ids}) + "\n")
                    cells_log.flush()
                if logger is not None and logged:
                    logger.log(record)
                bar.update(1)
                if record.get("loss") is not None:
                    bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
                stop = self._stop_agreed(stop_flag)
                if stop or self._checkpoint_due(step):
                    if self._guard is not None and self._guard_checked < step:   # no save after an unseen skip
                        skips = self._guard.skipped
                        self._guard_news(step, 0 if skips is None else int(skips.cpu()), record)
                    self._save()
                for cb in self.callbacks:
                    cb(self, record)
                if stop:
                    status = "stopped"
                    break
        finally:
            bar.close()
            if logger is not None:
                logger.close()
            if cells_log is not None:
                cells_log.close()
        return status

    def _next_micro(self, batches: Iterator[dict], step: int, micro: int, gas: int, cp: int) -> tuple:
        """Micro-batch ``micro`` of step ``step``: (host batch, its mask, the device batch, masked indices), the
        host→device copies queued without waiting. Its mask depends only on (seed, step, micro, DP rank), so
        preparing it early changes nothing."""
        r = self.cfg.run
        with record_function("trainer/data"):
            batch = next(batches)                            # host tensors (page-locked on CUDA)
        with record_function("trainer/mask_copy"):
            host = batch
            masked = choose_masked(batch["cu_seqlens"], r.mask_ratio,
                                   mask_generator(r.seed, (step - 1) * gas + micro, self.parallel.dp_rank))
            shard = masked
            if cp > 1:  # this rank's equal share of the micro-batch's tokens (training.parallel)
                batch, shard = shard_batch(batch, masked, cp, self.parallel.cp_rank)
            # Indices picked on the host: a bool mask on the GPU would cost a sync in the model.
            idx = to_device(shard.nonzero().squeeze(1), self.device)
            batch = {k: to_device(v, self.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        return host, masked, batch, idx

    def _checkpoint_due(self, step: int) -> bool:
        """A periodic or final save after this step (``run.ckpt_every`` > 0)."""
        r = self.cfg.run
        return r.ckpt_every > 0 and (step % r.ckpt_every == 0 or step == r.max_steps)

    def _saves_after(self, step: int, stop_flag: torch.Tensor) -> bool:
        """Whether the step ends the run or writes a checkpoint (periodic, final, or an agreed stop)."""
        return step >= self.cfg.run.max_steps or self._checkpoint_due(step) or self._stop_agreed(stop_flag)

    def _share_stop(self) -> torch.Tensor:
        """Start of a step: all-reduce this rank's ``request_stop`` flag. On CUDA the fill, the all-reduce and the
        copy into page-locked host memory are queued without waiting; :meth:`_stop_agreed` reads it at the end."""
        flag = torch.full((1,), float(self._stop), device=self.device)
        dist.all_reduce(flag)
        if self.device.type == "cuda":
            self._stop_host.copy_(flag, non_blocking=True)
            self._stop_event.record()
        return flag

    def _stop_agreed(self, flag: torch.Tensor) -> bool:
        """End of a step: did any rank ask to stop before it started? The same answer on every rank.

        On CUDA this waits on the event recorded after the copy, i.e. for the GPU to reach the start of this
        step (DeepSpeed's optimizers already waited for more inside ``step()``): the host stays at most one
        step ahead and no device→host copy is made here (``torch.cuda.set_sync_debug_mode`` does not count
        event waits). On CPU the gloo all-reduce has completed."""
        if self.device.type == "cuda":
            self._stop_event.synchronize()
            flag = self._stop_host
        return bool(flag[0] > 0)

    def _read(self, loss_sum: torch.Tensor, window: "_Window", grad_norm, logged: bool,
              skips: torch.Tensor | None = None) -> dict:
        """The step's one device→host copy: when ``logged``, Σ loss, tokens and cells since the last logged
        step over all ranks (one all-reduce); the gradient norm when it is a device tensor; with ``optim.device_skip``
        the count of updates skipped on the device (``skips``; the same on every rank: one global norm)."""
        parts, out = [], {}
        if logged:
            v = torch.stack([loss_sum, loss_sum.new_full((), window.tokens), loss_sum.new_full((), window.cells)])
            dist.all_reduce(v)
            parts.append(v)
        if self._guard is not None:
            parts.append(loss_sum.new_zeros(1) if skips is None else skips.reshape(1).to(loss_sum))
        if torch.is_tensor(grad_norm):
            parts.append(grad_norm.detach().reshape(1).to(device=loss_sum.device, dtype=torch.float64))
        vals = torch.cat(parts).cpu().tolist() if parts else []
        if logged:
            out.update(loss=vals[0], tokens=vals[1], cells=vals[2])
        if self._guard is not None:
            out["skips"] = int(vals[3 if logged else 0])
        out["grad_norm"] = vals[-1] if torch.is_tensor(grad_norm) else (None if grad_norm is None else float(grad_norm))
        return out

    def _guard_news(self, step: int, total: int, record: dict) -> bool:
        """``optim.device_skip``: act on the updates skipped on the device since the last read (``total`` is the
        run's count so far): ``nan_policy`` stop raises, skip counts them. Whether any were new."""
        new, first = total - self._guard_seen, self._guard_checked + 1
        self._guard_seen, self._guard_checked = total, step
        if new <= 0:
            return False
        where = f"step {step}" if first == step else f"{new} of steps {first}–{step}"
        for _ in range(new):
            self._nonfinite(f"loss or gradient norm (update skipped on the device) in {where}", step, at=False)
        record.update(skipped=new)
        return True

    def _any_nonfinite(self, loss_sum: torch.Tensor) -> bool:
        """Whether any rank's loss of this (skipped) step was NaN/Inf; read only on skipped steps."""
        bad = (~torch.isfinite(loss_sum)).double().reshape(1)
        dist.all_reduce(bad)
        return bool(bad.cpu()[0] > 0)

    def _grad_norm(self) -> torch.Tensor:
        """‖g‖₂ over all parameters after the boundary backward (whose all-reduce leaves every rank the same
        gradients), as a device tensor."""
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=self.device)

    def _mem_gb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**30
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # Linux: KiB → GiB


class _Window:
    """Host-side counts of the steps since the last logged one (tokens/s is measured over them: with the GPU
    running behind the host, one unlogged step's wall time means nothing)."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.t0, self.steps, self.tokens, self.cells, self.seq_len, self.masked_frac = None, 0, 0.0, 0.0, 0.0, 0.0

    def start(self) -> None:
        if self.t0 is None:
            self.t0 = time.perf_counter()
        self.steps += 1

    def add(self, batch: dict, masked: torch.Tensor, gas: int, cp: int) -> None:
        """One micro-batch (host tensors: no device read): this rank's share of its tokens and cells."""
        self.tokens += batch["input_ids"].numel() / cp
        self.cells += (batch["cu_seqlens"].numel() - 1) / cp
        self.seq_len += effective_seq_len(batch["cu_seqlens"]) / gas
        self.masked_frac += float(masked.sum()) / max(1, masked.numel()) / gas


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host→device copy that never waits: ``non_blocking`` from page-locked memory (the loader pins its batches
    on CUDA; tensors made after it — mask indices, context-parallel shards — are pinned here)."""
    if device.type == "cuda" and not x.is_cuda and not x.is_pinned():
        x = x.pin_memory()
    return x.to(device, non_blocking=True)
