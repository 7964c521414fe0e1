# syntax=docker/dockerfile:1
# GPU images for aligner. Not built in CI (no GPU, no NGC registry access there); CI lints this
# file with hadolint (tests/unit/test_docker_lint.py). See README's support matrix.
#
#   docker build -t aligner .                                 # NGC PyTorch + aligner (target "aligner")
#   docker build --target critic -t aligner-critic .          # + the PPO critic server as entrypoint
#   docker build --target trtllm -t aligner-trtllm .          # on NVIDIA's TensorRT-LLM release image
#   enroot import dockerd://aligner   # then CONTAINER=$PWD/aligner.sqsh sbatch scripts/slurm/sft.sbatch
#
# The base images' torch, TransformerEngine and apex are kept: scripts/install_in_image.sh pins
# them in a pip constraints file generated from the image's own `pip list`, installs aligner
# under it, and fails the build if any of them changed or TE does not import. NGC 25.03 or later:
# its torch (2.7.0a0+...) satisfies megatron-core's torch>=2.6.0; 25.01's 2.6.0a0 does not.
ARG BASE=nvcr.io/nvidia/pytorch:25.03-py3
# A TensorRT-LLM release whose torch also satisfies torch>=2.6 (its own pin decides the torch).
ARG TRTLLM_BASE=nvcr.io/nvidia/tensorrt-llm/release:0.20.0

# ---- the sources, once (.dockerignore keeps .venv, .git, results and data out of the context)
FROM scratch AS src
COPY setup.py pyproject.toml README.md /opt/aligner/
COPY aligner /opt/aligner/aligner
COPY conf /opt/aligner/conf
COPY examples /opt/aligner/examples
COPY scripts /opt/aligner/scripts
COPY tests /opt/aligner/tests

# ---- aligner on NGC PyTorch (CUDA, NCCL, apex, TransformerEngine inside)
FROM ${BASE} AS aligner
ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /opt/aligner
COPY --from=src /opt/aligner /opt/aligner
RUN bash scripts/install_in_image.sh --require-te "[test]" \
 && python -m compileall -q aligner \
 && useradd --create-home --shell /bin/bash --uid 10001 --user-group aligner
# Docker runs as user aligner (uid 10001); enroot/pyxis (SLURM) ignore USER and run as the submitting user.
USER 10001:10001

# ---- the PPO critic + reward-model server. It binds 0.0.0.0 inside the container, so it needs
# ALIGNER_CRITIC_TOKEN (docker run -e ALIGNER_CRITIC_TOKEN=...); arguments are config overrides:
#   docker run --gpus all -p 5555:5555 -e ALIGNER_CRITIC_TOKEN=$TOKEN -v $PWD/results:/results \
#     aligner-critic pretrained_checkpoint.restore_from_path=/results/rm exp_manager.explicit_log_dir=/results/critic
# Healthy = models loaded and serving: the ready file exists (written once loading is done) and
# GET /health on its port answers.
FROM aligner AS critic
ENV CRITIC_READY_FILE=/tmp/aligner-critic.ready
EXPOSE 5555
HEALTHCHECK --interval=30s --timeout=10s --start-period=900s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; port = open(os.environ['CRITIC_READY_FILE']).read().strip().rpartition(':')[2]; urllib.request.urlopen(f'http://127.0.0.1:{port}/health', timeout=5)"]
ENTRYPOINT ["python", "examples/nlp/gpt/serve_ppo_critic.py", "trainer.ppo.host=0.0.0.0", "trainer.ppo.port=5555", "trainer.ppo.ready_file=/tmp/aligner-critic.ready"]
CMD []

# ---- aligner on NVIDIA's TensorRT-LLM release image, for trainer.ppo.trt_llm.enable=True
# (its torch, CUDA and tensorrt_llm match each other; pip installing tensorrt-llm into the NGC
# PyTorch image does not). TransformerEngine is not required here.
FROM ${TRTLLM_BASE} AS trtllm
ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /opt/aligner
COPY --from=src /opt/aligner /opt/aligner
RUN bash scripts/install_in_image.sh "[test]" \
 && python -c "import tensorrt_llm; print('tensorrt_llm', tensorrt_llm.__version__)" \
 && python -m compileall -q aligner \
 && useradd --create-home --shell /bin/bash --uid 10001 --user-group aligner
USER 10001:10001

# ---- default target (`docker build .`): aligner on NGC PyTorch
FROM aligner AS default
