"""Samplers: from noise to an image in a few denoiser calls. Each step's arithmetic is diffusers' own
(DDPM, DDIM, Euler ancestral, DPM-Solver++ 2M), checked step by step against it in the tests.

A sampler has `timesteps` (what the denoiser is told), `init_noise_sigma` (the scale of the starting noise),
`scale_input(x, i)` (what the denoiser sees at step i) and `step(output, i, x, noise)` (the next x). A
`Trajectory` holds one batch of images on their way, each drawing its starting noise and every ancestral
noise from its own generator (seeded `seed + i` for image i): a seed gives the same image whatever the batch
it is sampled in, and a server can step many trajectories through one batched denoiser call.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable

import numpy as np
import torch

from duomo.errors import InputError
from duomo.models.diffusion.schedule import NoiseSchedule, spaced_timesteps

SAMPLER_ALIASES = {
    "ddpm": "ddpm",
    "ddim": "ddim",
    "euler_a": "euler_a",
    "euler-a": "euler_a",
    "euler-ancestral": "euler_a",
    "euler_ancestral": "euler_a",
    "dpm": "dpm",
    "dpm++": "dpm",
    "dpm++2m": "dpm",
    "dpmsolver++": "dpm",
}


class Sampler:
    """Shared by the samplers: the schedule, the chosen timesteps, and which step needs fresh noise."""

    ancestral = False  # draws new noise at each step

    def __init__(self, schedule: NoiseSchedule, steps: int) -> None:
        if steps < 1:
            raise InputError(f"steps must be at least 1, got {steps}")
        self.schedule = schedule
        self.config = schedule.config
        self.steps = steps
        self.abar = schedule.alphas_cumprod
        self.timesteps = torch.from_numpy(spaced_timesteps(self.config, steps))
        self.init_noise_sigma = 1.0

    def scale_input(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """The denoiser's input at step i (most samplers: x itself)."""
        return x

    def needs_noise(self, i: int) -> bool:
        """Whether step i draws fresh noise (when diffusers' scheduler draws it: the same random stream)."""
        return self.ancestral

    def x0_and_eps(
        self, output: torch.Tensor, x: torch.Tensor, abar_t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(predicted x0, predicted noise) from a model output, as diffusers' DDIM/DDPM compute them."""
        beta = 1 - abar_t
        kind = self.config.prediction_type
        if kind == "epsilon":
            x0 = (x - beta**0.5 * output) / abar_t**0.5
            eps = output
        elif kind == "sample":
            x0 = output
            eps = (x - abar_t**0.5 * x0) / beta**0.5
        else:
            x0 = abar_t**0.5 * x - beta**0.5 * output
            eps = abar_t**0.5 * output + beta**0.5 * x
        if self.config.clip_sample:
            r = self.config.clip_sample_range
            x0 = x0.clamp(-r, r)
        return x0, eps

    def step(self, output: torch.Tensor, i: int, x: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        """x at step i+1 from the denoiser's output at step i."""
        raise NotImplementedError


class DDIM(Sampler):
    """Denoising diffusion implicit models (Song et al. 2021); eta > 0 adds noise (eta = 1: DDPM-like)."""

    def __init__(self, schedule: NoiseSchedule, steps: int, eta: float = 0.0) -> None:
        super().__init__(schedule, steps)
        self.eta = eta
        self.ancestral = eta > 0
        self.final_abar = torch.tensor(1.0) if self.config.set_alpha_to_one else self.abar[0]

    def step(self, output: torch.Tensor, i: int, x: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        t = int(self.timesteps[i])
        prev = t - self.config.num_train_timesteps // self.steps
        abar_t = self.abar[t]
        abar_prev = self.abar[prev] if prev >= 0 else self.final_abar
        x0, eps = self.x0_and_eps(output, x, abar_t)
        variance = ((1 - abar_prev) / (1 - abar_t)) * (1 - abar_t / abar_prev)
        std = self.eta * variance**0.5
        out = abar_prev**0.5 * x0 + (1 - abar_prev - std**2) ** 0.5 * eps
        if self.eta > 0:
            out = out + std * noise
        return out


class DDPM(Sampler):
    """Ancestral sampling of the DDPM posterior (Ho et al. 2020), "fixed_small" variance."""

    ancestral = True

    def needs_noise(self, i: int) -> bool:
        return int(self.timesteps[i]) > 0  # the step to t = 0 adds no noise

    def step(self, output: torch.Tensor, i: int, x: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        t = int(self.timesteps[i])
        prev = int(self.timesteps[i + 1]) if i + 1 < len(self.timesteps) else -1
        abar_t = self.abar[t]
        abar_prev = self.abar[prev] if prev >= 0 else torch.tensor(1.0)
        alpha_t = abar_t / abar_prev
        beta_t = 1 - alpha_t
        x0, _ = self.x0_and_eps(output, x, abar_t)
        x0_coeff = abar_prev**0.5 * beta_t / (1 - abar_t)
        x_coeff = alpha_t**0.5 * (1 - abar_prev) / (1 - abar_t)
        mean = x0_coeff * x0 + x_coeff * x
        if t > 0:
            variance = ((1 - abar_prev) / (1 - abar_t) * beta_t).clamp(min=1e-20)
            mean = mean + variance**0.5 * noise
        return mean


def _interp_sigmas(abar: torch.Tensor, timesteps: np.ndarray) -> torch.Tensor:
    """sigma = sqrt((1 - abar) / abar) at (possibly fractional) timesteps, then a final 0 (float32)."""
    sigmas = np.array(((1 - abar) / abar) ** 0.5)
    sigmas = np.interp(timesteps, np.arange(0, len(sigmas)), sigmas)
    return torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))


class EulerAncestral(Sampler):
    """Euler steps of the probability-flow ODE in sigma space, with fresh noise each step (k-diffusion)."""

    ancestral = True

    def __init__(self, schedule: NoiseSchedule, steps: int) -> None:
        super().__init__(schedule, steps)
        cfg = self.config
        if cfg.timestep_spacing == "linspace":  # fractional timesteps, as diffusers' Euler keeps them
            timesteps = np.linspace(0, cfg.num_train_timesteps - 1, steps, dtype=np.float32)[::-1].copy()
        else:
            timesteps = spaced_timesteps(cfg, steps).astype(np.float32)
        self.timesteps = torch.from_numpy(timesteps)
        self.sigmas = _interp_sigmas(self.abar, timesteps)
        top = self.sigmas.max()
        self.init_noise_sigma = (
            top if cfg.timestep_spacing in ("linspace", "trailing") else (top**2 + 1) ** 0.5
        )

    def scale_input(self, x: torch.Tensor, i: int) -> torch.Tensor:
        return x / ((self.sigmas[i] ** 2 + 1) ** 0.5)

    def step(self, output: torch.Tensor, i: int, x: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        sigma, sigma_to = self.sigmas[i], self.sigmas[i + 1]
        x = x.float()
        kind = self.config.prediction_type
        if kind == "epsilon":
            x0 = x - sigma * output
        elif kind == "v_prediction":
            x0 = output * (-sigma / (sigma**2 + 1) ** 0.5) + (x / (sigma**2 + 1))
        else:
            x0 = output
        sigma_up = (sigma_to**2 * (sigma**2 - sigma_to**2) / sigma**2) ** 0.5
        # clamped: where sigma_to << sigma (a cosine schedule's first step) rounding can make this -1 ulp,
        # and diffusers' square root of it is NaN
        sigma_down = (sigma_to**2 - sigma_up**2).clamp(min=0) ** 0.5
        out = x + (x - x0) / sigma * (sigma_down - sigma)
        return out + noise * sigma_up


class DPMSolverPP2M(Sampler):
    """DPM-Solver++ (2M): second-order multistep in log-SNR, first order at the start and the end."""

    def __init__(self, schedule: NoiseSchedule, steps: int) -> None:
        super().__init__(schedule, steps)
        self.timesteps = torch.from_numpy(spaced_timesteps(self.config, steps, extra=1))
        self.sigmas = _interp_sigmas(self.abar, self.timesteps.numpy())
        self.previous: torch.Tensor | None = None  # the last step's x0 prediction
        self.lower_order_nums = 0

    @staticmethod
    def _alpha_sigma(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        alpha = 1 / ((sigma**2 + 1) ** 0.5)
        return alpha, sigma * alpha

    def _lambda(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        alpha, sig = self._alpha_sigma(sigma)
        return alpha, sig, torch.log(alpha) - torch.log(sig)

    def step(self, output: torch.Tensor, i: int, x: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        n = len(self.timesteps)
        alpha_s, sigma_s, lambda_s = self._lambda(self.sigmas[i])
        kind = self.config.prediction_type
        if kind == "epsilon":
            x0 = (x - sigma_s * output) / alpha_s
        elif kind == "v_prediction":
            x0 = alpha_s * x - sigma_s * output
        else:
            x0 = output
        if self.config.clip_sample:
            x0 = x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        x = x.float()
        alpha_t, sigma_t, lambda_t = self._lambda(self.sigmas[i + 1])
        h = lambda_t - lambda_s
        last = i == n - 1  # the final sigma is 0: a first-order step lands on x0
        if self.lower_order_nums < 1 or last:
            out = (sigma_t / sigma_s) * x - (alpha_t * (torch.exp(-h) - 1.0)) * x0
        else:
            _, _, lambda_s1 = self._lambda(self.sigmas[i - 1])
            r0 = (lambda_s - lambda_s1) / h
            d1 = (1.0 / r0) * (x0 - self.previous)
            out = (sigma_t / sigma_s) * x - (alpha_t * (torch.exp(-h) - 1.0)) * x0
            out = out - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * d1
        self.previous = x0
        self.lower_order_nums = min(self.lower_order_nums + 1, 2)
        return out.to(output.dtype)


def sampler_name(name: str) -> str:
    """The canonical sampler name, or an InputError suggesting the nearest ones."""
    key = str(name).strip().lower()
    if key in SAMPLER_ALIASES:
        return SAMPLER_ALIASES[key]
    close = difflib.get_close_matches(key, list(SAMPLER_ALIASES), n=2)
    hint = f" Did you mean {' or '.join(close)}?" if close else ""
    raise InputError(f"unknown sampler {name!r}; choose dpm, ddim, euler_a or ddpm.{hint}")


def make_sampler(name: str, schedule: NoiseSchedule, steps: int = 1, eta: float = 0.0) -> Sampler:
    """A fresh sampler of `steps` steps (samplers hold state: one per trajectory)."""
    kind = sampler_name(name)
    if kind == "ddim":
        return DDIM(schedule, steps, eta)
    if kind == "ddpm":
        return DDPM(schedule, steps)
    if kind == "euler_a":
        return EulerAncestral(schedule, steps)
    return DPMSolverPP2M(schedule, steps)


def per_image_generators(seed: int, n: int, device: torch.device | str = "cpu") -> list[torch.Generator]:
    """Generators seeded seed, seed + 1, ..., seed + n - 1: image i of a call draws all its noise from
    generator i. (Generators live on the CPU; noise is moved to `device`, so a seed means the same images on
    every device.)"""
    del device
    return [torch.Generator("cpu").manual_seed(seed + i) for i in range(n)]


def draw(shape: tuple[int, ...], generators: list[torch.Generator], device: torch.device, dtype: torch.dtype):
    """One noise tensor [len(generators), *shape], row i drawn from generators[i]."""
    rows = [torch.randn(shape, generator=g, dtype=torch.float32) for g in generators]
    return torch.stack(rows).to(device, dtype)


class Trajectory:
    """A batch of images being sampled, advanced one denoiser call at a time (`model_input`, `advance`)."""

    def __init__(
        self,
        schedule: NoiseSchedule,
        sampler: str,
        steps: int,
        shape: tuple[int, int, int],
        seed_or_generators: int | list[torch.Generator],
        n: int | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        eta: float = 0.0,
    ) -> None:
        if isinstance(seed_or_generators, int):
            generators = per_image_generators(seed_or_generators, n or 1)
        else:
            generators = list(seed_or_generators)
        self.sampler = make_sampler(sampler, schedule, steps, eta)
        self.generators = generators
        self.shape, self.device, self.dtype = tuple(shape), torch.device(device), dtype
        self.x = draw(self.shape, generators, self.device, dtype) * self.sampler.init_noise_sigma
        self.i = 0

    @property
    def done(self) -> bool:
        """All steps taken."""
        return self.i >= len(self.sampler.timesteps)

    @property
    def rows(self) -> int:
        """Images in this trajectory."""
        return len(self.generators)

    def model_input(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(denoiser input [B, C, H, W], timesteps [B]) of the current step."""
        t = self.sampler.timesteps[self.i].to(self.device)
        return self.sampler.scale_input(self.x, self.i).to(self.dtype), t.expand(self.rows)

    def advance(self, output: torch.Tensor) -> None:
        """Take the current step with the denoiser's output."""
        noise = None
        if self.sampler.needs_noise(self.i):
            noise = draw(self.shape, self.generators, self.device, torch.float32)
        self.x = self.sampler.step(output.float(), self.i, self.x.float(), noise).to(self.dtype)
        self.i += 1

    def result(self) -> torch.Tensor:
        """The final sample (pixels or latents)."""
        return self.x


def sample(
    denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    schedule: NoiseSchedule,
    sampler: str,
    steps: int,
    shape: tuple[int, int, int],
    generators: list[torch.Generator],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    on_step: Callable[[int, int], None] | None = None,
    eta: float = 0.0,
) -> torch.Tensor:
    """Run a sampler to the end: `denoise(x_in, t)` is called once per step; returns the final sample."""
    trajectory = Trajectory(schedule, sampler, steps, shape, generators, None, device, dtype, eta)
    while not trajectory.done:
        x_in, t = trajectory.model_input()
        trajectory.advance(denoise(x_in, t))
        if on_step is not None:
            on_step(trajectory.i - 1, steps)
    return trajectory.result()
