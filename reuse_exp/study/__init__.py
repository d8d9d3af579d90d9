"""Many runs: the k x subset grid, its launchers, and the comparison and audit that read the
store (store.py holds the queries they share)."""
