"""The one error type of the Hugging Face bridge: a directory we cannot import faithfully."""
from __future__ import annotations


class HFFormatError(ValueError):
    """A Hugging Face directory that does not fit what aligner's model can represent exactly.

    Messages name the file, the key or tensor, what was found and what is supported, so the
    user knows whether to pick another checkpoint or fix a hand-edited config.json.
    """
