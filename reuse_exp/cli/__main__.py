"""`python -m reuse_exp.cli ...`: what MLproject, the grid's jobs and the launched ranks run."""
from . import main

main()
