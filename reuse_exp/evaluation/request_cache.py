"""Each request's result kept with what computing it measured, as soon as it is computed.

A run killed part way and resumed answers the requests its predecessor finished from here,
with their decode statistics, so the resumed run's counts and fractions cover every document
(only its throughput covers just what it decoded). One sqlite file per rank, as lm-eval's
CachingLM lays it out (`requests_rank<R>.db`, table `unnamed`, keys from lm-eval's
`hash_args`), but each value holds the result and its statistics together: one write, so a
kill never leaves a result without them.
"""
from __future__ import annotations

from pathlib import Path


class RequestCache:
    def __init__(self, folder: Path, rank: int):
        from sqlitedict import SqliteDict
        folder.mkdir(parents=True, exist_ok=True)
        # autocommit: each result is on disk once written, whatever kills the process after
        self.db = SqliteDict(str(folder / f"requests_rank{rank}.db"), autocommit=True)

    @staticmethod
    def key(method: str, args) -> str:
        from lm_eval.api.model import hash_args
        return hash_args(method, args)

    def get(self, method: str, args) -> tuple[object, dict] | None:
        """(result, statistics) of a request computed before, or None."""
        value = self.db.get(self.key(method, args))
        if not isinstance(value, dict) or "stats" not in value:   # lm-eval's own entries carry no stats
            return None
        return value["result"], value["stats"]

    def put(self, method: str, args, result, stats: dict) -> None:
        self.db[self.key(method, args)] = {"result": result, "stats": stats}

    def close(self) -> None:
        self.db.close()
