"""`python -m lowvram` (and `torchrun -m lowvram train ...`) run the CLI."""

from lowvram.cli import main

main()
