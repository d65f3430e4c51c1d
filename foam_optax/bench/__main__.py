"""`python -m foam_optax.bench`: same as `foam-bench`."""

from foam_optax.bench.cli import main

main()
