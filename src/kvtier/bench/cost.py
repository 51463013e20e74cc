"""The cost view: does caching pay for this traffic, per million requests?

    compute saved = (baseline - config) engine seconds per request x 1e6 / 3600 x gpu_hour
    storage       = bytes written to persistent tiers (disk, remote) per request x 1e6 / 1e9
                    x storage_gb_month x retention_hours / 730
    transfer      = bytes moved over the network (remote reads + writes) per request x 1e6 / 1e9
                    x transfer_gb
    net saving    = compute saved - storage - transfer        (negative: caching costs money)

Engine seconds are what the bench measured: on a GPU machine they stand for GPU time; on a CPU
machine they are the engine processes' CPU seconds, a stand-in for GPU seconds (the report says
so). Every byte written is assumed kept for ``retention_hours`` (kvtier's remote TTL defaults to
24 h); host memory is taken as already paid for. GB = 1e9 bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import yaml

from kvtier.errors import ConfigError

HOURS_PER_MONTH = 730.0
REQUESTS = 1_000_000
BYTES_PER_GB = 1e9
# Example prices, used when none are given (a cloud GPU, object storage, inter-zone transfer).
DEFAULT_PRICES = {"gpu_hour": 2.50, "storage_gb_month": 0.023, "transfer_gb": 0.01, "retention_hours": 24.0}


@dataclass(frozen=True)
class Prices:
    gpu_hour: float  # per GPU-hour (here: per engine-hour of compute)
    storage_gb_month: float
    transfer_gb: float
    retention_hours: float  # how long each stored byte is kept
    source: str  # where they came from, for the report

    def as_dict(self) -> dict[str, float | str]:
        return {"gpu_hour": self.gpu_hour, "storage_gb_month": self.storage_gb_month,
                "transfer_gb": self.transfer_gb, "retention_hours": self.retention_hours, "source": self.source}


@dataclass(frozen=True)
class CostView:
    compute_saved_s_per_request: float
    stored_bytes_per_request: float
    network_bytes_per_request: float
    compute_saving_per_million: float
    storage_cost_per_million: float
    transfer_cost_per_million: float

    @property
    def net_saving_per_million(self) -> float:
        return self.compute_saving_per_million - self.storage_cost_per_million - self.transfer_cost_per_million

    def as_dict(self) -> dict[str, float]:
        return {"compute_saved_s_per_request": self.compute_saved_s_per_request,
                "stored_bytes_per_request": self.stored_bytes_per_request,
                "network_bytes_per_request": self.network_bytes_per_request,
                "compute_saving_per_million": self.compute_saving_per_million,
                "storage_cost_per_million": self.storage_cost_per_million,
                "transfer_cost_per_million": self.transfer_cost_per_million,
                "net_saving_per_million": self.net_saving_per_million}


def parse_prices(text: str, where: str) -> dict[str, float]:
    """Prices from YAML or JSON text (a mapping of the keys of DEFAULT_PRICES to numbers >= 0).
    Raises ConfigError naming ``where`` and the key for an unknown key or a bad value."""
    try:
        raw = json.loads(text) if text.lstrip().startswith("{") else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise ConfigError(where, f"not YAML or JSON: {exc}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(where, "expected a mapping of prices, e.g. gpu_hour: 2.5")
    prices = {}
    for key, number in raw.items():
        if key not in DEFAULT_PRICES:
            raise ConfigError(f"{where}: {key}", f"unknown price; known: {', '.join(DEFAULT_PRICES)}")
        if isinstance(number, bool) or not isinstance(number, (int, float)) or number < 0:
            raise ConfigError(f"{where}: {key}", f"expected a number >= 0, got {number!r}")
        prices[key] = float(number)
    return prices


def load_prices(path: str | None, overrides: dict[str, float]) -> Prices:
    """Defaults < the file at ``path`` < ``overrides`` (command-line flags). Raises ConfigError."""
    values = dict(DEFAULT_PRICES)
    sources = []
    if path is not None:
        try:
            with open(path) as file:
                values |= parse_prices(file.read(), path)
        except OSError as exc:
            raise ConfigError("--prices", f"cannot read {path}: {exc.strerror}") from None
        sources.append(path)
    for key, number in overrides.items():
        if number < 0:
            raise ConfigError(f"--{key.replace('_', '-')}", f"expected a number >= 0, got {number}")
        values[key] = number
        sources.append(f"--{key.replace('_', '-')}")
    source = ", ".join(sources) if sources else "example defaults (pass --prices FILE or --gpu-hour ...)"
    return Prices(values["gpu_hour"], values["storage_gb_month"], values["transfer_gb"],
                  values["retention_hours"], source)


def cost_view(baseline_s_per_request: float, config_s_per_request: float, stored_bytes_per_request: float,
              network_bytes_per_request: float, prices: Prices) -> CostView:
    """The formulas of the module docstring, per million requests."""
    saved_s = baseline_s_per_request - config_s_per_request
    stored_gb = stored_bytes_per_request * REQUESTS / BYTES_PER_GB
    moved_gb = network_bytes_per_request * REQUESTS / BYTES_PER_GB
    return CostView(
        compute_saved_s_per_request=saved_s,
        stored_bytes_per_request=stored_bytes_per_request,
        network_bytes_per_request=network_bytes_per_request,
        compute_saving_per_million=saved_s * REQUESTS / 3600.0 * prices.gpu_hour,
        storage_cost_per_million=stored_gb * prices.storage_gb_month * prices.retention_hours / HOURS_PER_MONTH,
        transfer_cost_per_million=moved_gb * prices.transfer_gb)
