# One image, three entry points: payper-operator, payper-gateway, payper-agent
# (and the payper CLI). Dependencies come from requirements.lock, hash-checked, so a
# rebuild installs exactly the same packages. Build: `make images` (buildah, no daemon),
# or `docker build .` where Docker Hub is reachable.
ARG BASE=docker.io/library/python:3.11.10-slim-bookworm

FROM ${BASE} AS build
# Installs are offline from a wheelhouse that `make images` fills with exactly the
# locked, hash-checked wheels (and the payper wheel): the build needs no network.
RUN python3 -m venv /opt/payper
COPY requirements.lock /src/requirements.lock
COPY build/wheelhouse /wheelhouse
RUN PIP_CONFIG_FILE=/dev/null /opt/payper/bin/pip install --no-cache-dir --no-index \
      --find-links /wheelhouse --require-hashes --no-deps -r /src/requirements.lock \
 && PIP_CONFIG_FILE=/dev/null /opt/payper/bin/pip install --no-cache-dir --no-index \
      --find-links /wheelhouse --no-deps payper

FROM ${BASE}
LABEL org.opencontainers.image.title="payper" \
      org.opencontainers.image.description="Scale-to-zero GPU inference, billed per GPU-second of kernels" \
      org.opencontainers.image.source="https://github.com/payper-dev/payper" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/payper /opt/payper
ENV PATH=/opt/payper/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
# Non-root by default; the agent's DaemonSet runs it as root (hostPID, /proc, host state).
USER 65532:65532
ENTRYPOINT []
CMD ["payper", "--help"]
