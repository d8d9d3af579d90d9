"""A temporary sqlite tracking store shared by a test module, one experiment per test."""
from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass
class Store:
    uri: str
    client: object
    experiment: str
    exp_id: str

    @property
    def env(self) -> dict[str, str]:
        """What a CliRunner or subprocess needs to read and write this experiment."""
        return {"MLFLOW_TRACKING_URI": self.uri, "MLFLOW_EXPERIMENT_NAME": self.experiment}


def new_experiment(uri: str, test_name: str) -> Store:
    import mlflow
    cl = mlflow.MlflowClient(uri)
    name = re.sub(r"[^\w.-]+", "_", test_name)
    exp = cl.get_experiment_by_name(name)
    exp_id = exp.experiment_id if exp else cl.create_experiment(name)
    return Store(uri=uri, client=cl, experiment=name, exp_id=exp_id)
