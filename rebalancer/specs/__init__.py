"""Workflow specs: models, YAML loading, interpolation, static validation, built-in specs."""

from rebalancer.specs.builders import task, twap_trade, workflow
from rebalancer.specs.interpolation import Reference, ResolvedParams, Results, references, render
from rebalancer.specs.loading import (
    BUILTIN_DIR,
    available_specs,
    builtin_specs,
    list_specs,
    load_spec_file,
    load_specs,
    spec_from_data,
    validate_file,
)
from rebalancer.specs.models import (
    CONFIG_MODELS,
    AnyTaskConfig,
    DepositConfig,
    MasterTransferConfig,
    ParamSpec,
    TaskConfig,
    TaskSpec,
    TradeConfig,
    TransferConfig,
    TwapSpec,
    WithdrawConfig,
    WorkflowSpec,
)
from rebalancer.specs.recorded import RECORDED_FIELDS, result_path_ok
from rebalancer.specs.resolution import (
    dump_params,
    resolve_config,
    resolve_params,
    resolve_result,
)
from rebalancer.specs.validation import InvalidSpecError, spec_problems, validate_spec

__all__ = [
    "BUILTIN_DIR",
    "CONFIG_MODELS",
    "RECORDED_FIELDS",
    "AnyTaskConfig",
    "DepositConfig",
    "InvalidSpecError",
    "MasterTransferConfig",
    "ParamSpec",
    "Reference",
    "ResolvedParams",
    "Results",
    "TaskConfig",
    "TaskSpec",
    "TradeConfig",
    "TransferConfig",
    "TwapSpec",
    "WithdrawConfig",
    "WorkflowSpec",
    "available_specs",
    "builtin_specs",
    "dump_params",
    "list_specs",
    "load_spec_file",
    "load_specs",
    "references",
    "render",
    "resolve_config",
    "resolve_params",
    "resolve_result",
    "result_path_ok",
    "spec_from_data",
    "spec_problems",
    "task",
    "twap_trade",
    "validate_file",
    "validate_spec",
    "workflow",
]
