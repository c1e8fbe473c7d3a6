# fqdnguard's image: the package in a virtual environment on Debian bookworm (slim) with nftables
# and iproute2. Two ways to the same runtime (docs/deploy.md, "The image"):
#
#   * with a registry, from source (the last stage, so the default target): a Rust image builds
#     the wheel with maturin;
#       docker build -t fqdnguard .        (or: buildah bud -t fqdnguard .)
#   * without one (make image, CI): the wheel and its dependencies' wheels are built on the host
#     into dist/image/ (tools/image/image.py wheels), and only the runtime stages run, from a
#     local debian:bookworm-slim made by debootstrap;
#       buildah bud --target runtime -t fqdnguard .
#
# The DaemonSet (deploy/helm/fqdnguard) runs `fqdnguard proxy` and `fqdnguard agent` from it.

# --- the runtime's packages ----------------------------------------------------------------------
FROM debian:bookworm-slim AS base
# Installed only when the base lacks them: the local base made by debootstrap has them already,
# so building from it needs no network.
RUN set -eu; missing=""; \
    for p in python3 python3-venv nftables iproute2; do \
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"; \
    done; \
    if [ -n "$missing" ]; then \
        apt-get update; \
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $missing; \
        rm -rf /var/lib/apt/lists/*; \
    fi

# --- the wheel, from source (a registry's Rust image) ---------------------------------------------
FROM rust:1-bookworm AS wheel
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/build && /opt/build/bin/pip install --no-cache-dir 'maturin>=1.7,<2'
WORKDIR /src
COPY Cargo.toml Cargo.lock pyproject.toml README.md ./
COPY rust rust
COPY benches/rust benches/rust
COPY python python
RUN /opt/build/bin/maturin build --release --out /wheels \
    && /opt/build/bin/pip download --no-cache-dir --only-binary=:all: --dest /wheels /wheels/fqdnguard-*.whl

# --- the virtual environment, from either set of wheels --------------------------------------------
FROM base AS install-dist
COPY dist/image/ /tmp/wheels/
RUN python3 -m venv /opt/fqdnguard \
    && /opt/fqdnguard/bin/pip install --no-cache-dir --no-index --find-links /tmp/wheels fqdnguard

FROM base AS install-source
COPY --from=wheel /wheels/ /tmp/wheels/
RUN python3 -m venv /opt/fqdnguard \
    && /opt/fqdnguard/bin/pip install --no-cache-dir --no-index --find-links /tmp/wheels fqdnguard

# --- the runtime: the environment alone (no wheels, no compilers) ----------------------------------
FROM base AS runtime
COPY --from=install-dist /opt/fqdnguard /opt/fqdnguard
ENV PATH=/opt/fqdnguard/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONDONTWRITEBYTECODE=1
CMD ["fqdnguard", "--help"]

FROM base AS runtime-from-source
COPY --from=install-source /opt/fqdnguard /opt/fqdnguard
ENV PATH=/opt/fqdnguard/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONDONTWRITEBYTECODE=1
CMD ["fqdnguard", "--help"]
