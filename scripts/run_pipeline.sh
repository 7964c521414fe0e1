#!/usr/bin/env bash
# The main job on a fresh machine: install, then SFT -> reward model -> PPO on the embedded
# movie-review data (CPU is fine). Extra arguments go to the pipeline (e.g. --quick, --out DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec "${ALIGNER_VENV:-.venv}/bin/python" examples/nlp/gpt/run_movie_review_pipeline.py "$@"
