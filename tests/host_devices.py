"""The environment of tests that run JAX on several CPU (host) devices.

The device count must be set before JAX starts, so these tests run in
subprocesses, each under a timeout: a deadlocked collective fails the test
instead of stalling the run. Their training loops wait for each step
(`jax.block_until_ready`): XLA's CPU collectives deadlock when several steps
of a program with collectives are in flight at once, for plain optax code
too (docs/multi_device.md gives the measurements), and then abort after
their 40 s rendezvous timeout.

A test module runs all its checks in one such process (`run_checks`): the
process imports the module and calls each check's function in turn, so JAX
starts once and programs the checks share compile once; each test then reads
its own check's result (`result`), failing with that check's own error.
"""

import contextlib
import importlib
import io
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import traceback

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
_TESTS = pathlib.Path(__file__).resolve().parent


def _fast_compile_flags() -> str:
  """`measure.fast_compile()`'s options as XLA flags. These processes run
  each program for a few steps and compare results computed in the same
  process: optimising the machine code would cost most of their seconds."""
  from foam_optax.bench import measure
  return " ".join(f"--{name}={str(value).lower()}"
                  for name, value in measure.fast_compile().items())


def env(count: int = 8, **extra) -> dict:
  """`os.environ` with `count` CPU devices and XLA's cheap compile settings
  (a process whose results must match the caller's bit for bit compiles
  with the same options: test_checkpoint.py)."""
  flags = f"--xla_force_host_platform_device_count={count}"
  return dict(os.environ, JAX_PLATFORMS="cpu",
              XLA_FLAGS=f"{flags} {_fast_compile_flags()}", **extra)


def run(args, timeout: int, count: int = 8) -> str:
  """`python args...` from the repository root on `count` devices; its
  stdout, after asserting it exited 0."""
  out = subprocess.run([sys.executable, *args], env=env(count), cwd=ROOT,
                       capture_output=True, text=True, timeout=timeout)
  assert out.returncode == 0, out.stderr[-4000:]
  return out.stdout


def script_json(script: str, *args):
  """The JSON that ``scripts/<script>.py args... --json PATH`` writes, its
  `main` run in this process."""
  scripts = str(ROOT / "scripts")
  if scripts not in sys.path:
    sys.path.insert(0, scripts)
  main = importlib.import_module(script).main
  with tempfile.TemporaryDirectory() as tmp:
    path = f"{tmp}/{script}.json"
    main([*args, "--json", path])
    with open(path) as f:
      return json.load(f)


def printed(code: str) -> str:
  """The last line that `code`, run as a program (in a namespace of its
  own), prints."""
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    exec(compile(code, "<program>", "exec"), {"__name__": "__main__"})
  return out.getvalue().strip().splitlines()[-1]


def checks_in_this_process(module: str, calls) -> None:
  """The checks' process: each `(name, function, args)` of `calls` in turn,
  `function` a name in the test module `module`. Prints a JSON line as each
  starts and ends, with the function's result (JSON) or the traceback of
  its failure, so that a timeout or crash names its check; what the
  function prints is kept out of those lines."""
  functions = importlib.import_module(module)
  for name, function, args in calls:
    print(json.dumps({"start": name}), flush=True)
    try:
      with contextlib.redirect_stdout(io.StringIO()):
        value = getattr(functions, function)(*args)
      print(json.dumps({"done": name, "result": value}), flush=True)
    except (Exception, SystemExit):   # reported to the check's own test
      print(json.dumps({"failed": name, "error": traceback.format_exc()}),
            flush=True)


def run_checks(module: str, calls, timeout: int, count: int = 8) -> dict:
  """Runs `calls` (see `checks_in_this_process`) in one new process on
  `count` CPU devices (`env`), from the repository root, under `timeout`
  seconds for all of them (a deadlocked collective fails instead of
  stalling). Returns `{name: ("done", result)}` for each check that
  finished, else `{name: ("failed", reason)}`."""
  code = (f"import sys; sys.path.insert(0, {str(_TESTS)!r}); "
          "import host_devices; "
          f"host_devices.checks_in_this_process({module!r}, {calls!r})")
  try:
    out = subprocess.run([sys.executable, "-c", code],
                         env=env(count), cwd=ROOT,
                         capture_output=True, text=True, timeout=timeout)
    stdout = out.stdout
    ended = (None if out.returncode == 0 else
             f"the process exited {out.returncode}: {out.stderr[-3000:]}")
  except subprocess.TimeoutExpired as e:
    decode = lambda b: b.decode() if isinstance(b, bytes) else (b or "")
    stdout = decode(e.stdout)
    ended = f"timed out after {timeout} s: {decode(e.stderr)[-3000:]}"
  events = [json.loads(line) for line in stdout.splitlines()
            if line.startswith("{")]
  started = {e["start"] for e in events if "start" in e}
  done = {e["done"]: e["result"] for e in events if "done" in e}
  failed = {e["failed"]: e["error"] for e in events if "failed" in e}
  outcomes = {}
  for name, _, _ in calls:
    if name in done and ended is None:
      outcomes[name] = ("done", done[name])
    elif name in done or name in failed:
      outcomes[name] = ("failed", failed.get(name) or f"finished, but {ended}")
    elif name in started:
      outcomes[name] = ("failed", f"it was running when {ended}")
    else:
      outcomes[name] = ("failed", f"not run: {ended}")
  return outcomes


def result(outcomes: dict, name: str):
  """The result of check `name` of `run_checks`; fails the calling test with
  the check's own error if it did not finish."""
  status, value = outcomes[name]
  if status != "done":
    pytest.fail(f"check {name!r} on host devices: {value}", pytrace=False)
  return value
