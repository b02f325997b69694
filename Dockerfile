# syntax=docker/dockerfile:1
# Every Ratchet image, one target each. Build from the repository root, e.g.
#   docker build --target executor -t ratchet-executor .
# Targets: one per service in ratchet.services (executor, evaluator, failure-store, proposer,
# gatekeeper, approver), each `faststream run --factory MODULE:build_app`, plus local-model
# (the embedded model behind llama.cpp's server). They share the build stage and the base image
# (ratchet[services]), and the services' targets differ only in CMD; local-model adds llama.cpp
# and the model (ratchet[local-model]). The slow layers (the dependencies, llama.cpp compiled
# from source among them) are built once. tests/unit/test_compose.py checks each target against
# the list.

FROM python:3.11-slim AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential cmake \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Dependencies first, from pyproject.toml alone, so code changes do not rebuild them: the base
# (the SDK's) and the extras the images run: services, local-model and console.
# GGML_NATIVE=OFF: llama.cpp is compiled for any x86-64 CPU, not only the build machine's (a
# native build can use instructions, such as AMX, that a virtual machine reports but traps).
COPY pyproject.toml ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
    extras = p['optional-dependencies']; \
    print(*p['dependencies'], *extras['services'], *extras['local-model'], *extras['console'], \
          sep='\n')" \
    > requirements.txt \
    && CMAKE_ARGS="-DGGML_NATIVE=OFF" \
       pip wheel --no-cache-dir --wheel-dir /wheels -r requirements.txt
COPY shared shared
COPY services services
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11-slim AS base
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 ratchet \
    && mkdir /data && chown ratchet /data
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links /wheels 'ratchet[services]'
WORKDIR /app
COPY config config
ENV PYTHONUNBUFFERED=1 \
    RATCHET_HOME=/data \
    RATCHET_RULES_PATH=/app/config/behavior_rules.json \
    RATCHET_SUITES_DIR=/app/config/suites
USER ratchet

FROM base AS executor
CMD ["faststream", "run", "--factory", "ratchet_executor.app:build_app"]

FROM base AS evaluator
CMD ["faststream", "run", "--factory", "ratchet_evaluator.app:build_app"]

FROM base AS failure-store
CMD ["faststream", "run", "--factory", "ratchet_failure_store.app:build_app"]

FROM base AS proposer
CMD ["faststream", "run", "--factory", "ratchet_proposer.app:build_app"]

FROM base AS gatekeeper
CMD ["faststream", "run", "--factory", "ratchet_gatekeeper.app:build_app"]

FROM base AS approver
CMD ["faststream", "run", "--factory", "ratchet_approver.app:build_app"]

# The review console (`ratchet console`), an operator tool rather than a service: the base and
# the console extra (Starlette, Jinja2, uvicorn). Accounts live in /data/console.json.
FROM base AS console
USER root
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links /wheels 'ratchet[services,console]'
USER ratchet
EXPOSE 8080
CMD ["ratchet", "console", "--host", "0.0.0.0", "--port", "8080"]

# Only this image holds llama.cpp and the model; the services reach it over HTTP.
FROM base AS local-model
USER root
# Where the wheel put the local model, found the same way `ratchet up` finds it.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links /wheels 'ratchet[local-model]' \
    && ln -s "$(python -c 'from ratchet.models import local_model_path; print(local_model_path())')" \
       /app/model.gguf
USER ratchet
EXPOSE 8088
CMD ["python", "-m", "llama_cpp.server", "--model", "/app/model.gguf", \
     "--host", "0.0.0.0", "--port", "8088", "--n_ctx", "2048"]
