"""The suite protocol and the driver that runs any suite.

A suite is a `Suite` value (see the package docstring): its presets
(configurations), how to run one, and how to report the result. The driver
(`run`) does the rest for every suite alike: the OpenBLAS thread default,
the progress bar, the run's ``meta`` (command, machine, load, CPU time),
``results.json`` (also written part-way through when the suite saves), the
Markdown table in ``table.md``, the plots and, on request, the suite's block
of BENCHMARKS.md.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import pathlib
import platform
import shlex
import sys
import time
from typing import Any, Callable, Generic, Mapping, Optional, TypeVar

import jax
from tqdm import tqdm

from foam_optax.bench import report, threads

Config = TypeVar("Config")


@dataclasses.dataclass(frozen=True)
class Block:
  """Where a suite's report goes in BENCHMARKS.md: its heading and the
  markers around it (``--update-docs`` rewrites the text between them)."""

  title: str
  start: str
  end: str

  @property
  def markers(self) -> tuple[str, str]:
    return self.start, self.end


@dataclasses.dataclass(frozen=True)
class Option:
  """A command-line option of a suite: its value (when given) replaces the
  config's field `field`. `flags` and `kwargs` go to
  `argparse.ArgumentParser.add_argument`."""

  flags: tuple[str, ...]
  field: str
  kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Context:
  """What the driver hands a running suite.

  Attributes:
    progress: called with the units of work just done (the progress bar).
    describe: shows what runs now (the progress bar's label).
    save: ``save(partial)`` writes the results so far to ``results.json``
      (with ``meta``), so that a run cut short leaves what it finished.
  """

  progress: Callable[[int], object] = lambda units: None
  describe: Callable[[str], object] = lambda text: None
  save: Callable[[dict], None] = lambda partial: None


@dataclasses.dataclass(frozen=True)
class Suite(Generic[Config]):
  """A benchmark suite (`foam-bench --suite NAME`).

  Attributes:
    name: its name on the command line.
    help: one line for ``--help``.
    presets: named configurations; ``'full'`` is the default and
      ``'quick'`` (``--quick``) a smoke run of seconds to a minute.
    run: ``run(config, context)`` -> the results, a JSON-able dict (a
      ``compile_seconds`` entry is reported in the docs block).
    units_of_work: ``units_of_work(config)``: the progress bar's total,
      counted in `unit` (what ``run`` reports through ``context.progress``).
    seeds: ``seeds(config)``: the seeds it runs, for ``meta``.
    markdown: ``markdown(results)`` -> the printed table (with ``meta``).
    plot: ``plot(results, out_dir)`` -> the paths of the figures written.
    block: ``block(config)`` -> its `Block` of BENCHMARKS.md.
    out: default output directory.
    unit: what the progress bar counts.
    options: its own command-line options (`Option`).
    caption: ``caption(results)``: a sentence after the totals of its
      BENCHMARKS.md block ("" for none).
  """

  name: str
  help: str
  presets: Mapping[str, Config]
  run: Callable[[Config, Context], dict]
  units_of_work: Callable[[Config], int]
  seeds: Callable[[Config], list]
  markdown: Callable[[dict], str]
  plot: Callable[[dict, pathlib.Path], list[pathlib.Path]]
  block: Callable[[Config], Block]
  out: str
  unit: str = "step"
  options: tuple[Option, ...] = ()
  caption: Callable[[dict], str] = lambda results: ""

  def configure(self, preset: str = "full", **fields) -> Config:
    """The preset `preset` with `fields` replaced (the suite's options)."""
    config: Any = self.presets[preset]   # a dataclass
    return dataclasses.replace(config, **fields) if fields else config


def machine() -> dict:
  return {"platform": platform.platform(), "processor": platform.processor(),
          "cpu_count": os.cpu_count(),
          "devices": [str(d) for d in jax.devices()],
          "python": platform.python_version(), "jax": jax.__version__}


def json_safe(value) -> Any:
  """Non-finite floats become None (strict JSON)."""
  if isinstance(value, dict):
    return {k: json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [json_safe(v) for v in value]
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def _write_json(path: pathlib.Path, value: dict) -> None:
  path.write_text(json.dumps(json_safe(value)))


def run(suite: Suite, config, out: pathlib.Path, *, update_docs: bool = False,
        progress: bool = True, openblas: Optional[dict] = None) -> dict:
  """Runs `suite` with `config`, writes its outputs into `out` (and, with
  `update_docs`, its block of ./BENCHMARKS.md and its plots into
  ./docs/figures/), prints its table; returns the results.

  `openblas` is what `threads.limit_openblas` returned; by default it is
  called here (it must run before anything loads SciPy's OpenBLAS).
  """
  openblas = threads.limit_openblas() if openblas is None else openblas
  out.mkdir(parents=True, exist_ok=True)
  started = time.perf_counter()
  # The machine may be shared: its load and the process's CPU time tell
  # how far the wall-clock figures stretched.
  meta = {"command": "foam-bench " + shlex.join(sys.argv[1:]),
          "date": datetime.datetime.now().isoformat(timespec="seconds"),
          "machine": machine(), "seeds": suite.seeds(config),
          "openblas": openblas, "load_average_at_start": os.getloadavg()}
  results = out / "results.json"
  with tqdm(total=suite.units_of_work(config), unit=suite.unit,
            disable=not progress, file=sys.stderr) as bar:
    context = Context(
        progress=bar.update, describe=bar.set_description,
        save=lambda partial: _write_json(results, {"meta": meta, **partial}))
    raw = {"meta": meta, **suite.run(config, context)}
  meta["total_seconds"] = time.perf_counter() - started
  meta["process_cpu_seconds"] = time.process_time()
  meta["load_average_at_end"] = os.getloadavg()
  meta["openblas"]["loaded_threads"] = threads.loaded_blas_threads()
  raw = json_safe(raw)
  _write_json(results, raw)
  table = suite.markdown(raw)
  (out / "table.md").write_text(table)
  figures = suite.plot(raw, out)
  if update_docs:
    block = suite.block(config)
    totals = f"total {meta['total_seconds'] / 60:.1f} min"
    if "compile_seconds" in raw:
      totals += f" (compilation {raw['compile_seconds'] / 60:.1f} min of it)"
    caption = suite.caption(raw)
    totals += "." + (f" {caption}" if caption else "")
    report.update_benchmarks_md(
        pathlib.Path("BENCHMARKS.md"),
        report.docs_block(block.title, raw["meta"], totals, table, figures),
        figures, pathlib.Path("docs/figures"), markers=block.markers)
  print(table)
  print(f"total {meta['total_seconds']:.0f} s; outputs in {out}/")
  return raw
