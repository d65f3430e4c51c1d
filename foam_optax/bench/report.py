"""What every suite's report shares: number formatting, the targets table,
figure saving and the BENCHMARKS.md block."""

from __future__ import annotations

import pathlib
import re
import shutil
from typing import Any, Optional


def fmt(value: Optional[float], spec: str = ".3g",
        std: Optional[float] = None) -> str:
  """`value` formatted by `spec`, with ``± std`` when `std` is given
  (without a leading sign); "—" for None (a missing or, once stored as
  JSON, non-finite figure)."""
  if value is None:
    return "—"
  text = format(value, spec)
  if std is None:
    return text
  return f"{text} ± {format(std, spec.lstrip('+'))}"


def targets_table(target_results: dict) -> str:
  """Markdown table ``target | measured | met/missed`` of a suite's targets
  (each a dict with ``target``, ``measured`` and ``met``)."""
  lines = ["| target | measured | met/missed |", "|---|---|---|"]
  for result in target_results.values():
    lines.append(f"| {result['target']} | {result['measured']} | "
                 f"{'met' if result['met'] else 'missed'} |")
  return "\n".join(lines) + "\n"


def pyplot() -> Any:
  """`matplotlib.pyplot` on the Agg backend (files only, no display)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def save_figure(fig, path: pathlib.Path) -> pathlib.Path:
  """Lays out, writes and closes `fig`; returns `path`."""
  fig.tight_layout()
  fig.savefig(path)
  pyplot().close(fig)
  return path


def docs_block(title: str, meta: dict, totals: str, table: str,
               figures: list[pathlib.Path]) -> str:
  """A suite's BENCHMARKS.md block: `title`, the command, machine and load
  (from `meta`), `totals`, the table and the plots."""
  m = meta["machine"]
  load = ""
  if "load_average_at_start" in meta:
    load = (f" 1-min load average {meta['load_average_at_start'][0]:.1f} at "
            f"the start, {meta['load_average_at_end'][0]:.1f} at the end; "
            f"process CPU time {meta['process_cpu_seconds'] / 60:.1f} min; "
            f"OPENBLAS_NUM_THREADS="
            f"{meta['openblas']['OPENBLAS_NUM_THREADS']} (set by "
            f"{meta['openblas']['set_by']}).")
  lines = [
      title, "",
      f"Output of `{meta['command']}` on {meta['date'][:10]}: "
      f"{m['processor'] or m['platform']}, {m['cpu_count']} CPU cores, "
      f"devices {', '.join(m['devices'])}, JAX {m['jax']}; {totals}{load}",
      "", table, "", "#### Plots", ""]
  lines += [f"![{f.stem}](docs/figures/{f.name})" for f in figures]
  return "\n".join(lines)


def update_benchmarks_md(path: pathlib.Path, block: str,
                         figures: list[pathlib.Path],
                         figures_dir: pathlib.Path,
                         markers: tuple[str, str]) -> None:
  """Replaces the text between `markers` in `path` (appending the markers
  if absent) and copies `figures` into `figures_dir`."""
  start_marker, end_marker = markers
  figures_dir.mkdir(parents=True, exist_ok=True)
  for figure in figures:
    shutil.copy(figure, figures_dir / figure.name)
  text = path.read_text() if path.exists() else "# Benchmarks\n"
  new_block = f"{start_marker}\n{block.rstrip()}\n{end_marker}"
  pattern = re.compile(re.escape(start_marker) + ".*?" + re.escape(end_marker),
                       re.DOTALL)
  if pattern.search(text):
    text = pattern.sub(lambda _: new_block, text)
  else:
    text = text.rstrip() + "\n\n" + new_block + "\n"
  path.write_text(text)
