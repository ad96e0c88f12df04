"""What a team runs beside the experiments: its tracking server (`python -m finetune_lab.team.server`) and the
store's benchmark (`python -m finetune_lab.team.store_bench`). Not experiments: they make no run of their own kind."""
