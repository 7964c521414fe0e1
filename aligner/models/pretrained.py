"""Tell what `pretrained_checkpoint.restore_from_path` points at: a native checkpoint or a
Hugging Face model directory. Users pass either; entry scripts never ask which."""
from __future__ import annotations

import json
from pathlib import Path

from aligner.training import checkpoint


class PretrainedFormatError(ValueError):
    pass


def detect_format(path: str) -> tuple[str, Path]:
    """Return ('native', checkpoint_dir) or ('hf', model_dir), or explain what was found."""
    root = Path(path)
    if not root.exists():
        raise PretrainedFormatError(f"pretrained_checkpoint.restore_from_path={path}: no such file or directory")
    if root.is_dir() and (root / checkpoint.STATE_FILE).is_file():
        checkpoint.check_complete(root)
        return "native", root
    for candidate in (root, root / "checkpoints"):
        latest = checkpoint.latest_complete(candidate)
        if latest is not None:
            return "native", latest
    config = root / "config.json"
    if config.is_file():
        try:
            json.loads(config.read_text())
        except json.JSONDecodeError as exc:
            raise PretrainedFormatError(f"{config}: not valid JSON ({exc})") from exc
        return "hf", root
    found = sorted(p.name for p in root.iterdir())[:10] if root.is_dir() else [root.name]
    raise PretrainedFormatError(
        f"pretrained_checkpoint.restore_from_path={path} is neither a native aligner checkpoint "
        f"(a step_N directory with {checkpoint.STATE_FILE}, or a run/checkpoints directory holding one) "
        f"nor a Hugging Face model directory (config.json + *.safetensors). Found: {found}"
    )
