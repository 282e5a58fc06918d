# syntax=docker/dockerfile:1
#
# One image for the `pool-monitor` CLI: the sidecar (`pool-monitor sidecar`), the demo service
# (`uvicorn demo_app.service:create_app --factory`), its fake external API and the demo runner.
# The Helm chart in helm/pool-monitor runs every container of the demo pod from it.
#
#   docker build -t ghcr.io/pool-monitor/pool-monitor:0.1.0 .
#   docker run --rm ghcr.io/pool-monitor/pool-monitor:0.1.0 sidecar --help
#
# Two stages: the build stage has pip's build tooling and a compiler (for any dependency
# without a wheel for the platform); the final stage gets only the finished virtualenv.

ARG PYTHON_VERSION=3.11
# More packages for the image, e.g. `pglast` for the sidecar's --show-query-text (GPL-3.0,
# so not in any extra): docker build --build-arg EXTRA_PACKAGES=pglast .
ARG EXTRA_PACKAGES=""

FROM python:${PYTHON_VERSION}-slim-bookworm AS build
ARG EXTRA_PACKAGES
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/pool-monitor
ENV PATH=/opt/pool-monitor/bin:$PATH
WORKDIR /src
# Metadata first, so the dependency layer is rebuilt only when pyproject.toml changes.
COPY pyproject.toml README.md ./
COPY monitor/ monitor/
COPY demo_app/ demo_app/
COPY dashboards/ dashboards/
# The wheel holds the library only; the demo and the dashboard generator, which the chart's
# demo pod runs, are the repository's tools: copied beside the virtualenv, on its path.
RUN pip install --upgrade pip \
    && pip install ".[demo]" ${EXTRA_PACKAGES} \
    && pip check \
    && mkdir -p /opt/pool-monitor/tools \
    && cp -r demo_app dashboards /opt/pool-monitor/tools/ \
    && python -c "import pathlib, sysconfig; pathlib.Path(sysconfig.get_paths()['purelib'], 'pool-monitor-tools.pth').write_text('/opt/pool-monitor/tools\n')"

FROM python:${PYTHON_VERSION}-slim-bookworm AS runtime
LABEL org.opencontainers.image.title="pool-monitor" \
      org.opencontainers.image.description="Observability for SQLAlchemy connection pools: sidecar, demo service and CLI" \
      org.opencontainers.image.source="https://github.com/pool-monitor/pool-monitor" \
      org.opencontainers.image.licenses="Apache-2.0"
# A fixed numeric uid/gid (the chart's runAsUser) and no login shell. The home directory is
# where `pool-monitor demo` writes its report when run with plain `docker run`.
RUN groupadd --system --gid 10001 pool-monitor \
    && useradd --system --uid 10001 --gid 10001 --create-home \
       --home-dir /home/pool-monitor --shell /usr/sbin/nologin pool-monitor
COPY --from=build /opt/pool-monitor /opt/pool-monitor
ENV PATH=/opt/pool-monitor/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MPLCONFIGDIR=/tmp/matplotlib
WORKDIR /home/pool-monitor
USER 10001:10001
# 8000: the demo service (as the chart runs it); 9187: the sidecar.
EXPOSE 8000 9187
ENTRYPOINT ["pool-monitor"]
CMD ["--help"]
