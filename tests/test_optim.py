"""Optimizer and LR schedule: the configured Ranger against a hand-written reference of the fork's Ranger
(lessw2020: RAdam + Lookahead + gradient centralization), ``warmup_cosine`` against its closed form, and the
fork-layout optimizer state translated for pytorch-optimizer's Ranger."""

from __future__ import annotations

import math
import re

import pytest
import torch
from hydra.utils import instantiate

from agingnet.config import compose_config
from agingnet.optim import OptimizerStateError, adapt_optimizer_state, warmup_cosine

BETA1, BETA2, ALPHA, K, N_SMA_THRESHOLD, EPS = 0.95, 0.999, 0.5, 6, 5, 1e-5


@pytest.fixture(scope="module")
def configured_ranger():
    """The optimizer of conf/model/sam.yaml (every experiment's Ranger), as a partial taking params."""
    cfg = compose_config(["lr=0.1"])
    return lambda params: instantiate(cfg.model.optimizer, _convert_="all")(params)


def fork_ranger_reference(p0: torch.Tensor, grad_fn, lr: float | list[float], steps: int) -> list[torch.Tensor]:
    """The fork's Ranger written out (lessw2020's update rule, one tensor), returning p after each step; ``lr``
    is one value or one per step.

    m ← β1·m + (1−β1)·g,  v ← β2·v + (1−β2)·g²,  N_t = N_max − 2tβ2^t/(1−β2^t),  N_max = 2/(1−β2) − 1
    N_t > 5: p ← p − lr·r_t/(1−β1^t) · m/(√v + ε),  r_t = √((1−β2^t)(N_t−4)(N_t−2)N_max / ((N_max−4)N_t(N_max−2)))
    else:    p ← p − lr/(1−β1^t) · m                                      (SGD with momentum)
    every k steps: slow ← slow + α(p − slow); p ← slow. Gradients of tensors with >1 dim are centralized.
    """
    p, slow = p0.clone(), p0.clone()
    m, v = torch.zeros_like(p0), torch.zeros_like(p0)
    n_max = 2 / (1 - BETA2) - 1
    out = []
    for t in range(1, steps + 1):
        lr_t = lr[t - 1] if isinstance(lr, list) else lr
        g = grad_fn(p)
        if g.ndim > 1:
            g = g - g.mean(dim=tuple(range(1, g.ndim)), keepdim=True)
        m = BETA1 * m + (1 - BETA1) * g
        v = BETA2 * v + (1 - BETA2) * g * g
        b2t = BETA2**t
        n_sma = n_max - 2 * t * b2t / (1 - b2t)
        if n_sma > N_SMA_THRESHOLD:
            r = math.sqrt((1 - b2t) * (n_sma - 4) / (n_max - 4) * (n_sma - 2) / n_sma * n_max / (n_max - 2))
            p = p - lr_t * r / (1 - BETA1**t) * m / (v.sqrt() + EPS)
        else:
            p = p - lr_t / (1 - BETA1**t) * m
        if t % K == 0:
            slow = slow + ALPHA * (p - slow)
            p = slow.clone()
        out.append(p.clone())
    return out


def run(optimizer_factory, p0: torch.Tensor, loss_fn, steps: int, scheduler=None) -> list[torch.Tensor]:
    p = torch.nn.Parameter(p0.clone())
    opt = optimizer_factory([p])
    sched = scheduler(opt) if scheduler else None
    out = []
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(p).backward()
        opt.step()
        if sched is not None:
            sched.step()
        out.append(p.detach().clone())
    return out


# ---------------------------------------------------------------- Ranger


def test_ranger_sum_objective_matches_fork_reference_and_descends(configured_ranger):
    """min p.sum() at lr 0.1 from p = 1: the fork's Ranger takes SGD-momentum steps (p = 0.9, 0.8, … 0.5) until
    the rectification starts at step 6 (issue 9: pytorch-optimizer's default stepped uphill, to 1.5)."""
    p0 = torch.ones(3)
    got = run(configured_ranger, p0, lambda p: p.sum(), 10)
    ref = fork_ranger_reference(p0, lambda p: torch.ones_like(p), 0.1, 10)
    torch.testing.assert_close(torch.stack(got), torch.stack(ref), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[0], torch.full((3,), 0.9))  # by hand: m̂_1 = g = 1, p_1 = 1 − 0.1
    torch.testing.assert_close(got[4], torch.full((3,), 0.5))
    objective = [1.0 * 3] + [float(p.sum()) for p in got]
    for t in range(1, 11):
        if t % K == 0:  # Lookahead pulls p halfway back to the slow weights (p_0) by design: still below the start
            assert objective[0] > objective[t]
            continue
        assert objective[t] < objective[t - 1], f"step {t} went uphill: {objective[t - 1]} -> {objective[t]}"


def test_ranger_quadratic_decreases_from_step_one_without_warmup(configured_ranger):
    """f(W) = ½‖W − C‖² on a 2-D weight (gradient centralization applies), warmup 0: f drops at every step
    before the first Lookahead sync, and the first step is W − lr·(G − mean_row G) (by hand)."""
    g = torch.Generator().manual_seed(0)
    w0, c = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)

    def f(w):
        return 0.5 * ((w - c) ** 2).sum()

    sched = lambda opt: warmup_cosine(opt, total_steps=10, warmup_steps=0, min_lr=0.0)  # noqa: E731
    got = run(configured_ranger, w0, f, 8, scheduler=sched)
    grad = w0 - c
    torch.testing.assert_close(got[0], w0 - 0.1 * (grad - grad.mean(dim=1, keepdim=True)))
    values = [float(f(w0))] + [float(f(w)) for w in got]
    assert all(values[t] < values[t - 1] for t in range(1, K)), values
    assert max(values[1:]) < values[0]
    lrs = [0.1 * (1 + math.cos(math.pi * s / 10)) / 2 for s in range(8)]  # cosine alone (warmup 0), per step
    ref = fork_ranger_reference(w0, lambda w: w - c, lrs, 8)
    torch.testing.assert_close(torch.stack(got), torch.stack(ref), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- warmup_cosine


def closed_form(s: int, base: float, total: int, warmup: int, min_lr: float) -> float:
    if s < warmup:
        return base * (1 / warmup + (1 - 1 / warmup) * s / warmup)
    return min_lr + (base - min_lr) * (1 + math.cos(math.pi * (s - warmup) / (total - warmup))) / 2


@pytest.mark.parametrize("warmup", [0, 1, 5])
def test_warmup_cosine_matches_closed_form(warmup):
    base, total, min_lr = 2e-3, 20, 1e-5
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    sched = warmup_cosine(opt, total_steps=total, warmup_steps=warmup, min_lr=min_lr)
    got = []
    for _ in range(total + 1):
        got.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    want = [closed_form(s, base, total, warmup, min_lr) for s in range(total + 1)]
    assert got == pytest.approx(want, rel=1e-9, abs=1e-12)
    assert got[total] == pytest.approx(min_lr)
    if warmup > 1:
        assert got[0] == pytest.approx(base / warmup) and got[warmup] == pytest.approx(base)


def test_warmup_cosine_bad_arguments_are_named():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    with pytest.raises(ValueError, match="warmup_cosine: total_steps must be ≥ 1, got 0"):
        warmup_cosine(opt, total_steps=0)
    with pytest.raises(ValueError, match="warmup_cosine: warmup_steps and min_lr must be ≥ 0, got -1, 1e-06"):
        warmup_cosine(opt, total_steps=10, warmup_steps=-1)


def test_configs_point_at_the_schedule_and_old_path_still_imports():
    import agingnet.module
    import agingnet.optim

    assert agingnet.module.warmup_cosine is agingnet.optim.warmup_cosine
    cfg = compose_config([])
    assert cfg.model.scheduler._target_ == "agingnet.optim.warmup_cosine"


def test_adam_model_builds_a_plain_adam():
    """conf/model/adam.yaml replaces the whole optimizer node (it used to inherit Ranger's alpha, k, …)."""
    cfg = compose_config(["model=adam", "lr=0.01"])
    opt = instantiate(cfg.model.optimizer, _convert_="all")([torch.nn.Parameter(torch.zeros(2))])
    assert type(opt) is torch.optim.Adam and opt.param_groups[0]["lr"] == 0.01


# ---------------------------------------------------------------- fork optimizer state


def fork_state(params: list[torch.Tensor], step: int, lr: float = 1e-4) -> dict:
    """An optimizer state in the fork's layout (lessw2020 Ranger), written by hand."""
    g = torch.Generator().manual_seed(1)
    state = {i: {"step": step, "exp_avg": torch.randn(p.shape, generator=g),
                 "exp_avg_sq": torch.rand(p.shape, generator=g), "slow_buffer": torch.randn(p.shape, generator=g)}
             for i, p in enumerate(params)}
    group = {"lr": lr, "alpha": 0.5, "k": 6, "step_counter": 0, "betas": (0.95, 0.999), "N_sma_threshhold": 5,
             "eps": 1e-5, "weight_decay": 0, "params": list(range(len(params)))}
    return {"state": state, "param_groups": [group]}


def test_fork_state_continues_as_the_fork_would(configured_ranger):
    """A fork Ranger state after 20 steps: one more step equals the reference update at t = 21 from the saved
    moments (not a restart at t = 1, whose bias correction would take a 20× larger step)."""
    p0 = torch.randn(4, generator=torch.Generator().manual_seed(3))
    p = torch.nn.Parameter(p0.clone())
    opt = configured_ranger([p])
    saved = fork_state([p], step=20)
    s = {k: v.clone() if torch.is_tensor(v) else v for k, v in saved["state"][0].items()}
    opt.load_state_dict(adapt_optimizer_state(saved, opt, "base.pt"))
    assert opt.param_groups[0]["step"] == 20 and opt.param_groups[0]["weight_decouple"] is True
    opt.zero_grad()
    p.sum().backward()
    opt.step()
    m = BETA1 * s["exp_avg"] + (1 - BETA1) * 1.0
    v = BETA2 * s["exp_avg_sq"] + (1 - BETA2) * 1.0
    t, n_max = 21, 2 / (1 - BETA2) - 1
    n = n_max - 2 * t * BETA2**t / (1 - BETA2**t)
    r = math.sqrt((1 - BETA2**t) * (n - 4) / (n_max - 4) * (n - 2) / n * n_max / (n_max - 2))
    lr = saved["param_groups"][0]["lr"]  # the saved group's values, as torch's load_state_dict keeps them
    torch.testing.assert_close(p.detach() - p0, -lr * r / (1 - BETA1**t) * m / (v.sqrt() + EPS))


@pytest.mark.parametrize("bad, needle", [
    (lambda s: s["state"][0].update(exp_avg=torch.zeros(5)), "optimizer state 'exp_avg' of parameter 0 has shape "
                                                              "(5,), the parameter (4,)"),
    (lambda s: s["param_groups"][0].update(params=[0, 1]), "optimizer group 0 holds 2 parameters, the configured "
                                                           "optimizer trains 1"),
    (lambda s: s["param_groups"].append(dict(s["param_groups"][0])), "optimizer state has 2 parameter groups, "
                                                                     "the configured optimizer 1"),
])
def test_fork_state_that_cannot_fit_is_refused_naming_the_file(configured_ranger, bad, needle):
    p = torch.nn.Parameter(torch.zeros(4))
    opt = configured_ranger([p])
    saved = fork_state([p], step=3)
    bad(saved)
    with pytest.raises(OptimizerStateError, match=re.escape(f"base.pt: {needle}")):
        adapt_optimizer_state(saved, opt, "base.pt")


def test_fork_state_into_torch_adam_fills_its_group_keys_and_steps():
    """model=adam from a fork base: Adam's own group keys (amsgrad, …) come from the configured optimizer and the
    fork's integer step becomes the tensor torch keeps; the next step is Adam's at t = step + 1."""
    p0 = torch.randn(4, generator=torch.Generator().manual_seed(5))
    p = torch.nn.Parameter(p0.clone())
    opt = torch.optim.Adam([p], lr=1e-2, betas=(0.9, 0.999), eps=1e-8)
    saved = fork_state([p], step=9, lr=1e-2)
    saved["param_groups"][0]["betas"] = (0.9, 0.999)
    s, t = {k: v.clone() if torch.is_tensor(v) else v for k, v in saved["state"][0].items()}, 10
    opt.load_state_dict(adapt_optimizer_state(saved, opt, "base.pt"))  # torch steps the loaded tensors in place
    p.sum().backward()
    opt.step()
    m = 0.9 * s["exp_avg"] + 0.1
    v = 0.999 * s["exp_avg_sq"] + 0.001
    eps = saved["param_groups"][0]["eps"]  # the saved group's 1e-5, as torch's load_state_dict keeps it
    want = p0 - 1e-2 * (m / (1 - 0.9**t)) / ((v / (1 - 0.999**t)).sqrt() + eps)
    torch.testing.assert_close(p.detach(), want)
    assert float(opt.state[p]["step"]) == t


def test_not_an_optimizer_state_is_refused_naming_the_file(configured_ranger):
    opt = configured_ranger([torch.nn.Parameter(torch.zeros(2))])
    with pytest.raises(OptimizerStateError, match=re.escape("base.pt: 'optimizer' is not an optimizer state dict")):
        adapt_optimizer_state({"state": {}, "param_groups": "nope"}, opt, "base.pt")


def test_restore_from_a_file_without_optimizer_state_is_refused_naming_the_file(tmp_path, configured_ranger):
    from agingnet.optim import restore_optimizer_state

    path = tmp_path / "sam_ffhq_aging.pt"
    torch.save({"state_dict": {}, "optimizer": {"state": {}, "param_groups": []}}, path)
    opt = configured_ranger([torch.nn.Parameter(torch.zeros(2))])
    with pytest.raises(OptimizerStateError, match=re.escape(f"{path}: restore_optimizer=true but it holds no "
                                                            "optimizer state")):
        restore_optimizer_state(opt, path)
