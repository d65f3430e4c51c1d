"""Reproducible optimizer benchmark: `foam-bench` / `python -m foam_optax.bench`.

Suites, each one module (``foam-bench --suite NAME``, registered in
`cli.SUITES`): ``default`` (`comparison`: optimizers side by side),
``scale`` (the FOAM paper's claims where eigendecompositions cost),
``stability`` (divergence under a data switch), ``transfer`` (learning
rates across widths, μP) and ``bias`` (bias-corrected preconditioning).

What they share: `workloads` (problems), `optimizers` (configurations and
learning-rate grids), `trainer` (the compiled, timed train step with
microbatches, schedules and deadlines; the learning-rate sweep; the time to
a target), `measure` (timing and memory helpers, also used by
``scripts/``), `report` (formatting, targets table, figures, the
BENCHMARKS.md block), `harness` (the suite protocol and the driver) and
`cli` (the command line).

The suite protocol. A suite module defines a `harness.Suite`, usually
``SUITE = harness.Suite(...)``, with:

* ``presets``: named configurations, usually frozen dataclasses, at least
  ``'full'`` (the recorded run) and ``'quick'`` (``--quick``: seconds to a
  minute; the test suite runs it for every registered suite);
* ``run(config, context) -> dict``: the results, JSON-able (non-finite
  floats are stored as null). It reports its progress with
  ``context.progress(units)`` (``units_of_work(config)`` in all),
  may label it with ``context.describe(text)`` and may save partial results
  with ``context.save(partial)`` (a run cut short then leaves them). Its
  ``targets`` entry, by convention ``{name: {"target", "measured", "met"}}``,
  is printed by `report.targets_table`; a ``compile_seconds`` entry appears
  in the BENCHMARKS.md block;
* ``units_of_work(config)``, ``seeds(config)`` (recorded in ``meta``);
* ``markdown(results) -> str`` (the printed table, also ``table.md``) and
  ``plot(results, out_dir) -> [paths]`` (with `report.pyplot` and
  `report.save_figure`);
* ``block(config) -> harness.Block``: its heading and markers in
  BENCHMARKS.md (``--update-docs``);
* ``out`` (default ``--out``), ``unit`` (what the progress bar counts),
  ``options`` (its own command-line options, `harness.Option`, each
  setting one config field) and ``caption`` (a sentence for its block).

Adding a suite is that module and one line ``"NAME": module.SUITE`` in
`cli.SUITES`; the driver (`harness.run`) does the rest alike for every
suite: the OpenBLAS thread default, the progress bar, ``meta`` (command,
machine, load, CPU time), ``results.json``, ``table.md``, the plots, the
printed table and the BENCHMARKS.md block. Stepwise suites train with
`trainer.Trainer`; suites of thousands of short runs (``stability``,
``transfer``) compile whole runs as one `jax.lax.scan` instead.
"""
