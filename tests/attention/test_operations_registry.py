"""The operations registry holds together: each operation is wired to the API, its ranges and
the method of its stage, so adding one is a module plus its entry."""

from __future__ import annotations

import dataclasses

import pytest
from attnserve.attention.operations import OPERATIONS, Operation, Stage
from attnserve.spec.ranges import PARAMETER_RANGES
from attnserve_client.v1 import intervention_pb2

STAGE_METHODS = {
    Stage.LOGIT_SCALE: "scale_logits",
    Stage.LOGIT_REWRITE: "rewrite_logits",
    Stage.BIAS: "edit_bias",
    Stage.PROBABILITIES: "edit_probabilities",
    Stage.OUTPUT: "edit_output",
}


def test_registry_is_the_api():
    api = {
        field.name for field in intervention_pb2.Intervention.DESCRIPTOR.oneofs_by_name["operation"].fields
    }
    assert set(OPERATIONS) == api
    kinds = {
        name.removeprefix("OPERATION_KIND_").lower() for name in intervention_pb2.OperationKind.keys()[1:]
    }
    assert set(OPERATIONS) == kinds


@pytest.mark.parametrize("name", list(OPERATIONS))
def test_operation_implements_its_stage(name):
    op = OPERATIONS[name]
    assert op.name == name
    own = STAGE_METHODS[op.stage]
    assert getattr(op, own) is not getattr(Operation, own), f"{name} does not implement {own}"
    others = set(STAGE_METHODS.values()) - {own}
    assert all(getattr(op, method) is getattr(Operation, method) for method in others)


@pytest.mark.parametrize("name", list(OPERATIONS))
def test_parameters_match_the_message(name):
    op = OPERATIONS[name]
    message = getattr(intervention_pb2, op.__name__)
    message_fields = {field.name for field in message.DESCRIPTOR.fields}
    parameters = dataclasses.fields(op)
    assert {p.name for p in parameters} == message_fields
    for parameter in parameters:
        if parameter.type != "int":
            # Every float parameter has a range, and its default lies in it.
            assert parameter.default in PARAMETER_RANGES[f"{name}.{parameter.name}"]


def test_registry_is_in_stage_order():
    stages = [op.stage for op in OPERATIONS.values()]
    assert stages == sorted(stages)
