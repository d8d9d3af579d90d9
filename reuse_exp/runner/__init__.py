"""Executing one configuration: the tracked run (run.py), launching its data-parallel ranks
(ranks.py) and resuming an interrupted one from its request cache (resume.py)."""
