"""The numbers of a benchmark's results.json, for the suites' smoke tests."""


def json_numbers(value):
  """Every int and float (not bool) in a tree of dicts and lists."""
  if isinstance(value, dict):
    for v in value.values():
      yield from json_numbers(v)
  elif isinstance(value, list):
    for v in value:
      yield from json_numbers(v)
  elif isinstance(value, (int, float)) and not isinstance(value, bool):
    yield value
