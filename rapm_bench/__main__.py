"""`python -m rapm_bench ...` (and `accelerate launch -m rapm_bench ...`): the same CLI."""

from .cli import main

main()
