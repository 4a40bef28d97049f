"""The op-set contract: every backend's op set conforms to ``resfast.ops.opset.OpSet`` -- the same
seven ops with the same argument names -- and the registered schemas are the one Python source."""
from __future__ import annotations

import importlib
import inspect

import pytest
import torch

from resfast.backends import BACKEND_NAMES, BACKEND_TABLE, backend_status
from resfast.ops import reference
from resfast.ops.opset import OP_NAMES, OpSet
from resfast.ops.opsets import get_ops
from resfast.ops.schemas import SCHEMAS


def _protocol_params(name):
    return [p for p in inspect.signature(getattr(OpSet, name)).parameters if p != "self"]


def _schema_params(schema: str):
    return [a.name for a in torch._C.parse_schema(schema).arguments]


def test_schemas_match_the_protocol():
    assert tuple(SCHEMAS) == OP_NAMES
    for name in OP_NAMES:
        assert _schema_params(SCHEMAS[name]) == _protocol_params(name), name


def test_reference_op_set_conforms():
    assert isinstance(reference, OpSet)
    for name in OP_NAMES:
        assert list(inspect.signature(getattr(reference, name)).parameters) == _protocol_params(name), name


@pytest.mark.parametrize("backend", [b for b in BACKEND_NAMES if b != "eager"])
def test_registered_op_sets_conform(backend):
    why = backend_status("cpu")[backend]
    if why:
        pytest.skip(f"backend {backend!r} cannot run on cpu: {why}")
    ops = get_ops(backend)
    assert isinstance(ops, OpSet)
    for name in OP_NAMES:
        schema = getattr(ops, name).default._schema
        assert [a.name for a in schema.arguments] == _protocol_params(name), f"{backend}.{name}"
        assert str(schema).split("::", 1)[1] == str(torch._C.parse_schema(SCHEMAS[name])), f"{backend}.{name}"


@pytest.mark.parametrize("row", BACKEND_TABLE, ids=lambda r: r.name)
def test_table_names_where_get_ops_loads_each_op_set(row):
    why = backend_status("cpu")[row.name]
    if why:
        pytest.skip(f"backend {row.name!r} cannot run on cpu: {why}")
    module, _, attr = row.opset.partition(":")
    mod = importlib.import_module(module)
    assert (getattr(mod, attr) if attr else mod) is get_ops(row.name)


def test_nothing_under_ops_imports_nn():
    """Data flows one way: nn -> ops -> kernels."""
    import pathlib

    root = pathlib.Path(importlib.import_module("resfast").__file__).parent
    for path in sorted((root / "ops").glob("*.py")) + [root / "backends.py"]:
        for line in path.read_text().splitlines():
            if line.lstrip().startswith(("import ", "from ")):
                assert "resfast.nn" not in line and "resfast.models" not in line, f"{path.name}: {line}"
                if path.name == "backends.py":
                    assert "resfast.ops" not in line, f"{path.name}: {line}"
