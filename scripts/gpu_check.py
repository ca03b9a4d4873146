"""Every pending GPU measurement in one run: gpu tests, attention benchmark, training throughput.

Each step runs in its own process under its own time limit and writes ``<out>/<step>.json``
as soon as it ends; a step that fails or runs out of time is recorded there (return code,
the tail of its output) and the next step still runs. ``summary.json`` is rewritten after
every step, so an interrupted run still leaves what it measured. ``--smoke`` runs the same
steps at tiny sizes (CPU is fine): that is what the default test suite checks.

    python scripts/gpu_check.py --out "$OUT"            # on the GPU machine (gpu_check.sh)
    python scripts/gpu_check.py --out /tmp/gc --smoke   # anywhere, tens of seconds
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
SMOKE_DATA = "data/bench/smoke32"
_TINY_TIMM = '{"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}'
_TINY_QWEN2 = (
    '{"model_type": "qwen2", "vocab_size": 128, "hidden_size": 32, "intermediate_size": 64, '
    '"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, '
    '"max_position_embeddings": 512}'
)
_TINY_SIGLIP = (
    '{"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64, '
    '"num_hidden_layers": 2, "num_attention_heads": 2, "patch_size": 8, "image_size": 32}'
)


def smoke_overrides(name: str, data: str) -> list[str]:
    """``--set`` overrides that shrink bench recipe ``name`` to seconds on a CPU.

    Args:
        name: ``clip``, ``mae`` or ``vlm``.
        data: Folder for the tiny synthetic shards (rendered on first use).
    """
    synth = {"kind": "image-text", "out": data, "train_samples": 48, "image_size": 32}
    common = [
        f"data.init_args.synthetic={json.dumps(synth)}",
        f'data.init_args.train={{"urls": "{data}/train", "shuffle_buffer": 0}}',
        "data.init_args.num_workers=0",
    ]
    model = "model.init_args"
    return {
        "clip": [
            f'{model}.vision.init_args.vision_cfg={{"image_size": 32, "patch_size": 8, '
            '"width": 32, "layers": 2, "head_width": 16}',
            f"{model}.vision.init_args.embed_dim=16",
            f'{model}.text.init_args.text_cfg={{"context_length": 12, "width": 32, '
            '"heads": 2, "layers": 1}',
            f"{model}.text.init_args.embed_dim=16",
            "data.init_args.batch_size=8",
        ],
        "mae": [
            f"{model}.encoder.init_args.model_name=vit_tiny_patch16_224",
            f"{model}.encoder.init_args.image_size=32",
            f"{model}.encoder.init_args.model_kwargs={_TINY_TIMM}",
            f"{model}.decoder_dim=16",
            f"{model}.decoder_depth=1",
            f"{model}.decoder_heads=2",
            "data.init_args.batch_size=8",
        ],
        "vlm": [
            f"{model}.llm.init_args.config={_TINY_QWEN2}",
            f"{model}.llm.init_args.tokenizer={data}/tokenizer",
            f"{model}.vision.init_args.config={_TINY_SIGLIP}",
            f'{model}.resolution={{"class_path": '
            '"mmpt.datamodules.resolution.FixedResolution", '
            '"init_args": {"image_size": 32, "patch_size": 8}}',
            "data.init_args.max_seq_len=256",
            "data.init_args.batch_size=2",
        ],
    }[name] + common


#: Seconds per training step (the first renders the shared synthetic shards); with the gpu
#: tests (100) and the attention benchmark (160, FlexAttention compiles 4 times) they fill
#: ``--budget`` (460 s): with the wheel install, about 8 minutes on one H100.
TRAIN_LIMITS = {"clip": 70, "mae": 45, "vlm": 85}
TRAIN = {
    "clip": "configs/bench/clip_vit_b16.yaml",
    "mae": "configs/bench/mae_vit_b16.yaml",
    "vlm": "configs/bench/vlm_so400m_qwen05b.yaml",
}


def steps(out: Path, smoke: bool, data: str = SMOKE_DATA) -> list[tuple[str, list[str], int]]:
    """(name, command, seconds allowed) of every step, in order."""
    attn = [PY, "scripts/bench_attention.py", "--json", str(out / "attention.json")]
    if smoke:
        attn += ["--tiny", "--max-seq-len", "64", "--rows", "2", "--steps", "1", "--warmup", "0"]
    else:  # op level: 8 rows x 4096, GQA 16 / 4 heads x 128; model: the 0.5B shape, 1 row
        attn += ["--kv-heads", "4", "--steps", "10", "--warmup", "3", "--with-flash"]
    tests = [PY, "-m", "pytest", "-q", "-rA", "-m", "gpu", "-p", "no:cacheprovider"]
    tests += ["--timeout=90"]
    tests += [f"--junitxml={out / 'pytest_gpu.xml'}", "tests/test_gpu.py"]
    tests += ["tests/test_attention.py", "tests/test_attention_backends.py"]
    if smoke:  # the gpu tests are only collected (they import): keeps the smoke run short
        tests += ["--collect-only"]
    todo = [("pytest_gpu", tests, 100), ("attention", attn, 160)]
    for name, config in TRAIN.items():
        cmd = [PY, "scripts/bench_train.py", "--config", config]
        cmd += ["--json", str(out / f"train_{name}.json")]
        if smoke:
            cmd += ["--steps", "1", "--warmup", "1"]
            cmd += [x for o in smoke_overrides(name, data) for x in ("--set", o)]
        else:
            cmd += ["--steps", "5", "--warmup", "2"]
        todo.append((f"train_{name}", cmd, 60 if smoke else TRAIN_LIMITS[name]))
    return todo


def _in_process(cmd: list[str]) -> tuple[int | None, str]:
    """Run a step's ``main`` in this process (smoke runs: one set of imports for all)."""
    import contextlib
    import importlib.util
    import io
    import traceback

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        try:
            if cmd[1:3] == ["-m", "pytest"]:
                import pytest

                code = int(pytest.main(cmd[3:]))
            else:
                spec = importlib.util.spec_from_file_location(Path(cmd[1]).stem, ROOT / cmd[1])
                module = importlib.util.module_from_spec(spec)
                sys.modules[spec.name] = module  # dataclasses look their module up there
                spec.loader.exec_module(module)
                code = int(getattr(module, "cli", module.main)(cmd[2:]) or 0)
        except SystemExit as err:
            code = err.code if isinstance(err.code, int) else 1
        except Exception:  # noqa: BLE001 (recorded: the next step still runs)
            traceback.print_exc()
            code = 1
    return code, buf.getvalue()


def run_step(name: str, cmd: list[str], limit: int, out: Path, in_process: bool) -> dict[str, Any]:
    """Run one step; its record (the step's own JSON merged in when it wrote one)."""
    t0 = time.perf_counter()
    record: dict[str, Any] = {"step": name, "command": " ".join(cmd), "limit_s": limit}
    if in_process:
        record["returncode"], output = _in_process(cmd)
    else:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
        try:
            proc = subprocess.run(
                cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit, check=False
            )
            record["returncode"], output = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as err:
            record["returncode"], record["timed_out"] = None, True
            output = _text(err.stdout) + _text(err.stderr)
    record["seconds"] = round(time.perf_counter() - t0, 1)
    record["ok"] = record["returncode"] == 0
    record["output_tail"] = output[-4000:]
    path = out / f"{name}.json"
    if path.exists():  # the step's own results
        try:
            record["result"] = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            record["result_error"] = f"unreadable {path.name}: {err}"
    junit = out / f"{name}.xml"
    if junit.exists():  # pytest's per-test outcomes, folded in (at most 8 files come back)
        record["result"] = junit_cases(junit)
        junit.unlink()
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    return record


def _text(data: bytes | str | None) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else (data or "")


def junit_cases(path: Path) -> list[dict[str, str]]:
    """Each test case of a JUnit XML file: its id, outcome and the first line of any message."""
    import xml.etree.ElementTree as ET

    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome, message = child.tag, (child.get("message") or "").splitlines()[:1]
                message = message[0] if message else ""
        cases.append(
            {
                "id": f"{case.get('classname')}::{case.get('name')}",
                "outcome": outcome,
                "message": message[:300],
            }
        )
    return cases


def main(argv: list[str] | None = None) -> int:
    """Run every step; 0 when all passed, 1 otherwise (all steps run either way)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder for the JSON files")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (CPU is fine)")
    p.add_argument("--only", default=None, help="comma list of step names to run")
    p.add_argument("--data-dir", default=SMOKE_DATA, help="--smoke: folder for tiny shards")
    p.add_argument(
        "--budget", type=float, default=460.0, help="seconds for all steps (not with --smoke)"
    )
    p.add_argument(
        "--in-process",
        action="store_true",
        help="run the steps in this process, without time limits (implied by --smoke)",
    )
    a = p.parse_args(argv)
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"smoke": a.smoke, "python": platform.python_version(), "steps": {}}
    only = set(a.only.split(",")) if a.only else None
    start = time.perf_counter()
    for name, cmd, limit in steps(out, a.smoke, a.data_dir):
        if only is not None and name not in only:
            continue
        left = a.budget - (time.perf_counter() - start)
        if not a.smoke and left < 10:
            summary["steps"][name] = {"ok": False, "returncode": None, "seconds": 0.0}
            summary["steps"][name]["skipped"] = f"time budget ({a.budget:.0f} s) spent"
            (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            continue
        limit = limit if a.smoke else int(min(limit, left))
        print(f"[gpu_check] {name} (limit {limit} s): {' '.join(cmd)}", flush=True)
        record = run_step(name, cmd, limit, out, a.in_process or a.smoke)
        summary["steps"][name] = {k: record.get(k) for k in ("ok", "returncode", "seconds")}
        print(f"[gpu_check] {name}: ok={record['ok']} in {record['seconds']} s", flush=True)
        if not record["ok"]:
            print(record["output_tail"][-1500:], flush=True)
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0 if all(s["ok"] for s in summary["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
