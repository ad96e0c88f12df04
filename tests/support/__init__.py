"""Helpers of the tests, one module per concern; `tests/conftest.py` holds only fixtures and hooks.

- `paths`: the repository and the entry point scripts (driven in-process).
- `store`: reading a tracking store back (runs, parents and children, JSON and table artifacts).
- `launch`: `mlflow run` of an entry point, as users start it.
- `checks`: independent recomputations (classification metrics, an adapter reloaded on its base).
- `mlflow_state`: forgetting MLflow's in-process state between stores (the one place that touches its internals).
- `tiers`: the slow tier and the grouping of tests onto xdist workers (the one pytest/xdist workaround).
- `ray_processes`: finding the processes of a local Ray instance.
- `processes`: processes described for a message (those that exited meanwhile left out).
- `signals`: a SIGTERM delivered from inside training.
- `team_server`: a team's tracking server (PostgreSQL, accounts) started and stopped as users do.
"""
