#!/bin/bash
# The paper's stability setting: 160m, 8K context, 80K steps, no gradient clipping,
# 2 attentions x 3 learning rates = 6 array tasks of 16 GPUs.
# Projected: 974 GPU-hours in all sigmoid 154, softmax 170 GPU-hours per arm.
# Each run writes stability.jsonl (loss, grad norm, max attention logit, max activation per step).
# Run from the repository root.
set -euo pipefail
python -m launch.submit 160m data.mds=null data.context_length=8192 data.batch_size=8 data.synthetic_vocab=20000 data.synthetic_mean_genes=10000 optim.grad_clip=null optim.warmup_steps=2000 run.max_steps=80000 run.seed=0 run.nan_policy=stop run.ckpt_every=1000 run.tensorboard=false --nodes 2 --gpus-per-node 8 --time 24:00:00 --name stability-160m-8k --entry training.reproduce.entry:build_trainer --array-sweep model.attention=sigmoid,softmax optim.lr=0.0006,0.002,0.006
