"""``mmpt data continue``: BLSP step 1, an LLM continues every transcript of audio shards."""

from __future__ import annotations

import argparse
from pathlib import Path

from mmpt.shards.continuations import BLSP_PROMPT

EXAMPLES = """examples:
  mmpt data continue --llm /models/Qwen2.5-1.5B-Instruct --from shards/speech --out shards/cont
  mmpt data continue --llm runs/blsp_tiny_lm/export --chat-template plain \\
      --prompt-template "{text}" --from data/tones/train --out data/tones-cont/train
"""


def add_continue_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``continue`` to ``mmpt data``'s subcommands."""
    p = sub.add_parser(
        "continue",
        help="BLSP step 1: an LLM continues each transcript; shards + json:continuation",
        description="Run a local causal LM (transformers folder, no remote code) over the "
        "transcripts of audio shards with BLSP's continuation prompt and the model's chat "
        "template, and write the shards again with the continuation in their json. Resumable: "
        "complete output shards are kept. Greedy by default (BLSP).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--llm", required=True, metavar="DIR", help="save_pretrained LLM or mmpt export")
    p.add_argument("--from", dest="source", required=True, metavar="SHARDS", help="audio shards")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="output shard folder")
    p.add_argument(
        "--prompt-template",
        default=BLSP_PROMPT,
        help="user message, {text} = the transcript (default: BLSP's prompt)",
    )
    p.add_argument(
        "--chat-template",
        default=None,
        metavar="FILE|NAME",
        help="Jinja file, or plain/chatml/llama3/vicuna, for an LLM whose tokenizer has none "
        "(default: the tokenizer's own)",
    )
    p.add_argument(
        "--transcript-key", default="json:transcript;txt", help="transcript field(s), ;-separated"
    )
    p.add_argument("--field", default="continuation", help="json field to write")
    p.add_argument("--max-new-tokens", type=int, default=64, help="BLSP: 64")
    p.add_argument("--batch-size", type=int, default=8, help="transcripts per generate call")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (BLSP); > 0 samples")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="sampling seed (shard i uses seed + i)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run_continue(args: argparse.Namespace) -> int:
    """Run ``mmpt data continue``; prints the counts; returns 1 when nothing was written."""
    from mmpt.shards.continuations import ContinueSettings, continue_shards
    from mmpt.text_generate import TextLLM

    settings = ContinueSettings(
        prompt_template=args.prompt_template,
        transcript_key=args.transcript_key,
        field=args.field,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
    )
    settings.check()  # before the model loads
    llm = TextLLM(args.llm, args.chat_template, args.device)
    report = continue_shards(llm, args.source, args.out, settings, progress=not args.no_progress)
    print(
        f"wrote {report.written} samples with json:{settings.field} to {report.out} "
        f"({len(report.shards)} shard(s) written, {len(report.resumed)} kept from a previous run)"
    )
    if report.replaced:
        print(f"replaced an existing {settings.field!r} in {report.replaced} sample(s)")
    if report.total_failed:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(report.failed.items()))
        print(f"failed {report.total_failed}: {reasons}")
    return 0 if report.written else 1
