"""DeepSpeed trainer for the masked-expression objective.

One optimizer step = ``grad_accum`` micro-batches of ``data.batch_size`` cells per rank. Per
micro-batch a single all-reduce (SUM) carries ``[loss non-finite, stop requested, loss, tokens,
cells]``, so every rank takes the same decision on NaN/Inf losses and on ``request_stop()``.

Non-finite values: a non-finite loss on any rank is caught before ``backward``; policy ``stop``
raises :class:`NonFiniteError` (no checkpoint is written, the last good one stays ``latest``),
policy ``skip`` drops the step (no backward, no update, no LR-schedule advance; counted in
``skipped_steps``; needs ``grad_accum = 1`` so that no partial gradients exist). A non-finite
global gradient norm (finite loss) is handled the same way: ``stop`` raises, ``skip`` counts it, and
no update is applied. DeepSpeed's wrapped optimizers (ZeRO, bf16) compute the norm and skip such an
update themselves; on its plain-optimizer path (ZeRO stage 0 in fp32) it does neither, so the trainer
computes ‖g‖₂ of the all-reduced gradients before ``engine.step()`` and drops the gradients instead.

Context parallelism (``parallel.context_parallel_degree`` P, :mod:`training.parallel`): world = DP × P; data
and masks come from the DP rank, each micro-batch is cut into P equal token shards after masking, the loss
logged is the DP ranks' mean (each CP rank contributes its share).

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
from tqdm.auto import tqdm

from training import checkpoint
from training.compile import compile_blocks
from training.config import Config
from training.deepspeed_config import deepspeed_config
from training.distributed import init_distributed
from training.encoder import build_model
from training.masking import choose_masked, mask_generator
from training.metrics import MetricsLogger, device_peak_flops, effective_seq_len, flops_per_token, head_params
from training.parallel import apply_context_parallel, backward_scale, init_parallel, shard_batch


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
        if r.nan_policy == "skip" and o.grad_accum != 1:
            raise ValueError("run.nan_policy=skip needs optim.grad_accum=1 (a skipped step must hold no partial gradients)")
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
            apply_context_parallel(model, self.parallel.cp_group)
        if r.compile:
            if self.parallel.cp > 1:   # the Ulysses all-to-all inside a block is not traced by fullgraph compile
                raise ValueError("run.compile=true is not supported with parallel.context_parallel_degree > 1 yet")
            compile_blocks(model)
        self.n_params, self.n_params_nonemb = model.num_params(), model.num_params(non_embedding=True)
        self.n_params_head = head_params(model)
        cuda = self.device.type == "cuda"
        optimizer = torch.optim.AdamW(_param_groups(model, o.weight_decay), lr=o.lr, betas=o.betas, eps=o.eps,
                                      fused=cuda or None)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, config=deepspeed_config(cfg, self.parallel.dp, cuda),
            mpu=self.parallel.mpu)
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
        self.callbacks = list(callbacks)
        client = checkpoint.resume(self.engine, self.ckpt_dir)
        if client is not None:
            state = client["sigattn"]
            self.step, self.skipped_steps = state["step"], state["skipped_steps"]
            self.loader.load_state_dict(state["loader"])
        if self.rank == 0:
            print(f"[sigattn] model {mcfg.preset or 'custom'} ({mcfg.attention}): {self.n_params:,} parameters "
                  f"({self.n_params_nonemb:,} non-embedding); world {self.world}"
                  f"{f' = DP {self.parallel.dp} x CP {self.parallel.cp}' if self.parallel.cp > 1 else ''}; "
                  f"{'resumed at step ' + str(self.step) if client else 'fresh start'}", flush=True)

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
                                       num_workers=d.num_workers)
        from data_prep.loader import build_loader
        return build_loader(d.mds, d.split, tokenizer=self.tokenizer, batch_size=d.batch_size,
                            shuffle=d.shuffle, seed=r.seed, num_workers=d.num_workers,
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

        Safe from a signal handler: it only sets a flag, which the next micro-batch all-reduces; the
        step in progress at that moment completes, every rank saves, and ``train()`` returns."""
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

    def _nonfinite(self, what: str, step: int) -> None:
        if self.cfg.run.nan_policy == "stop":
            last = checkpoint.latest_tag(self.ckpt_dir)
            raise NonFiniteError(f"non-finite {what} at step {step}; stopping (nan_policy=stop). "
                                 f"Last good checkpoint: {self.ckpt_dir / last if last else 'none'}")
        self.skipped_steps += 1

    def train(self) -> str:
        """Run to ``run.max_steps``; return ``"finished"`` or ``"stopped"`` (after ``request_stop``)."""
        cfg, r = self.cfg, self.cfg.run
        gas, cp = cfg.optim.grad_accum, self.parallel.cp
        logger = MetricsLogger(self.run_dir, r.tensorboard) if self.rank == 0 else None
        cells_log = (self.run_dir / f"cells_rank{self.rank}.jsonl").open("a") if r.log_cell_ids else None
        peak = device_peak_flops(self.device)
        bar = tqdm(total=r.max_steps, initial=self.step, disable=self.rank != 0 or not r.progress,
                   desc=f"train {cfg.model.attention}", unit="step", dynamic_ncols=True)
        batches = self._batches()
        status = "finished"
        try:
            while self.step < r.max_steps:
                step = self.step + 1
                t0 = time.perf_counter()
                self.engine.train()
                sums = torch.zeros(5, dtype=torch.float64)
                cell_ids, seq_len, masked_frac, bad, stop, grad_norm = [], 0.0, 0.0, False, False, None
                lr = self.engine.get_lr()[0]                 # the LR this step applies
                for micro in range(gas):
                    batch = next(batches)
                    if cells_log is not None:
                        cell_ids += batch["cell_id"].tolist()
                    seq_len += effective_seq_len(batch["cu_seqlens"]) / gas
                    masked = choose_masked(batch["cu_seqlens"], r.mask_ratio,
                                           mask_generator(r.seed, (step - 1) * gas + micro, self.parallel.dp_rank))
                    masked_frac += float(masked.sum()) / max(1, masked.numel()) / gas     # a CPU tensor
                    n_tokens, n_cells = batch["input_ids"].numel() / cp, (batch["cu_seqlens"].numel() - 1) / cp
                    if cp > 1:      # this rank's equal share of the micro-batch's tokens (training.parallel)
                        batch, masked = shard_batch(batch, masked, cp, self.parallel.cp_rank)
                    batch = {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v
                             for k, v in batch.items()}
                    # Indices picked on the host: a bool mask on the GPU would cost a sync in the model.
                    loss, _ = self.engine(batch, masked.nonzero().squeeze(1).to(self.device, non_blocking=True))
                    lv = loss.detach().double().cpu()
                    flags = torch.stack([(~torch.isfinite(lv)).double(), torch.tensor(float(self._stop)),
                                         torch.nan_to_num(lv), torch.tensor(n_tokens),
                                         torch.tensor(n_cells)]).to(self.device)
                    dist.all_reduce(flags)
                    flags = flags.cpu()
                    stop = stop or flags[1] > 0
                    if flags[0] > 0:
                        bad = True
                        break
                    self.engine.backward(loss * backward_scale(cp, r.zero_stage) if cp > 1 else loss)
                    if micro == gas - 1 and self._plain_optimizer:
                        grad_norm = self._reduced_grad_norm()
                        if not math.isfinite(grad_norm):          # as DeepSpeed's wrapped optimizers do:
                            self.engine.zero_grad()               # no update, no LR-schedule advance
                            sums += flags
                            break
                    self.engine.step()
                    sums += flags
                record = {"step": step}
                if bad:
                    self._nonfinite("loss", step)
                    record.update(loss=None, skipped=True, skipped_steps=self.skipped_steps)
                else:
                    if not self._plain_optimizer:
                        grad_norm = self.engine.get_global_grad_norm()
                    gn = float(grad_norm) if grad_norm is not None else None
                    if gn is not None and not math.isfinite(gn):
                        self._nonfinite("gradient norm", step)
                        record["skipped"] = True
                    dt = time.perf_counter() - t0
                    tokens_per_s = float(sums[3]) / dt
                    mfu = None
                    if peak is not None:
                        f = flops_per_token(self.n_params_nonemb, cfg.model.n_layers, cfg.model.d_model, seq_len,
                                            self.n_params_head, masked_frac)
                        mfu = f * tokens_per_s / (peak * self.world)
                    record.update(loss=float(sums[2]) / (gas * self.parallel.dp), grad_norm=gn,
                                  lr=lr,
                                  tokens_per_s=tokens_per_s, cells_per_s=float(sums[4]) / dt, mfu=mfu,
                                  mem_gb=self._mem_gb(), skipped_steps=self.skipped_steps)
                self.step = step
                if cells_log is not None:
                    cells_log.write(json.dumps({"step": step, "rank": self.rank, "cell_ids": cell_ids}) + "\n")
                    cells_log.flush()
                if logger is not None and (step % r.log_every == 0 or step == r.max_steps):
                    logger.log(record)
                bar.update(1)
                if record.get("loss") is not None:
                    bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
                if stop or (r.ckpt_every > 0 and (step % r.ckpt_every == 0 or step == r.max_steps)):
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

    def _reduced_grad_norm(self) -> float:
        """‖g‖₂ over all parameters after the boundary backward (whose all-reduce leaves every rank the same
        gradients); the step's one host read of it."""
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0

    def _mem_gb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**30
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # Linux: KiB → GiB
