"""``tensor_peft.config`` is a leaf module (it imports nothing from tensor_peft, so that the
ops, layers and backends can take their choices from it) and the one home of each choice."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import tensor_peft.config as config
from tensor_peft.ops.kernelized_delta import KERNEL_PARAMS

LOAD_ALONE = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("standalone_config", sys.argv[1])
module = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = module
spec.loader.exec_module(module)
print(sorted(name for name in sys.modules if name.split(".")[0] == "tensor_peft"))
"""


def test_config_loads_alone_and_imports_nothing_from_tensor_peft():
    """Loaded from its file outside the package: a relative import would fail, an
    absolute one would leave a tensor_peft module behind."""
    path = Path(config.__file__)
    result = subprocess.run(
        [sys.executable, "-c", LOAD_ALONE, str(path)], capture_output=True, text=True, timeout=120, cwd=path.parent
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_kernels_are_the_kernels_the_op_has_parameters_for():
    """The native kernels number the kernels by their place in KERNELS: the op's table
    must list the same kernels, in the same order."""
    assert tuple(KERNEL_PARAMS) == config.KERNELS
