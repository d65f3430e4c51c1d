"""Reproducible optimizer benchmark: `foam-bench` / `python -m foam_optax.bench`.

Modules: `workloads` (problems), `optimizers` (configurations and learning-rate
grids), `runner` (training, sweep, timing), `report` (figures, targets,
tables, plots), `cli` (command line).
"""
