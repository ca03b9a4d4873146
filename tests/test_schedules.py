"""LR schedules against their closed forms (written here independently), the optimizer's LR
through LambdaLR, Rewarm from a real checkpoint file, and ``mmpt schedule`` writing a PNG."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from mmpt.models.schedules import Constant, Rewarm, Schedule, WarmupCosine, WarmupStableDecay
from mmpt.schedule_cli import main, schedule_values

T = 1000  # steps of the runs below


def cosine(p: float) -> float:
    return 0.5 * (1 + math.cos(math.pi * p))


SHAPES = {"linear": lambda p: 1 - p, "cosine": cosine, "sqrt": lambda p: 1 - math.sqrt(p)}


def wsd(s: int, w: int, d: int, shape: str, m: float, total: int = T) -> float:
    """Warmup (s + 1) / w, then 1, then m + (1 - m) shape((s - D + 1) / d) from D = total - d."""
    if s < w:
        return (s + 1) / w
    if s < total - d:
        return 1.0
    return m + (1 - m) * SHAPES[shape]((s - (total - d) + 1) / d)


# --- Constant and WarmupCosine (unchanged behaviour) -------------------------------------------


@pytest.mark.parametrize("step", [0, 9, 10, 500, 999])
def test_constant(step: int) -> None:
    assert Constant(warmup_steps=10).factor(step, T) == pytest.approx(min(1.0, (step + 1) / 10))
    assert Constant().factor(step, T) == 1.0
    assert Constant(warmup_ratio=0.05).factor(step, T) == pytest.approx(min(1.0, (step + 1) / 50))


@pytest.mark.parametrize("step", [0, 49, 50, 300, 525, 999])
def test_warmup_cosine(step: int) -> None:
    w, m = 50, 0.1
    expected = (step + 1) / w if step < w else m + (1 - m) * cosine((step - w) / (T - w))
    assert WarmupCosine(warmup_steps=w, min_ratio=m).factor(step, T) == pytest.approx(expected)


def test_needs_total() -> None:
    assert not Constant(warmup_steps=5).needs_total
    assert Constant(warmup_ratio=0.1).needs_total
    assert WarmupCosine().needs_total
    assert WarmupStableDecay(warmup_steps=5).needs_total
    assert WarmupStableDecay(decay_steps=100).needs_total  # the decay starts at total - 100
    assert not WarmupStableDecay(warmup_steps=5, decay_ratio=0).needs_total
    assert not Rewarm(warmup_steps=5).needs_total
    assert Rewarm(warmup_ratio=0.1).needs_total
    assert Rewarm(warmup_steps=5, then=WarmupStableDecay()).needs_total


# --- WarmupStableDecay --------------------------------------------------------------------------


@pytest.mark.parametrize("shape", ["linear", "cosine", "sqrt"])
@pytest.mark.parametrize("step", [0, 19, 20, 500, 799, 800, 850, 900, 999])
def test_wsd_matches_formula(shape: str, step: int) -> None:
    s = WarmupStableDecay(warmup_steps=20, decay_ratio=0.2, decay_shape=shape, min_ratio=0.05)
    assert s.factor(step, T) == pytest.approx(wsd(step, 20, 200, shape, 0.05))


def test_wsd_phases() -> None:
    s = WarmupStableDecay(warmup_ratio=0.02, decay_steps=100, decay_shape="cosine")
    assert s.warmup_for(T) == 20 and s.decay_for(T) == 100 and s.decay_start(T) == 900
    values = schedule_values(s, T)
    assert values[19] == values[899] == 1.0 > values[900]
    assert values[-1] == pytest.approx(0.0)  # the last step reaches min_ratio exactly
    assert all(a >= b for a, b in zip(values[20:-1], values[21:], strict=True))  # no rise


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"decay_ratio": 1.5}, "decay_ratio"),
        ({"decay_shape": "exp"}, "decay_shape"),
        ({"min_ratio": -0.1}, "min_ratio"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"warmup_ratio": 0.5, "decay_ratio": 0.6}, "decay_ratio"),
    ],
)
def test_wsd_rejects_bad_args(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=f"model.lr_schedule.init_args.{field}"):
        WarmupStableDecay(**kwargs)


def test_wsd_overlap_is_an_error_at_run_length() -> None:
    with pytest.raises(ValueError, match="exceed the run's 100 steps"):
        WarmupStableDecay(warmup_steps=60, decay_steps=50).factor(0, 100)


# --- Rewarm -------------------------------------------------------------------------------------


@pytest.mark.parametrize("step", [0, 49, 50, 500, 999])
def test_rewarm_from_start_ratio(step: int) -> None:
    r, w = 0.1, 50
    expected = r + (1 - r) * (step + 1) / w if step < w else 1.0
    assert Rewarm(start_ratio=r, warmup_steps=w).factor(step, T) == pytest.approx(expected)
    # from 0 it is Constant's warmup
    assert Rewarm(warmup_steps=w).factor(step, T) == Constant(warmup_steps=w).factor(step, T)


@pytest.mark.parametrize("step", [0, 49, 50, 100, 799, 800, 900, 999])
def test_rewarm_then_wsd(step: int) -> None:
    r, w = 0.2, 50
    then = WarmupStableDecay(decay_ratio=0.25, decay_shape="sqrt", min_ratio=0.1)
    s = Rewarm(start_ratio=r, warmup_steps=w, then=then)
    # then runs on the remaining 950 steps: its decay is the last 238 of them
    expected = r + (1 - r) * (step + 1) / w if step < w else wsd(step - w, 0, 238, "sqrt", 0.1, 950)
    assert s.factor(step, T) == pytest.approx(expected)
    assert s.decay_start(T) == 50 + 950 - 238


def lightning_ckpt(path: Path, lr: float, with_optimizer: bool = True) -> Path:
    """A file with the layout of a Lightning checkpoint, after the old run's last step."""
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    ckpt = {"state_dict": {"w": torch.zeros(2)}, "lr_schedulers": [sched.state_dict()]}
    if with_optimizer:
        ckpt["optimizer_states"] = [opt.state_dict()]
    torch.save(ckpt, path)
    return path


@pytest.mark.parametrize("with_optimizer", [True, False])
def test_rewarm_from_checkpoint(tmp_path: Path, with_optimizer: bool) -> None:
    ckpt = lightning_ckpt(tmp_path / "last.ckpt", lr=3e-5, with_optimizer=with_optimizer)
    s = Rewarm(from_checkpoint=str(ckpt), warmup_steps=10)
    assert s.old_lr == pytest.approx(3e-5)
    with pytest.raises(ValueError, match="peak_lr"):  # the new peak is not known yet
        s.factor(0, T)
    s.bind(3e-4)
    r = 0.1
    for step in (0, 5, 9, 10, 999):
        expected = r + (1 - r) * (step + 1) / 10 if step < 10 else 1.0
        assert s.factor(step, T) == pytest.approx(expected)
    same = Rewarm(from_checkpoint=str(ckpt), warmup_steps=10, peak_lr=3e-4)
    assert same.factor(3, T) == pytest.approx(s.factor(3, T))
    with pytest.raises(ValueError, match="differs from the optimizer's lr"):
        same.bind(1e-3)


def test_rewarm_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="init_args.from_checkpoint"):
        Rewarm(from_checkpoint=str(tmp_path / "missing.ckpt"))
    torch.save({"state_dict": {}}, tmp_path / "weights.ckpt")
    with pytest.raises(ValueError, match="no optimizer or LR scheduler state"):
        Rewarm(from_checkpoint=str(tmp_path / "weights.ckpt"))
    with pytest.raises(ValueError, match="init_args.then: WarmupCosine has a warmup"):
        Rewarm(warmup_steps=10, then=WarmupCosine(warmup_steps=5))
    with pytest.raises(ValueError, match="init_args.start_ratio"):
        Rewarm(start_ratio=-1.0)
    ckpt = lightning_ckpt(tmp_path / "last.ckpt", lr=1e-4)
    with pytest.raises(ValueError, match="start_ratio=0.5 and from_checkpoint both"):
        Rewarm(start_ratio=0.5, from_checkpoint=str(ckpt))
    # without a re-warmup the old LR is never needed
    assert Rewarm(from_checkpoint=str(ckpt), then=WarmupCosine()).factor(0, T) == 1.0


# --- the optimizer sees peak x factor -----------------------------------------------------------


@pytest.mark.parametrize(
    "schedule",
    [
        WarmupCosine(warmup_steps=3, min_ratio=0.1),
        WarmupStableDecay(warmup_steps=3, decay_steps=8, decay_shape="cosine"),
        Rewarm(start_ratio=0.3, warmup_steps=4, then=WarmupStableDecay(decay_ratio=0.3)),
    ],
    ids=type,
)
def test_lambda_lr_gives_peak_times_factor(schedule: Schedule) -> None:
    total = 30
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: schedule.factor(step, total))
    for step in range(total):
        assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * schedule.factor(step, total))
        opt.step()
        sched.step()


# --- mmpt schedule ------------------------------------------------------------------------------


def write(path: Path, cfg: dict) -> str:
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.fixture
def configs(tmp_path: Path) -> list[str]:
    """A recipe with a cosine schedule, and a continual-pretraining override on top."""
    base = {
        "trainer": {"max_steps": 500, "default_root_dir": str(tmp_path / "run")},
        "model": {
            "class_path": "mmpt.models.contrastive.ContrastiveModule",
            "init_args": {
                "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 5e-4}},
                "lr_schedule": {
                    "class_path": "mmpt.models.schedules.WarmupCosine",
                    "init_args": {"warmup_steps": 20, "min_ratio": 0.1},
                },
            },
        },
    }
    schedule = {"class_path": "mmpt.models.schedules.Rewarm", "init_args": {"start_ratio": 0.1}}
    schedule["init_args"]["warmup_steps"] = 40
    schedule["init_args"]["then"] = {
        "class_path": "mmpt.models.schedules.WarmupStableDecay",
        "init_args": {"decay_ratio": 0.2, "decay_shape": "cosine"},
    }
    over = {"model": {"init_args": {"optimizer": {"init_args": {"lr": 1e-3}}}}}
    over["model"]["init_args"]["lr_schedule"] = schedule
    return [write(tmp_path / "base.yaml", base), write(tmp_path / "continue.yaml", over)]


def test_cli_writes_png_of_merged_configs(
    configs: list[str], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "plots" / "lr.png"
    argv = ["-c", configs[0], "-c", configs[1], "--total-steps", "1000", "--out", str(out)]
    assert main(argv) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed
    # lr 1e-3 from the second file; start 0.1 x peak after one step of 40: 0.1 + 0.9 / 40
    assert f"lr {1e-3 * (0.1 + 0.9 / 40):.4g}" in printed
    assert "end of warmup" in printed and "decay start" in printed
    assert "lr 0.001  (1.0000 x peak)" in printed  # the stable phase


def test_cli_defaults_to_max_steps_and_root_dir(configs: list[str], tmp_path: Path) -> None:
    assert main(["-c", configs[0], "--lr-only"]) == 0
    assert (tmp_path / "run" / "lr_schedule.png").is_file()


WSD, BAD = "mmpt.models.schedules.WarmupStableDecay", {"min_ratio": 2.0}


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ("missing", "no such file"),
        ({"trainer": {"max_steps": -1}}, "pass --total-steps"),
        ({"model": {"init_args": {"lr_schedule": {"class_path": "nope.Nope"}}}}, "nope.Nope"),
        ({"model": {"init_args": {"lr_schedule": {"class_path": "torch.nn.Linear"}}}}, "subclass"),
        ({"model": {"init_args": {"lr_schedule": {"init_args": {"bogus": 1}}}}}, "bogus"),
        (
            {"model": {"init_args": {"lr_schedule": {"class_path": WSD, "init_args": BAD}}}},
            "model.lr_schedule.init_args.min_ratio=2.0",
        ),
    ],
)
def test_cli_errors(
    configs: list[str], tmp_path: Path, capsys: pytest.CaptureFixture, edit: object, message: str
) -> None:
    extra = (
        str(tmp_path / "missing.yaml") if edit == "missing" else write(tmp_path / "x.yaml", edit)
    )
    assert main(["-c", configs[0], "-c", extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err


def test_cli_without_schedule(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = write(tmp_path / "a.yaml", {"trainer": {"max_steps": 10}, "model": {"init_args": {}}})
    assert main(["-c", cfg]) == 2
    assert "no model.init_args.lr_schedule" in capsys.readouterr().err


def test_run_length_errors_say_why() -> None:
    """No batch on a rank and an unknown length are different errors; a known length passes."""
    from mmpt.models.module import _total_steps

    with pytest.raises(ValueError, match="no batch on this rank"):
        _total_steps(0, Constant(warmup_steps=5))
    with pytest.raises(ValueError, match="run length is unknown"):
        _total_steps(float("inf"), WarmupCosine())
    assert _total_steps(float("inf"), Constant(warmup_steps=5)) == 1
    assert _total_steps(120, WarmupCosine()) == 120
