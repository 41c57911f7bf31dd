"""The noise schedule of a diffusion model: how much noise each training timestep holds, and the targets.

x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, with abar_t the cumulative product of 1 - beta over the
first t+1 steps. The model learns the noise (epsilon), the velocity v = sqrt(abar) noise - sqrt(1 - abar) x0,
or x0 itself ("sample"). Values follow diffusers' schedulers exactly (float32 betas, the same spacings), so a
checkpoint's scheduler_config.json means the same thing here; tests compare them step by step.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from duomo.errors import ConfigError
from duomo.models.validate import check_fields

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
SPACINGS = ("leading", "trailing", "linspace")

# diffusers scheduler classes -> duomo's sampler names (what a scheduler_config.json's `_class_name` implies)
SCHEDULER_CLASSES = {
    "DDPMScheduler": "ddpm",
    "DDIMScheduler": "ddim",
    "PNDMScheduler": "dpm",  # PNDM (SD 1.x's default) is not implemented: its files get DPM-Solver++ 2M
    "EulerAncestralDiscreteScheduler": "euler_a",
    "EulerDiscreteScheduler": "euler_a",
    "DPMSolverMultistepScheduler": "dpm",
    "LMSDiscreteScheduler": "dpm",
}
# keys of diffusers scheduler configs that do not change the schedule duomo computes (bookkeeping, or
# sampler options whose defaults duomo's samplers implement)
IGNORED_KEYS = {
    "_class_name", "_diffusers_version", "skip_prk_steps", "trained_betas", "variance_type", "thresholding",
    "dynamic_thresholding_ratio", "sample_max_value", "solver_order", "algorithm_type", "solver_type",
    "lower_order_final", "euler_at_final", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
    "use_lu_lambdas", "use_flow_sigmas", "flow_shift", "final_sigmas_type", "lambda_min_clipped",
    "timestep_type", "interpolation_type", "sigma_min", "sigma_max", "use_dynamic_shifting",
    "time_shift_type", "rescale_betas_zero_snr", "prediction_type_", "clip_sample_range_", "shift_terminal",
}  # fmt: skip


@dataclass
class ScheduleConfig:
    """diffusers' scheduler fields that define the noise levels and the timesteps a sampler visits."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 1
    set_alpha_to_one: bool = False  # DDIM's final step: abar = 1 (True) or abar_0 (False)
    clip_sample: bool = False  # clamp predicted x0 to [-clip_sample_range, clip_sample_range]
    clip_sample_range: float = 1.0

    def __post_init__(self) -> None:
        check_fields(self, "schedule")
        for name, value, allowed in (
            ("beta_schedule", self.beta_schedule, BETA_SCHEDULES),
            ("prediction_type", self.prediction_type, PREDICTION_TYPES),
            ("timestep_spacing", self.timestep_spacing, SPACINGS),
        ):
            if value not in allowed:
                raise ConfigError(f"schedule.{name} must be one of {list(allowed)}, got {value!r}")
        if not 0 < self.beta_start < self.beta_end < 1:
            raise ConfigError(f"need 0 < beta_start < beta_end < 1, got {self.beta_start}, {self.beta_end}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ScheduleConfig:
        """Build from duomo's JSON, naming unknown fields."""
        if not isinstance(data, dict):
            raise ConfigError(f"a schedule config must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown schedule config fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_diffusers(cls, data: dict[str, Any]) -> tuple[ScheduleConfig, str]:
        """(schedule, sampler name) from a diffusers scheduler_config.json's contents."""
        if not isinstance(data, dict):
            raise ConfigError("a scheduler config must be a JSON object")
        if data.get("trained_betas") is not None:
            raise ConfigError("scheduler configs with trained_betas are not supported")
        if data.get("rescale_betas_zero_snr"):
            raise ConfigError("rescale_betas_zero_snr schedules are not supported")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = {k for k in set(data) - known - IGNORED_KEYS if not k.startswith("_")}  # "_x": bookkeeping
        if unknown:
            raise ConfigError(f"unknown scheduler config keys {sorted(unknown)}")
        sampler = SCHEDULER_CLASSES.get(str(data.get("_class_name", "")), "dpm")
        return cls(**{k: v for k, v in data.items() if k in known}), sampler

    def to_diffusers(self, class_name: str = "DDIMScheduler") -> dict[str, Any]:
        """A diffusers scheduler config with these fields."""
        return {"_class_name": class_name, **self.to_dict()}


def betas_for(cfg: ScheduleConfig) -> torch.Tensor:
    """The per-step noise variances [T] (float32), computed as diffusers computes them."""
    n = cfg.num_train_timesteps
    if cfg.beta_schedule == "linear":
        return torch.linspace(cfg.beta_start, cfg.beta_end, n, dtype=torch.float32)
    if cfg.beta_schedule == "scaled_linear":
        return torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, n, dtype=torch.float32) ** 2

    def alpha_bar(t: float) -> float:  # Nichol & Dhariwal's cosine schedule
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)]
    return torch.tensor(betas, dtype=torch.float32)


def spaced_timesteps(cfg: ScheduleConfig, steps: int, span: int | None = None, extra: int = 0) -> np.ndarray:
    """The training timesteps a sampler visits in `steps` steps, high to low, by the config's spacing.

    `span`/`extra` serve DPM-Solver, which spaces `steps + 1` points over `span` and drops the last."""
    total = cfg.num_train_timesteps
    span = total if span is None else span
    k = steps + extra
    if cfg.timestep_spacing == "linspace":
        out = np.linspace(0, span - 1, k).round()[::-1]
    elif cfg.timestep_spacing == "leading":
        ratio = span // k
        out = (np.arange(0, k) * ratio).round()[::-1] + cfg.steps_offset
    else:
        out = np.round(np.arange(span, 0, -total / steps)) - 1
    out = out[:steps] if extra else out
    return out.copy().astype(np.int64)


class NoiseSchedule:
    """abar_t and what follows from it: noising, targets, x0 from a prediction, signal-to-noise ratios."""

    def __init__(self, cfg: ScheduleConfig) -> None:
        self.config = cfg
        self.betas = betas_for(cfg)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)

    def _coefficients(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sqrt(abar_t), sqrt(1 - abar_t)) broadcast to `like`, as diffusers' add_noise computes them."""
        abar = self.alphas_cumprod.to(device=like.device, dtype=like.dtype)
        t = t.to(like.device).long().reshape(-1)
        a = abar[t] ** 0.5
        s = (1 - abar[t]) ** 0.5
        shape = (-1,) + (1,) * (like.ndim - 1)
        return a.reshape(shape), s.reshape(shape)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t from clean x0 and noise at timesteps t [B]."""
        a, s = self._coefficients(t, x0)
        return a * x0 + s * noise

    def velocity(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v = sqrt(abar) noise - sqrt(1 - abar) x0."""
        a, s = self._coefficients(t, x0)
        return a * noise - s * x0

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the model learns to predict: noise, v or x0, per `prediction_type`."""
        kind = self.config.prediction_type
        if kind == "epsilon":
            return noise
        if kind == "v_prediction":
            return self.velocity(x0, noise, t)
        return x0

    def predict_x0(self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The clean image a model output implies at x_t."""
        a, s = self._coefficients(t, x_t)
        kind = self.config.prediction_type
        if kind == "epsilon":
            return (x_t - s * output) / a
        if kind == "v_prediction":
            return a * x_t - s * output
        return output

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio abar_t / (1 - abar_t) at timesteps t."""
        abar = self.alphas_cumprod.to(t.device)[t.long()]
        return abar / (1 - abar)
