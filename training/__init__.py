"""Single-cell foundation-model training on sigmoid (or softmax) attention.

Modules: ``config`` (dataclasses + YAML + dotted overrides), ``presets`` (model sizes),
``attention`` / ``encoder`` (the model), ``masking`` (masked-expression objective),
``synthetic`` (synthetic cells for benchmarks), ``deepspeed_config``, ``metrics`` (JSONL/TensorBoard,
FLOPs/MFU), ``checkpoint`` (save/resume/inference loading), ``trainer``, ``train`` (entry point).
"""
