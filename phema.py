"""Power-function EMA and post-hoc EMA reconstruction (EDM2; docs/design.md, "EMA and post-hoc reconstruction").

The library that training (``PowerEMA``) and the run readers (runs.py's ``reconstruct_ema``) import; the
command line that rebuilds and exports these EMAs is ema.py.

- ``std_to_gamma(std)`` / ``gamma_to_std(gamma)``: convert between an EMA profile's relative
  width sigma_rel and its power-function exponent gamma.
- ``PowerEMA``: tracks one fp32 power-function EMA per sigma_rel during training and writes fp16
  snapshots of them (``ema-<std>-<step>.pt``) for post-hoc reconstruction.
- ``list_snapshots``, ``solve_posthoc_coefficients``, ``reconstruct_ema``, ``reconstruct_emas``:
  rebuild the EMA for any sigma_rel (and any step up to the last snapshot) from the snapshots.

The maths
---------
A power-function EMA with exponent gamma, observed at time t, averages the trajectory theta(tau) with
density p(tau) = (gamma+1) tau^gamma / t^(gamma+1) on [0, t].  Its relative standard deviation is
sigma_rel = sqrt((gamma+1) / ((gamma+2)^2 (gamma+3))).  After optimiser step s (1-based) the tracked
average is updated with beta = (1 - 1/s)^(gamma+1): ema <- beta*ema + (1-beta)*theta_s.  Unrolled,
the discrete EMA at step T weights theta_s by (s^(gamma+1) - (s-1)^(gamma+1)) / T^(gamma+1), which is
exactly the continuous profile integrated over (s-1, s]; so snapshots are exact inner products of the
continuous profiles with the piecewise-constant weight trajectory, and the post-hoc least-squares fit
between profiles (EDM2 Algorithm 3) applies to them without any discretisation correction.
"""

from __future__ import annotations

import math
import os
import re
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from atomic import atomic_torch_save, load_torch_file, non_finite_entry

__all__ = [
    "STD_MAX",
    "std_to_gamma",
    "gamma_to_std",
    "PowerEMA",
    "snapshot_filename",
    "posthoc_filename",
    "list_snapshots",
    "power_profile_inner",
    "solve_posthoc_coefficients",
    "reconstruct_ema",
    "reconstruct_emas",
]

# sigma_rel of gamma = 0 (a uniform average over [0, t]) is sqrt(1/12) ~= 0.288675; it is the largest
# width a power-function profile with gamma >= 0 can have (the docs round it to 0.2887).
STD_MAX = 1.0 / math.sqrt(12.0)


# ----------------------------------------------------------------------------------------------
# gamma <-> sigma_rel


def _check_std(std) -> float:
    try:
        s = float(std)
    except (TypeError, ValueError):
        raise ValueError(f"sigma_rel must be a number in (0, {STD_MAX:.4f}); got {std!r}") from None
    if not (0.0 < s <= STD_MAX):  # also rejects NaN
        raise ValueError(
            f"sigma_rel must be in (0, {STD_MAX:.4f}) (the largest is 1/sqrt(12), gamma = 0); got {std!r}"
        )
    return s


def gamma_to_std(gamma) -> float:
    """sigma_rel = sqrt((gamma+1) / ((gamma+2)^2 (gamma+3))) for a finite gamma >= 0."""
    try:
        g = float(gamma)
    except (TypeError, ValueError):
        raise ValueError(f"gamma must be a finite number >= 0; got {gamma!r}") from None
    if not (math.isfinite(g) and g >= 0.0):
        raise ValueError(f"gamma must be a finite number >= 0; got {gamma!r}")
    return math.sqrt((g + 1.0) / ((g + 2.0) ** 2 * (g + 3.0)))


def std_to_gamma(std) -> float:
    """Inverse of ``gamma_to_std``: the largest real root of
    gamma^3 + 7 gamma^2 + (16 - sigma^-2) gamma + (12 - sigma^-2) = 0.

    Raises ValueError unless 0 < sigma_rel <= 1/sqrt(12) (~0.2887)."""
    s = _check_std(std)
    c = s ** -2
    roots = np.roots([1.0, 7.0, 16.0 - c, 12.0 - c])
    g = float(max(r.real for r in roots if abs(r.imag) <= 1e-7 * max(1.0, abs(r.real))))
    # Polish with Newton on the cubic (the eigenvalue solver loses a few digits for tiny sigma).
    for _ in range(3):
        f = ((g + 7.0) * g + 16.0 - c) * g + 12.0 - c
        df = (3.0 * g + 14.0) * g + 16.0 - c
        if df == 0.0:
            break
        g_new = g - f / df
        if not math.isfinite(g_new):
            break
        g = g_new
    return max(g, 0.0)




def _std_str(std: float) -> str:
    """sigma_rel for a file name: at least 3 decimals ("0.050"), more only if needed to be exact."""
    s = f"{float(std):.10f}".rstrip("0")
    whole, _, frac = s.partition(".")
    return f"{whole}.{frac.ljust(3, '0')}"


def snapshot_filename(std: float, step: int) -> str:
    """``ema-0.050-0001000.pt`` for sigma_rel 0.05 at step 1000."""
    return f"ema-{_std_str(std)}-{int(step):07d}.pt"


def posthoc_filename(std: float, step: int) -> str:
    """``posthoc-0.050-0001000.pt`` for sigma_rel 0.05 at step 1000."""
    return f"posthoc-{_std_str(std)}-{int(step):07d}.pt"


_SNAPSHOT_RE = re.compile(r"^ema-(\d+\.\d+)-(\d+)\.pt$")


def list_snapshots(snapshot_dir) -> List[Tuple[str, float, int]]:
    """All snapshot files ``ema-<std>-<step>.pt`` in ``snapshot_dir`` as (path, std, step), sorted by
    (step, std).  sigma_rel and step are parsed from the names (no file is opened).  Files with other
    names (e.g. in-progress temporaries) are ignored.  FileNotFoundError if the folder is missing."""
    snapshot_dir = os.fspath(snapshot_dir)
    if not os.path.isdir(snapshot_dir):
        raise FileNotFoundError(f"snapshot folder not found: {snapshot_dir}")
    out = []
    for name in os.listdir(snapshot_dir):
        m = _SNAPSHOT_RE.match(name)
        if m is None:
            continue
        path = os.path.join(snapshot_dir, name)
        if os.path.isfile(path):
            out.append((path, float(m.group(1)), int(m.group(2))))
    out.sort(key=lambda x: (x[2], x[1]))
    return out


# ----------------------------------------------------------------------------------------------
# tracking during training


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """Strip DistributedDataParallel / DataParallel (``.module``) and torch.compile (``._orig_mod``)."""
    wrappers = (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)
    while True:
        if isinstance(model, wrappers):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
            model = model._orig_mod
        else:
            return model


class PowerEMA:
    """Power-function EMAs of a model's ``state_dict()``, one fp32 copy per sigma_rel.

    Call ``update(model, step)`` after every optimiser step with the 1-based step count; step 1
    copies the weights exactly (beta = 0).  Floating entries are averaged with one fused
    ``torch._foreach_lerp_`` per tracked EMA; non-floating entries (if any) are copied.
    """

    def __init__(self, model: torch.nn.Module, stds: Sequence[float] = (0.05, 0.10)):
        stds = [float(s) for s in stds]
        if not stds:
            raise ValueError("PowerEMA needs at least one sigma_rel")
        self.gammas = [std_to_gamma(s) for s in stds]  # validates
        if len(set(stds)) != len(stds):
            raise ValueError(f"duplicate sigma_rel in {stds}")
        self.stds = stds
        model = _unwrap(model)
        sd = model.state_dict()
        self.names = list(sd.keys())
        self._float_idx = [i for i, n in enumerate(self.names) if torch.is_floating_point(sd[n])]
        self._other_idx = [i for i, n in enumerate(self.names) if not torch.is_floating_point(sd[n])]
        self.emas: List[Dict[str, torch.Tensor]] = []
        for _ in stds:
            ema = {}
            for n, t in sd.items():
                t = t.detach()
                ema[n] = t.to(torch.float32, copy=True) if torch.is_floating_point(t) else t.clone()
            self.emas.append(ema)
        self._src_model: Optional[torch.nn.Module] = None
        self._src: List[torch.Tensor] = []
        self._ema_lists: List[List[torch.Tensor]] = [
            [ema[self.names[i]] for i in self._float_idx] for ema in self.emas
        ]

    # -- helpers -----------------------------------------------------------------------------
    def _index(self, std: float) -> int:
        for i, s in enumerate(self.stds):
            if math.isclose(s, float(std), rel_tol=1e-9, abs_tol=1e-12):
                return i
        raise KeyError(f"sigma_rel {std} is not tracked (tracked: {self.stds})")

    def _sources(self, model: torch.nn.Module) -> List[torch.Tensor]:
        # Cache the model's own Parameter/buffer objects (keep_vars=True): they stay valid across
        # optimiser steps, load_state_dict and .to() (which swaps .data in place).
        if model is not self._src_model:
            sd = model.state_dict(keep_vars=True)
            if list(sd.keys()) != self.names:
                missing = sorted(set(self.names) - set(sd))
                extra = sorted(set(sd) - set(self.names))
                raise ValueError(
                    f"model state_dict keys differ from the EMA's (missing {missing[:5]}, extra {extra[:5]})"
                )
            self._src = list(sd.values())
            self._src_model = model
        return self._src

    # -- training ----------------------------------------------------------------------------
    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        """ema <- beta*ema + (1-beta)*theta with beta = (1 - 1/step)^(gamma+1); ``step`` is the
        number of optimiser steps taken so far (1 after the first)."""
        if isinstance(step, bool) or int(step) != step or step < 1:
            raise ValueError(f"step must be an integer >= 1 (the 1-based optimiser step); got {step!r}")
        step = int(step)
        src = self._sources(_unwrap(model))
        fsrc = [src[i].detach() for i in self._float_idx]
        fsrc = [t if t.dtype == torch.float32 else t.float() for t in fsrc]
        for gamma, ema_list, ema in zip(self.gammas, self._ema_lists, self.emas):
            beta = (1.0 - 1.0 / step) ** (gamma + 1.0)
            if ema_list:
                torch._foreach_lerp_(ema_list, fsrc, 1.0 - beta)
            for i in self._other_idx:
                ema[self.names[i]].copy_(src[i])

    # -- access / checkpointing ----------------------------------------------------------------
    def ema_state(self, std: float) -> Dict[str, torch.Tensor]:
        """The live fp32 state dict of the EMA tracked at ``std`` (load it with model.load_state_dict)."""
        return self.emas[self._index(std)]

    def state_dict(self) -> Dict[float, Dict[str, torch.Tensor]]:
        """``{std: {name: tensor}}`` (the live tensors, as ``nn.Module.state_dict`` does)."""
        return {s: ema for s, ema in zip(self.stds, self.emas)}

    @torch.no_grad()
    def load_state_dict(self, d: Dict[float, Dict[str, torch.Tensor]]) -> None:
        """Copy a ``state_dict()`` back in (tensors keep this object's device and dtype)."""
        loaded = {float(k): v for k, v in d.items()}
        if len(loaded) != len(self.stds):
            raise ValueError(f"EMA state holds sigma_rel {sorted(loaded)}, this PowerEMA tracks {self.stds}")
        pairs = []
        for k, v in loaded.items():
            try:
                i = self._index(k)
            except KeyError:
                raise ValueError(
                    f"EMA state holds sigma_rel {sorted(loaded)}, this PowerEMA tracks {self.stds}"
                ) from None
            if set(v.keys()) != set(self.names):
                raise ValueError(f"EMA state for sigma_rel {k} has different parameter names than the model")
            pairs.append((i, v))
        for i, v in pairs:
            for n in self.names:
                self.emas[i][n].copy_(v[n])

    def save_snapshots(self, snapshot_dir, step: int, durable: bool = True) -> List[str]:
        """Write one fp16 snapshot per tracked sigma_rel, ``snapshot_dir/ema-<std>-<step:07d>.pt``
        holding ``{"std": float, "step": int, "state": {name: fp16 cpu tensor}}``, atomically (and
        ``durable``: synced to disk before returning, see atomic.atomic_path).
        Returns the paths written.  (Call it on one rank only.)"""
        step = int(step)
        if step < 1:
            raise ValueError(f"step must be >= 1; got {step}")
        paths = []
        for std, ema in zip(self.stds, self.emas):
            state = {
                n: (t.detach().to("cpu", torch.float16) if torch.is_floating_point(t) else t.detach().cpu())
                for n, t in ema.items()
            }
            path = os.path.join(os.fspath(snapshot_dir), snapshot_filename(std, step))
            atomic_torch_save({"std": float(std), "step": step, "state": state}, path, durable=durable)
            paths.append(path)
        return paths


# ----------------------------------------------------------------------------------------------
# post-hoc reconstruction


def power_profile_inner(ta, ga, tb, gb) -> np.ndarray:
    """Inner product of two normalised power-function profiles (times ta, tb > 0; exponents ga, gb):
    (ga+1)(gb+1) / ((ga+gb+1) max(ta,tb)) * (ta/tb)^(gb if ta<tb else -ga).  Broadcasts; float64."""
    ta, ga, tb, gb = (np.asarray(x, dtype=np.float64) for x in (ta, ga, tb, gb))
    ratio = ta / tb
    expo = np.where(ta < tb, gb, -ga)
    return (ga + 1.0) * (gb + 1.0) / ((ga + gb + 1.0) * np.maximum(ta, tb)) * ratio ** expo


def solve_posthoc_coefficients(ts, gammas, t_r, gamma_r) -> np.ndarray:
    """Least-squares coefficients x such that sum_i x_i p_i approximates the target profile p_r
    (EDM2 Algorithm 3): solve A x = b with A_ij = <p_i, p_j>, b_i = <p_i, p_r>, in float64.

    ``ts``, ``gammas``: the N snapshots' times (> 0) and exponents.  ``t_r``, ``gamma_r``: scalars,
    or 1-D arrays of K targets.  Returns shape (N,) for scalar targets, else (N, K).

    The solution is normalised to sum to 1 per target (as EDM2's phema.py does; the paper's
    reference code does not).  The exact least-squares solution already sums to ~1 because every
    profile integrates to 1; normalising makes the result an exact affine combination, so a
    constant offset in the weights is reproduced exactly.  A singular A (e.g. duplicated
    snapshots) falls back to the minimum-norm least-squares solution."""
    ts = np.asarray(ts, dtype=np.float64).reshape(-1)
    gammas = np.asarray(gammas, dtype=np.float64).reshape(-1)
    if ts.shape != gammas.shape or ts.size == 0:
        raise ValueError("ts and gammas must be non-empty and of equal length")
    if np.any(~(ts > 0)):
        raise ValueError("snapshot times must be > 0")
    scalar = np.ndim(t_r) == 0 and np.ndim(gamma_r) == 0
    t_r, gamma_r = np.broadcast_arrays(
        np.asarray(t_r, dtype=np.float64).reshape(-1), np.asarray(gamma_r, dtype=np.float64).reshape(-1)
    )
    if np.any(~(t_r > 0)):
        raise ValueError("target time must be > 0")
    A = power_profile_inner(ts[:, None], gammas[:, None], ts[None, :], gammas[None, :])
    b = power_profile_inner(ts[:, None], gammas[:, None], t_r[None, :], gamma_r[None, :])
    try:
        x = np.linalg.solve(A, b)
        if not np.all(np.isfinite(x)):
            raise np.linalg.LinAlgError("non-finite solution")
    except np.linalg.LinAlgError:
        x = np.linalg.lstsq(A, b, rcond=None)[0]
    x = x / np.sum(x, axis=0, keepdims=True)
    return x[:, 0] if scalar else x


def _available_steps(snaps) -> str:
    steps = sorted({s for _, _, s in snaps})
    if len(steps) > 12:
        return ", ".join(map(str, steps[:5])) + f", ... ({len(steps)} steps) ..., " + ", ".join(
            map(str, steps[-5:])
        )
    return ", ".join(map(str, steps))


def reconstruct_emas(
    snapshot_dir, target_stds: Iterable[float], step: Optional[int] = None, device="cpu"
) -> List[Tuple[Dict[str, torch.Tensor], dict]]:
    """Post-hoc EMAs for several sigma_rel at once, loading every snapshot once.

    ``step`` (t_r) defaults to the last snapshot step and may not exceed it; the snapshots with
    0 < t_i <= t_r are used.  Returns a list, in the order of ``target_stds``, of
    ``(state_dict fp32 on device, info)`` with info = {"std", "gamma", "step", "sources":
    [(path, std, step, coefficient), ...]}."""
    target_stds = [float(s) for s in target_stds]
    if not target_stds:
        raise ValueError("no target sigma_rel given")
    target_gammas = [std_to_gamma(s) for s in target_stds]  # validates first
    snaps = list_snapshots(snapshot_dir)
    snaps = [s for s in snaps if s[2] > 0]
    if not snaps:
        raise FileNotFoundError(
            f"no EMA snapshots (ema-<std>-<step>.pt) in {os.fspath(snapshot_dir)}"
        )
    last = max(s[2] for s in snaps)
    if step is None:
        t_r = last
    else:
        if isinstance(step, bool) or int(step) != step:
            raise ValueError(f"step must be an integer; got {step!r}")
        t_r = int(step)
        if t_r > last:
            raise ValueError(
                f"step {t_r} is after the last snapshot (step {last}); available steps: {_available_steps(snaps)}"
            )
    used, seen = [], set()
    for s in snaps:  # drop duplicates of one (std, step) under another file name
        key = (round(s[1], 9), s[2])
        if s[2] <= t_r and key not in seen:
            seen.add(key)
            used.append(s)
    if not used:
        raise ValueError(
            f"no snapshots at or before step {t_r}; available steps: {_available_steps(snaps)}"
        )
    for path, std, _ in used:
        try:
            std_to_gamma(std)
        except ValueError as e:
            raise ValueError(f"snapshot {os.path.basename(path)}: {e}") from None
    ts = [s[2] for s in used]
    gammas = [std_to_gamma(s[1]) for s in used]
    X = solve_posthoc_coefficients(ts, gammas, np.full(len(target_stds), float(t_r)), np.array(target_gammas))

    accs: Optional[List[List[torch.Tensor]]] = None
    names: Optional[List[str]] = None
    for i, (path, std, st) in enumerate(used):
        snap = load_torch_file(path, "EMA snapshot")  # a damaged file: one line naming it
        if not (isinstance(snap, dict) and isinstance(snap.get("state"), dict)
                and all(isinstance(t, torch.Tensor) for t in snap["state"].values())):
            raise ValueError(f"not an EMA snapshot (no 'state' of tensors): {path}")
        bad = non_finite_entry(snap["state"])
        if bad is not None:  # a NaN would sample black images, and export weights no one can use
            raise ValueError(f"EMA snapshot {path} holds non-finite values (NaN or inf) in {bad}; it is damaged: "
                             f"delete it, or restore it from a copy")
        if int(snap.get("step", st)) != st or not math.isclose(float(snap.get("std", std)), std, rel_tol=1e-6):
            raise ValueError(
                f"snapshot {os.path.basename(path)} holds sigma_rel {snap.get('std')} step {snap.get('step')}, "
                "which does not match its file name"
            )
        state = snap["state"]
        if names is None:
            names = list(state.keys())
            accs = [
                [torch.zeros(state[n].shape, dtype=torch.float32, device=device) for n in names]
                for _ in target_stds
            ]
        elif set(state.keys()) != set(names):
            raise ValueError(f"snapshot {os.path.basename(path)} has different parameter names than the others")
        elif any(state[n].shape != a.shape for n, a in zip(names, accs[0])):
            raise ValueError(f"snapshot {os.path.basename(path)} has different tensor shapes than the others")
        vals = [state[n].to(device=device, dtype=torch.float32) for n in names]
        for k in range(len(target_stds)):
            torch._foreach_add_(accs[k], vals, alpha=float(X[i, k]))
        del snap, state, vals

    out = []
    for k, (std, gamma) in enumerate(zip(target_stds, target_gammas)):
        info = {
            "std": std,
            "gamma": gamma,
            "step": t_r,
            "sources": [(p, s, st, float(X[i, k])) for i, (p, s, st) in enumerate(used)],
        }
        out.append((dict(zip(names, accs[k])), info))
    return out


def reconstruct_ema(
    snapshot_dir, target_std: float, step: Optional[int] = None, device="cpu"
) -> Tuple[Dict[str, torch.Tensor], dict]:
    """Post-hoc EMA for one sigma_rel; see ``reconstruct_emas``.  Returns (state_dict fp32, info)."""
    return reconstruct_emas(snapshot_dir, [target_std], step=step, device=device)[0]
