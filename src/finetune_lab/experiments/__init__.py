"""The experiments, one module each with its `run(config)` (the entry points of `entry_points.py`), and `sweep` and
`search`, the machinery only the sweeps use. Above the shared modules of `finetune_lab`, which import nothing from
here (`docs/architecture.md`; `tests/test_layers.py` checks it)."""
