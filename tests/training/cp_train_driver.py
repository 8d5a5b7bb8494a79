"""Run under torchrun by test_context_parallel_train.py: train the tiny preset once per attention kind in one
process group (``OUT/<kind>/``), so one launch covers sigmoid and softmax.

``python cp_train_driver.py OUT KINDS STOP_AFTER [overrides...]``: KINDS comma-separated; STOP_AFTER > 0 asks
the trainer to stop (checkpoint, return) after that step — a later launch with the same OUT resumes."""

import sys

from training.config import load_config
from training.distributed import shutdown
from training.trainer import Trainer


def main() -> None:
    out, kinds, stop_after, overrides = sys.argv[1], sys.argv[2].split(","), int(sys.argv[3]), sys.argv[4:]

    def stop(trainer, record):
        if record["step"] == stop_after:
            trainer.request_stop()

    try:
        for kind in kinds:
            cfg = load_config(None, [*overrides, f"model.attention={kind}", f"run.dir={out}/{kind}"])
            with Trainer(cfg, callbacks=[stop] if stop_after > 0 else []) as t:
                print(f"{kind}: {t.train()} at step {t.step}", flush=True)
            if cfg.run.compile:
                from torch._dynamo.utils import counters
                print(f"{kind}: compiled graphs {counters['stats']['unique_graphs']}", flush=True)
    finally:
        shutdown()


if __name__ == "__main__":
    main()
