# The rebalancer service: `docker build -t rebalancer .`, then infra/docker-compose.yml runs it
# next to PostgreSQL and NATS. The image holds no secret: URLs and passwords come from the
# environment at run time (docs/operations.md).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /build
COPY pyproject.toml README.md ./
COPY events events
COPY projections projections
COPY rebalancer rebalancer
# The migrations (events/sql) are package data: the assertion fails the build without them.
RUN pip install . \
 && python -c 'from events.migrations import available; assert len(available()) > 0' \
 && cd / && rm -rf /build

# Not root. Its home keeps the chain key (chain.key, created by the first `serve`): a volume,
# so a new container keeps signing with the same key.
RUN groupadd --system --gid 10001 rebalancer \
 && useradd --system --uid 10001 --gid rebalancer --create-home \
      --home-dir /var/lib/rebalancer rebalancer
USER 10001:10001
WORKDIR /var/lib/rebalancer
ENV REBALANCER_HOME=/var/lib/rebalancer
VOLUME ["/var/lib/rebalancer"]

# `docker run IMAGE` is `rebalancer serve`; any other command replaces `serve`
# (`docker run IMAGE db migrate`, `... status`).
ENTRYPOINT ["rebalancer"]
CMD ["serve"]
