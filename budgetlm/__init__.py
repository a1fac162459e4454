"""budgetlm: make LLM reasoning spend compute deliberately.

The core is light (numpy, pydantic); backends import their engines lazily::

    import budgetlm
    from budgetlm.backends import load

    backend = load("default")                      # SmolLM2-135M-Instruct on vLLM
    meter = budgetlm.Meter(budgetlm.Budget(output_tokens=512, usd=0.01))
    [res] = backend.generate(["What is 2 + 3?"], meter)
    print(res.first.text, meter.summary())
"""

from budgetlm.budget import UNITS, Budget, Unit
from budgetlm.costs import CostModel, EnergyMeter, ModelInfo, Price, PriceTable
from budgetlm.errors import (
    BackendError,
    BackendUnavailable,
    BudgetExceeded,
    BudgetLMError,
    ConfigError,
    MissingDependency,
    UnknownNameError,
)
from budgetlm.meter import Meter, Reservation
from budgetlm.thinking import ThinkingFormat, split_thinking
from budgetlm.usage import Usage

__version__ = "0.1.0"

__all__ = [
    "UNITS",
    "BackendError",
    "BackendUnavailable",
    "Budget",
    "BudgetExceeded",
    "BudgetLMError",
    "ConfigError",
    "CostModel",
    "EnergyMeter",
    "Meter",
    "MissingDependency",
    "ModelInfo",
    "Price",
    "PriceTable",
    "Reservation",
    "ThinkingFormat",
    "Unit",
    "UnknownNameError",
    "Usage",
    "split_thinking",
]
