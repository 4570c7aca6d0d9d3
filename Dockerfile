# tilscore for GPU nodes: CUDA PyTorch base, tilscore installed, non-root user.
# Build:  docker build -t tilscore .
# Run:    docker run --gpus all -v /data:/data tilscore score /data/slides --out /data/out
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /opt/tilscore
COPY pyproject.toml README.md ./
COPY tilscore ./tilscore
COPY models ./models
COPY configs ./configs
RUN pip install --no-cache-dir ".[distributed]"

RUN useradd --create-home --uid 1000 tilscore
USER tilscore
WORKDIR /home/tilscore

ENTRYPOINT ["tilscore"]
CMD ["--help"]
