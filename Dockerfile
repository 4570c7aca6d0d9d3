# tilscore for GPU nodes: CUDA PyTorch base, tilscore and its shipped weights installed,
# non-root user. Lint: hadolint Dockerfile (clean at error level; run in the test suite).
# Build:  docker build -t tilscore .
# Run:    docker run --gpus all -v /data:/data tilscore score /data/slides --out /data/out
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    TILSCORE_MODELS_DIR=/opt/tilscore/models

WORKDIR /opt/tilscore
COPY pyproject.toml README.md ./
COPY tilscore ./tilscore
COPY models ./models
COPY configs ./configs
# torch and torchvision come from the base image (pip keeps the installed CUDA builds);
# tilscore's own dependencies resolve from pyproject.toml (pin them with a constraints file
# for a frozen image).
# hadolint ignore=DL3013
RUN pip install --no-cache-dir . \
    && useradd --create-home --uid 1000 --user-group tilscore

USER 1000:1000
WORKDIR /home/tilscore

ENTRYPOINT ["tilscore"]
CMD ["--help"]
