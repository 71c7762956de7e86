# seqtune image: the service and the worker (the [all] extra). On a GPU host pip installs
# PyPI's CUDA build of torch; for a CPU-only image build with
# --build-arg TORCH_CONSTRAINTS=constraints-cpu.txt. An API-only image without torch:
# --build-arg EXTRAS=server.
FROM python:3.11-slim
ARG TORCH_CONSTRAINTS=""
ARG EXTRAS=all
WORKDIR /app
COPY pyproject.toml README.md constraints-cpu.txt ./
COPY seqtune ./seqtune
COPY service ./service
COPY worker ./worker
COPY migrations ./migrations
COPY examples ./examples
RUN pip install --no-cache-dir ${TORCH_CONSTRAINTS:+-c $TORCH_CONSTRAINTS} ".[${EXTRAS}]"
ENV SEQTUNE_DATA_DIR=/data PYTHONUNBUFFERED=1
VOLUME ["/data"]
EXPOSE 8000
CMD ["seqtune", "serve", "--host", "0.0.0.0"]
