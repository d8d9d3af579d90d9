"""Packaging tells the truth: conda.yaml installs what pyproject.toml declares, and the
lowest versions CI tests are the lower bounds pyproject claims."""
import re
import tomllib
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def name_of(requirement: str) -> str:
    return re.split(r"[<>=!~ \[]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def pyproject_deps() -> dict[str, str]:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return {name_of(d): d.replace(" ", "") for d in deps}


def conda_pip() -> list[str]:
    env = yaml.safe_load((REPO / "conda.yaml").read_text())
    return next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))


def conda_problems(pip: list[str], deps: dict[str, str]) -> list[str]:
    listed = {name_of(r): r.replace(" ", "") for r in pip if not r.startswith("-")}
    problems = [f"{n}: pyproject has {d}, conda.yaml {listed.get(n, 'nothing')}"
                for n, d in deps.items() if n != "torch" and listed.get(n) != d]
    problems += [f"{n}: in conda.yaml, not in pyproject" for n in listed if n not in deps]
    if "-e ." not in pip:
        problems.append("conda.yaml does not install the package (-e .)")
    return problems


def test_conda_environment_installs_what_pyproject_declares():
    assert conda_problems(conda_pip(), pyproject_deps()) == []


def test_a_dependency_missing_from_conda_is_caught():
    deps = {**pyproject_deps(), "rich": "rich>=13"}
    assert conda_problems(conda_pip(), deps) == ["rich: pyproject has rich>=13, conda.yaml nothing"]


def test_conda_torch_satisfies_the_bound():
    torch = next(r for r in conda_pip() if name_of(r) == "torch")
    bound = pyproject_deps()["torch"].split(">=")[1]
    assert tuple(map(int, torch.split("==")[1].split("."))) >= tuple(map(int, bound.split(".")))


def test_lowest_versions_ci_tests_are_pyprojects_lower_bounds():
    lowest = {name_of(line): line.split("==")[1] for line in (REPO / ".ci" / "lowest.txt").read_text().splitlines()
              if line and not line.startswith("#")}
    deps = pyproject_deps()
    for name, version in lowest.items():
        assert deps[name].split(">=")[1] in (version, version.rsplit(".0", 1)[0]), name
