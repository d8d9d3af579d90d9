"""Many runs: a policy's grid (k x subset for the fixed one), its launchers, and the comparison
and audit that read the store (store.py holds the queries they share)."""
