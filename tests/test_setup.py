"""The fresh-machine path: the README's commands, .ci/run and the pinned versions agree."""

import re
import tomllib

from conftest import REPO


def readme_commands() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_ci_runs_the_readme_test_command_in_a_new_virtualenv():
    setup, tests = readme_commands()[:2]
    ci = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci[-1] == tests, (ci[-1], tests)
    assert "rm -rf .venv" in ci  # a new virtualenv every time, not the machine's site-packages
    for command in (setup, tests):
        assert command.startswith("python3 -m venv .venv && . .venv/bin/activate && ")
        installs = re.findall(r"pip install [^&]*", command)
        assert installs and all("-c constraints.txt" in i for i in installs), installs
    assert setup.endswith("decomp-jax train configs/quickstart.yaml") and tests.endswith("python -m pytest -q -n 2")


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_constraints_pin_every_dependency_to_one_version():
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[_name(name)] = version
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = list(project["dependencies"]) + [r for extra in project["optional-dependencies"].values() for r in extra]
    # the packages the README's test command installs without their dependencies (the model packages; tunix)
    wanted += re.search(r"--no-deps ([^&]*)&&", readme_commands()[1]).group(1).split()
    missing = [r for r in wanted if _name(r) not in pins]
    assert not missing, f"constraints.txt pins nothing for {missing}: run scripts/update_constraints.sh"
    assert pins["transformers"].startswith("5.") and pins["torch"] == "2.13.0" and pins["jax"] == "0.10.2"
    # pyproject.toml holds tested ranges, never one exact version (constraints.txt does that)
    exact = [r for r in wanted if "==" in r]
    assert not exact, f"pyproject.toml pins {exact} exactly: give a range"
    transformers = next(r for r in project["dependencies"] if _name(r) == "transformers")
    assert "4.57" in transformers and "<6" in transformers  # both lines are tested (transformers 4.57 and 5.x)


def test_version_is_one_number_everywhere(capsys):
    """`decomp-jax --version`, ``decomp_jax.__version__``, pyproject.toml and the CHANGELOG's latest entry agree."""
    import pytest

    import decomp_jax
    from decomp_jax.app.cli import main

    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert decomp_jax.__version__ == version
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"decomp-jax {version}"
    latest = re.search(r"^## \[?([0-9][^\] ]*)", (REPO / "CHANGELOG.md").read_text(), re.M).group(1)
    assert latest == version
    assert (REPO / "decomp_jax" / "py.typed").is_file()
