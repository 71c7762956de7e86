# seqtune image: the service and the worker. On a GPU host pip installs PyPI's CUDA build of
# torch; for a CPU-only image build with --build-arg TORCH_CONSTRAINTS=constraints-cpu.txt.
FROM python:3.11-slim
ARG TORCH_CONSTRAINTS=""
WORKDIR /app
COPY pyproject.toml README.md constraints-cpu.txt ./
COPY service ./service
COPY worker ./worker
COPY migrations ./migrations
COPY examples ./examples
RUN pip install --no-cache-dir ${TORCH_CONSTRAINTS:+-c $TORCH_CONSTRAINTS} .
ENV SEQTUNE_DATA_DIR=/data PYTHONUNBUFFERED=1
VOLUME ["/data"]
EXPOSE 8000
CMD ["seqtune", "serve", "--host", "0.0.0.0"]
