"""A reward server is the reward side only: ``tailorpo serve-reward NAME`` loads neither diffusers nor peft (the
policy side's libraries, gigabytes of imports and their version constraints), and ``tailorpo`` reaches
``reward_servers`` only through the catalogue's strings."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tailorpo
from tailorpo.prompts import SHAPE_SCENES, shape_caption
from tailorpo.rewards.catalogue import CATALOGUE, REWARD_NAMES
from tailorpo.rewards.grpc_client import GrpcReward

pytestmark = pytest.mark.grpc

POLICY_LIBRARIES = {"diffusers", "peft"}


def imported_packages(importtime_log: str) -> set[str]:
    """Top-level packages named in ``python -X importtime`` output (``import time: self | cumulative | a.b.c``).
    A module loaded by ``importlib.import_module`` itself is not listed, but every ``import`` it runs is: a package
    shows up through its submodules (``diffusers.utils``)."""
    return {line.rsplit("|", 1)[1].strip().split(".")[0]
            for line in importtime_log.splitlines() if line.startswith("import time:") and line.count("|") == 2}


@pytest.mark.slow
@pytest.mark.parametrize("name", REWARD_NAMES)
def test_serve_reward_loads_neither_diffusers_nor_peft(name, tmp_path):
    """The real server process, started as ``reward.launch`` starts it, records every import it makes (Python's
    own ``-X importtime``) through start-up and one Score call; its Info agrees with the catalogue."""
    log = tmp_path / "imports.log"
    command = [sys.executable, "-X", "importtime", "-m", "tailorpo.cli", "serve-reward", name, "--tiny", "--port", "0"]
    with log.open("w") as stderr:  # a file, not a pipe: thousands of import lines would fill a pipe and block
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True)
        try:
            line = proc.stdout.readline()
            assert "listening on" in line, log.read_text()[-2000:]
            client = GrpcReward([line.rsplit(" ", 1)[-1].strip()])
            entry = CATALOGUE[name]
            try:
                assert (client.name, client.differentiable, client.info.score_notes) == (
                    name, entry.differentiable, entry.score_notes)
                x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
                out = client.score(x, [shape_caption(SHAPE_SCENES[0])], want_grad=entry.differentiable)
                assert out.scores.shape == (1,)
            finally:
                client.close()
        finally:
            proc.kill()
            proc.wait()
    imported = imported_packages(log.read_text())
    assert {"torch", "grpc", "tailorpo"} <= imported  # the log covers the serve path, up to the server core
    assert not imported & POLICY_LIBRARIES, f"serve-reward {name} imported {sorted(imported & POLICY_LIBRARIES)}"


def test_tailorpo_never_imports_reward_servers():
    """Not at the top of a module, not inside a function: ``reward_servers`` imports ``tailorpo``, and
    ``tailorpo`` names its modules by ``"module:attr"`` strings (``tailorpo.rewards.catalogue``)."""
    imports = []
    for path in Path(tailorpo.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                imports += [(path, node.lineno, alias.name) for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                imports.append((path, node.lineno, node.module))
    assert len(imports) > 100  # the walk saw the package's imports
    offenders = [f"{path}:{line} imports {module}" for path, line, module in imports
                 if module.split(".")[0] == "reward_servers"]
    assert not offenders, offenders


def test_the_cli_and_config_import_without_torch():
    """The config validates reward names and server settings from the torch-free catalogue and service modules, so
    ``tailorpo --help`` and a config error cost no torch import (seconds)."""
    code = "import sys, tailorpo.cli; print(sorted({'torch', 'grpc', 'transformers'} & set(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", (proc.stdout, proc.stderr)
