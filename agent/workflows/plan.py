"""A configured workflow prepared for execution: its parameter specs, the tags its steps use
(with their value rules), and the checks that need both a plan and a command or a saga."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agent.settings.config_file import AgentSettings
from agent.settings.workflows import ConfirmStep, ParamSpec, WaitStep, WorkflowConfig, WriteStep
from agent.workflows.commands import CommandRejected, clip, render
from agent.workflows.saga_log import SagaRecord
from drivers.config import TagConfigBase

Step = WriteStep | WaitStep | ConfirmStep


def step_ref(step: Step) -> str | None:
    """The 'device/tag' a step writes or waits on (None for a confirm step)."""
    if isinstance(step, WriteStep):
        return step.write
    if isinstance(step, WaitStep):
        return step.wait
    return None


def step_kind(step: Step) -> str:
    """write | wait | confirm, as the saga log records it."""
    if isinstance(step, WriteStep):
        return "write"
    return "wait" if isinstance(step, WaitStep) else "confirm"


@dataclass(frozen=True, slots=True)
class Plan:
    """A configured workflow, prepared for execution."""

    config: WorkflowConfig
    specs: dict[str, ParamSpec]
    devices: frozenset[str]
    tags: dict[str, TagConfigBase]  # every device/tag its steps use

    @property
    def name(self) -> str:
        """The workflow's name."""
        return self.config.name

    @classmethod
    def of(cls, settings: AgentSettings, workflow: WorkflowConfig) -> Plan:
        """The plan of `workflow` with the tags of a loaded config."""
        tags: dict[str, TagConfigBase] = {}
        for step in workflow.steps:
            ref = step_ref(step)
            if ref is None:
                continue
            resolved = settings.tag(ref)
            if resolved is None:
                # `edge-agent check` refuses such a config; never reached with a loaded one.
                raise ValueError(f"workflow {workflow.name}: unknown tag {ref}")
            tags[ref] = resolved[1]
        devices = frozenset(ref.partition("/")[0] for ref in tags)
        return cls(workflow, workflow.param_specs, devices, tags)

    def prepare_values(self, params: Mapping[str, Any]) -> None:
        """Render and convert every step value now, so that a bad value is a rejection."""
        for idx, step in enumerate(self.config.steps, start=1):
            if isinstance(step, ConfirmStep):
                continue
            ref = step.write if isinstance(step, WriteStep) else step.wait
            values = [step.value]
            if isinstance(step, WriteStep) and step.compensate_value is not None:
                values.append(step.compensate_value)
            for value in values:
                try:
                    self.tags[ref].command_value(render(value, params))
                except (ValueError, KeyError, IndexError) as exc:
                    raise CommandRejected(f"step {idx} ({ref}): {clip(str(exc))}") from None

    def mismatch(self, saga: SagaRecord) -> str | None:
        """Why an unfinished saga no longer fits this plan (None: it does)."""
        steps = self.config.steps
        for idx, row in saga.steps.items():
            if idx > len(steps):
                return f"workflow {saga.workflow!r} changed (fewer steps)"
            step = steps[idx - 1]
            if row.kind != step_kind(step) or row.ref != step_ref(step):
                return f"workflow {saga.workflow!r} changed (step {idx})"
        return None


def saga_devices(saga: SagaRecord) -> frozenset[str]:
    """The devices a saga's recorded steps touched."""
    return frozenset(row.ref.partition("/")[0] for row in saga.steps.values() if row.ref)
