"""Run sigattn training on Slurm (or locally) through submitit, and project GPU-hours per model size.

CLIs: ``python -m launch.submit`` (jobs, requeue, array sweeps), ``python -m launch status|tail|cancel``
(job folders), ``python -m launch.project`` (GPU-hour projection). See ``docs/launch.md``.
"""
