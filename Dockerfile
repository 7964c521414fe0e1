# GPU image: NGC PyTorch (CUDA, NCCL, apex, TransformerEngine already inside) + aligner.
# Not built in CI (no GPU, no registry access); see README's support matrix.
ARG BASE=nvcr.io/nvidia/pytorch:25.01-py3
FROM ${BASE}
WORKDIR /opt/aligner
COPY setup.py pyproject.toml README.md ./
COPY aligner ./aligner
COPY conf ./conf
COPY examples ./examples
COPY scripts ./scripts
# Keep the base image's torch, apex and TE; megatron-core 0.16.x matches Python 3.11/3.12 images.
RUN pip install --no-cache-dir -e ".[test]" \
 && python -c "import aligner, megatron.core; print('aligner ok')"
# Optional: TensorRT-LLM for PPO generation (trainer.ppo.trt_llm.enable=True)
ARG WITH_TRTLLM=0
RUN if [ "$WITH_TRTLLM" = "1" ]; then pip install --no-cache-dir tensorrt-llm; fi
ENV PYTHONUNBUFFERED=1
